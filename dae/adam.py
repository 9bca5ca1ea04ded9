"""Adam as `fit` uses it: PyTorch's fused Adam kernel, called without torch.optim.

Why not torch.optim.Adam: every torch.optim optimizer imports torch._dynamo when it is built
and stepped (torch 2.14), although nothing here compiles. That import costs ~1 s and ~150 MB
in every training stage process, ten of them per `dvc repro`: on a GPU, where a stage trains
in seconds, start-up is the floor (reports/method.md). This class calls the same kernel,
`torch._fused_adam_`, with the same arguments and state as `torch.optim.Adam(fused=True)`, so
it takes the same steps bit for bit (tests/test_adam.py compares them).

`capturable`: the learning rate is a tensor on the parameters' device, which `set_lr` fills in
place, so a CUDA graph that recorded `step` replays it with each step's rate (dae.train.GraphedStep).
"""
from __future__ import annotations

from typing import Iterable

import torch


class Adam:
    """Adam (Kingma & Ba 2015) with L2 weight decay added to the gradient, as torch.optim.Adam."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, capturable: bool = False) -> None:
        self.params = list(params)
        devices = {p.device.type for p in self.params}
        if not self.params or not devices <= {"cpu", "cuda"} or len({p.device for p in self.params}) != 1:
            raise ValueError(f"Adam needs parameters on one CPU or CUDA device, got {sorted(devices)}")
        device = self.params[0].device
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.lr: float | torch.Tensor = torch.tensor(float(lr), device=device) if capturable else float(lr)
        # The moments and step counts that torch.optim.Adam(fused=True) keeps per parameter.
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.params]

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (in place where it is a tensor: no host sync)."""
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)
        else:
            self.lr = float(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        steps = [self.steps[i] for i in have]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_([self.params[i] for i in have], [self.params[i].grad for i in have],
                           [self.exp_avg[i] for i in have], [self.exp_avg_sq[i] for i in have], [], steps,
                           amsgrad=False, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                           weight_decay=self.weight_decay, eps=self.eps, maximize=False)

    def state_dict(self) -> dict:
        return {"lr": float(self.lr), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for mine, saved in ((self.exp_avg, state["exp_avg"]), (self.exp_avg_sq, state["exp_avg_sq"]),
                                (self.steps, state["steps"])):
                for tensor, value in zip(mine, saved, strict=True):
                    tensor.copy_(value)
        self.set_lr(state["lr"])
