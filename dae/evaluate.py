"""Metrics of the results table: reconstruction MSE and the accuracy of a classifier on codes."""
from __future__ import annotations

import torch
from torch import nn

from dae.train import FitConfig, classification_loss, fit


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Apply `fn` to `x` in batches (bounded memory) and concatenate."""
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def reconstruction_mse(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over images of ‖target − AE(input)‖² / 784 (pixels in [0, 1])."""
    model.eval()
    recon = batched(model, inputs)
    return torch.mean((recon - targets) ** 2).item()


class CodeClassifier(nn.Module):
    """A small MLP on (standardised) encoder codes."""

    def __init__(self, code_dim: int, hidden: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std.clamp_min(1e-6))
        self.net = nn.Sequential(nn.Linear(code_dim, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net((codes - self.mean) / self.std)


@torch.no_grad()
def accuracy(classifier: nn.Module, codes: torch.Tensor, labels: torch.Tensor) -> float:
    classifier.eval()
    predicted = batched(lambda c: classifier(c).argmax(dim=1), codes)
    return (predicted == labels).float().mean().item()


def train_classifier(train_codes: torch.Tensor, train_labels: torch.Tensor,
                     val_codes: torch.Tensor, val_labels: torch.Tensor, hidden: int,
                     config: FitConfig, seed: int, desc: str, on_epoch=None,
                     progress: bool = True) -> CodeClassifier:
    """Fit a CodeClassifier on frozen codes; the best validation epoch is kept. `progress`: draw
    a progress bar on a terminal (False in worker processes)."""
    torch.manual_seed(seed)
    classifier = CodeClassifier(train_codes.shape[1], hidden, train_codes.mean(0), train_codes.std(0))
    classifier.to(train_codes.device)
    fit(classifier, classification_loss, (train_codes, train_labels), (val_codes, val_labels), config,
        seed=seed, desc=desc, on_epoch=on_epoch, progress=progress)
    return classifier
