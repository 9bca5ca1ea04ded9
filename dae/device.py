"""Where the stages compute (params.yaml `device`), and deterministic kernels there."""
from __future__ import annotations

import os

import torch
import torch.utils.deterministic

from dae.params import ParamError


def select_device(choice: str) -> torch.device:
    """`auto`: CUDA when there is a GPU, else the CPU; `cuda` on a machine without one is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamError("device: 'cuda' was requested but CUDA is not available on this machine; "
                         "use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels: bit-identical reruns on one CPU model (README for CUDA)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torch.use_deterministic_algorithms(True) sets this flag, and also imports torch._inductor
    # (~1 s a process) for torch.compile's copy of it; no stage compiles (reports/method.md).
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None:  # a PyTorch without the private setter: the public call does the same
        torch.use_deterministic_algorithms(True)
    else:
        set_flag(True)
    # Deterministic mode also fills every new tensor with NaN, a guard against reading memory
    # that was never written; every kernel here writes what it reads, and the fill costs ~3 %
    # of an epoch (reports/method.md). The models are the same bits either way.
    torch.utils.deterministic.fill_uninitialized_memory = False
