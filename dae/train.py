"""The one fit loop: layer pretraining, fine-tuning and the classifiers all train through `fit`.

`fit` trains M stacked members at once (all seeds of a stage, or several models of one
architecture): one batched computation per step instead of M small ones. The data set lives as
tensors on the device; each epoch draws batches by seeded index permutations, so there is no
per-sample Python and no DataLoader.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn
from tqdm import tqdm

from dae.adam import Adam
from dae.io import save_torch
from dae.params import PRECISIONS, SCHEDULES

log = logging.getLogger(__name__)

# A batch of every member ([M, B, ...] tensors) -> each member's mean loss [M].
LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]
# Turns a training batch into a new one using each member's seeded generator on the data's
# device, e.g. (clean,) -> (freshly corrupted, clean): every epoch sees new noise.
Augment = Callable[[Sequence[torch.Tensor], list[torch.Generator]], Sequence[torch.Tensor]]
# Entered around each epoch's training steps, e.g. the model's centring (TiedAutoencoder.centered).
EpochContext = Callable[[], ContextManager[None]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0   # linear warm-up, then the schedule's decay
    schedule: str = "cosine"     # after warm-up: "cosine" or "linear" decay to zero, or "constant"
    # "bfloat16": the forward and backward matrix products run under bfloat16 autocast (the
    # weights, the optimizer and the loss stay float32); "float32": plain float32.
    precision: str = "float32"

    @classmethod
    def from_section(cls, section: dict, model: str | None = None) -> "FitConfig":
        """The config of a validated params section (pretrain, finetune, classifier); `model`
        picks its entry of a per-model `epochs` mapping."""
        epochs = section["epochs"][model] if isinstance(section["epochs"], dict) else section["epochs"]
        return cls(epochs, section["batch_size"], section["lr"], section["weight_decay"],
                   section["warmup_epochs"], schedule=section["schedule"], precision=section["precision"])


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one {epoch, train_loss, val_loss} per epoch
    best_epoch: int = 0
    best_val_loss: float = math.inf


def _lr_factor(config: FitConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate's factor at each step: linear warm-up, then the schedule."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; choose one of {list(SCHEDULES)}")
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def autocast(device: torch.device, precision: str, cache: bool = True):
    """The autocast context of `precision` on `device` (a no-op for float32); `cache`: reuse a
    weight's bfloat16 cast within the context (off where a CUDA graph records it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16", cache_enabled=cache)


def make_optimizer(model: nn.Module, config: FitConfig, capturable: bool = False) -> Adam:
    """Adam with PyTorch's fused kernel (one kernel per step instead of a few per tensor: ~10 %
    faster fine-tuning on CPU, more on CUDA; dae/adam.py says why not torch.optim). `capturable`:
    the learning rate lives on the device, as a CUDA graph needs."""
    return Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, capturable=capturable)


def gather(tensors: Sequence[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """Each member's rows `idx` [M, B] of per-member tensors [M, N, ...]: [M, B, ...] each."""
    members = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
    return [t[members, idx] for t in tensors]


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor],
                  batch_size: int = 8192) -> list[float]:
    """Each member's mean of `loss_fn` over the whole data set ([M, N, ...] tensors), in large batches."""
    was_training = model.training
    model.eval()
    n = tensors[0].shape[1]
    total = torch.zeros(tensors[0].shape[0], dtype=torch.float64, device=tensors[0].device)
    for start in range(0, n, batch_size):
        batch = [t[:, start:start + batch_size] for t in tensors]
        total += loss_fn(model, batch).double() * batch[0].shape[1]
    model.train(was_training)
    return (total / n).tolist()  # one device sync for all members


@torch.no_grad()
def apply_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     batch_size: int = 8192) -> torch.Tensor:
    """`fn(x)` computed in batches of rows (bounded memory, no autograd) and concatenated."""
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def shared(tensor: torch.Tensor, members: int) -> torch.Tensor:
    """One data set [N, ...] that every member trains on, as the [M, N, ...] that `fit` takes: a
    view, not M copies."""
    return tensor.expand(members, *tensor.shape)


def training_step(model: nn.Module, loss_fn: LossFn, optimizer: Adam,
                  train: Sequence[torch.Tensor], precision: str, augment: Augment | None = None,
                  augment_generators: list[torch.Generator] | None = None,
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step of `fit`: every member's batch gather, noise, forward, backward and Adam update on
    its rows `idx` [M, B]; returns the members' losses [M]. It reads nothing back to the host (no
    `.item()`, no data-dependent shape; tests/test_train.py checks), so a GPU never waits on it
    and a CUDA graph can record it (GraphedStep). The learning-rate schedule steps outside it."""
    device = train[0].device

    def step(idx: torch.Tensor) -> torch.Tensor:
        batch = gather(train, idx)
        if augment is not None:
            batch = augment(batch, augment_generators)
        # Autocast's cast cache off on CUDA, as PyTorch's CUDA-graph notes require for capture.
        with autocast(device, precision, cache=device.type != "cuda"):
            losses = loss_fn(model, batch)
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
        return losses.detach()

    return step


class GraphedStep:
    """A training step replayed as one CUDA graph per batch: the gather, noise, forward, backward
    and Adam of all M members are one launch, where eager PyTorch launches ~200 small kernels
    and a GPU idles between them. Batches of the captured shape [M, B] are copied into a static
    index buffer and replayed; any other shape (an epoch's last, partial batch) runs eagerly.
    The first full batch runs eagerly on a side stream (lazy optimizer state, library
    workspaces), the second is captured, then replayed. `reset()` drops the graph, e.g. each
    epoch when the centring offsets, which the graph reads, are new tensors.

    `new_graph` and `capture` are torch.cuda's; tests pass stand-ins that call the step, to
    check on a CPU what the buffers and the replay order compute. A capture that fails (an op
    CUDA graphs do not support) is logged once and the run goes on eagerly."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int], device: torch.device,
                 generators: Sequence[torch.Generator] = (), new_graph: Callable | None = None,
                 capture: Callable | None = None, side_stream: bool = True) -> None:
        self.step, self.generators = step, list(generators)
        self.static_idx = torch.zeros(shape, dtype=torch.long, device=device)
        self.new_graph = new_graph or torch.cuda.CUDAGraph
        self.capture = capture or torch.cuda.graph
        self.side_stream = side_stream
        self.graph, self.losses, self.warm, self.failed = None, None, False, False

    def reset(self) -> None:
        self.graph, self.losses = None, None

    def _warm_up(self, idx: torch.Tensor) -> torch.Tensor:
        self.warm = True
        if not self.side_stream:
            return self.step(idx)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self.step(idx)
        torch.cuda.current_stream().wait_stream(side)
        return losses

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.failed or tuple(idx.shape) != tuple(self.static_idx.shape):
            return self.step(idx)
        if not self.warm:
            return self._warm_up(idx)
        self.static_idx.copy_(idx)
        if self.graph is None:
            graph = self.new_graph()
            for generator in self.generators:  # each member's noise stays its own seeded stream
                graph.register_generator_state(generator)
            try:
                with self.capture(graph):
                    self.losses = self.step(self.static_idx)
            except RuntimeError as exc:
                log.warning("CUDA graph capture failed, training on without graphs: %s", exc)
                self.failed = True
                return self.step(idx)
            self.graph = graph
        self.graph.replay()
        return self.losses


def fit(model: nn.Module, loss_fn: LossFn, train: Sequence[torch.Tensor], val: Sequence[torch.Tensor],
        config: FitConfig, *, seeds: Sequence[int], desc: Sequence[str],
        on_epoch: Callable[[list[dict]], None] | None = None,
        checkpoint: Path | None = None, fingerprint: str = "", augment: Augment | None = None,
        epoch_context: EpochContext | None = None, progress: bool = True) -> list[FitResult]:
    """Train the M stacked members of `model` in place with Adam; keep each member's parameters
    of its best validation epoch. Returns one FitResult per member.

    `model` holds M members (one per entry of `seeds` and `desc`) as parameters with a leading
    member dimension (e.g. TiedAutoencoder.stacked); `loss_fn(model, batch)` returns the M
    members' mean losses [M], and their sum is minimised, so each member gets its own gradient
    (Adam is elementwise: a member's steps do not depend on the others). `train` and `val` are
    tuples of tensors already on the model's device, each [M, N, ...]: one data set per member,
    or `shared(tensor, M)` where they train on the same rows. Every member draws its own batches (a permutation
    from its seed's generator) and, through `augment`, its own noise (a generator seeded
    seed + 1), exactly as it would trained alone: M = 1 is the one-model case.
    If `checkpoint` is given, the full training state is saved there after every epoch and, if
    the file exists when `fit` starts and carries the same `fingerprint` (what was being
    trained: params, initial weights, data), training resumes from it (bit-identical on CPU).
    `epoch_context`, if given, is entered around each epoch's training steps and left before
    validation, so what is validated, kept and checkpointed is the model outside it.
    `on_epoch(rows)` gets every member's {epoch, train_loss, val_loss, lr} after each epoch.
    On CUDA each full batch's step is one CUDA graph replay
    (GraphedStep), captured anew each epoch; a CPU runs the same step eagerly.
    """
    members = len(seeds)
    if len(desc) != members:
        raise ValueError(f"{members} seeds but {len(desc)} descriptions")
    for tensor in (*train, *val):
        if tensor.shape[0] != members:
            raise ValueError(f"data of shape {tuple(tensor.shape)} for {members} members: pass [M, N, ...] "
                             "(dae.train.shared for one data set)")
    n = train[0].shape[1]
    steps_per_epoch = math.ceil(n / config.batch_size)
    device = train[0].device
    graphed = device.type == "cuda"
    optimizer = make_optimizer(model, config, capturable=graphed)
    lr_factor = _lr_factor(config, steps_per_epoch)
    optimizer.set_lr(config.lr * lr_factor(0))
    # Index permutations come from CPU generators: identical on every device.
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    augment_generators = [torch.Generator(device).manual_seed(seed + 1) for seed in seeds]
    results = [FitResult() for _ in seeds]
    best_state = copy.deepcopy(model.state_dict())
    start_epoch = 1

    state = None
    if checkpoint is not None and checkpoint.exists():
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a broken checkpoint only costs a restart
            log.warning("%s: ignoring unreadable checkpoint %s (%s)", desc[0], checkpoint, exc)
        if state is not None and state.get("fingerprint") != fingerprint:
            log.info("%s: checkpoint %s is from other params or data; starting afresh", desc[0], checkpoint)
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for generator, saved in zip(generators + augment_generators, state["generators"]):
            generator.set_state(saved)
        results, best_state = state["results"], state["best_state"]
        start_epoch = state["epoch"] + 1
        log.info("%s: resuming after epoch %d from %s", ", ".join(desc), state["epoch"], checkpoint)

    step = training_step(model, loss_fn, optimizer, train, config.precision, augment, augment_generators)
    if graphed:
        step = GraphedStep(step, (members, min(config.batch_size, n)), device, augment_generators)
    model.train()
    steps_done = (start_epoch - 1) * steps_per_epoch
    label = desc[0] if members == 1 else f"{desc[0]} (+{members - 1} stacked)"
    for epoch in range(start_epoch, config.epochs + 1):
        order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
        running = torch.zeros(members, device=device)
        bar = tqdm(range(0, n, config.batch_size), desc=f"{label} epoch {epoch}/{config.epochs}",
                   leave=False, mininterval=1.0, disable=None if progress else True)
        if graphed:
            step.reset()  # the epoch context may hand the step new tensors (the centring offsets)
        with epoch_context() if epoch_context is not None else contextlib.nullcontext():
            for start in bar:
                idx = order[:, start:start + config.batch_size]
                running += step(idx) * idx.shape[1]
                steps_done += 1
                optimizer.set_lr(config.lr * lr_factor(steps_done))  # a tensor is filled in place: no host sync
        train_losses = (running / n).tolist()  # one device sync per epoch, not per step
        val_losses = evaluate_loss(model, loss_fn, val)
        lr = config.lr * lr_factor(steps_done)
        rows = [{"epoch": epoch, "train_loss": t, "val_loss": v, "lr": lr} for t, v in zip(train_losses, val_losses)]
        for name, row in zip(desc, rows):
            if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
                bad = row["train_loss"] if not math.isfinite(row["train_loss"]) else row["val_loss"]
                raise TrainingDiverged(
                    f"{name}: loss became {bad} at epoch {epoch}; the model was not written. "
                    f"Try a lower learning rate (lr is {config.lr}).")
        better = []
        for i, (result, row) in enumerate(zip(results, rows)):
            result.history.append(row)
            if row["val_loss"] < result.best_val_loss:
                result.best_val_loss, result.best_epoch = row["val_loss"], epoch
                better.append(i)
            log.info("%s epoch %d/%d: train %.5f  val %.5f", desc[i], epoch, config.epochs,
                     row["train_loss"], row["val_loss"])
        if better:  # copy the improved members' parameters into the kept state
            with torch.no_grad():
                for key, value in model.state_dict().items():
                    best_state[key][better] = value[better]
        if on_epoch is not None:
            on_epoch(rows)
        if checkpoint is not None:
            save_torch(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "generators": [g.get_state() for g in generators + augment_generators],
                                    "epoch": epoch, "results": results, "best_state": best_state,
                                    "fingerprint": fingerprint})
    model.load_state_dict(best_state)
    model.eval()
    return results


def reconstruction_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each member's mean squared error between AE(input) and target: batch = (input, target),
    each [M, B, features]; returns [M]."""
    inputs, targets = batch
    return torch.mean((model(inputs).float() - targets) ** 2, dim=(1, 2))  # float32 even under autocast


def classification_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each member's mean cross-entropy: batch = (inputs [M, B, features], labels [M, B]); returns [M]."""
    inputs, labels = batch
    logits = model(inputs).float()
    losses = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return losses.view(labels.shape).mean(dim=1)
