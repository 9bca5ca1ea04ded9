"""The noise stage's split files (`<folder>/<split>.pt`): written once, read onto a device by every
training stage (their identity in MLflow: dae.tracking.dataset_inputs)."""
from __future__ import annotations

from pathlib import Path

import torch

from dae.io import save_torch

SPLITS = ("train", "val", "test")


def save_split(folder: str | Path, split: str, clean: torch.Tensor, noisy: torch.Tensor,
               labels: torch.Tensor) -> None:
    """clean uint8 [N, 784], its fixed noisy copy float32 [N, 784], labels int64 [N]."""
    save_torch(Path(folder) / f"{split}.pt", {"clean": clean, "noisy": noisy, "labels": labels})


def load_split(folder: str | Path, split: str, device: torch.device | str, noisy: bool = True) -> dict:
    """{"clean": float [N,784] in [0,1], "noisy": float [N,784], "labels": int64 [N]} on `device`.
    `noisy=False` leaves the noisy copy out: the file is then memory-mapped, so its noisy images
    are never read and take no memory (evaluate's classifiers: ~0.16 GB less on MNIST)."""
    blob = torch.load(Path(folder) / f"{split}.pt", weights_only=True, mmap=not noisy)
    data = {"clean": blob["clean"].to(device).float().div_(255.0), "labels": blob["labels"].to(device).clone()}
    if noisy:
        data["noisy"] = blob["noisy"].to(device)
    return data
