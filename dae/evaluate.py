"""Metrics of the results table: reconstruction MSE and the accuracy of a classifier on codes."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dae.model import affine
from dae.train import FitConfig, apply_in_batches, classification_loss, fit, shared


@torch.no_grad()
def reconstruction_mse(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over images of ‖target − AE(input)‖² / 784 (pixels in [0, 1])."""
    model.eval()
    recon = apply_in_batches(model, inputs)
    return torch.mean((recon - targets) ** 2).item()


def reconstruction_metrics(model: nn.Module, test: dict) -> dict[str, float]:
    """The table's two MSEs: from the clean test images (`mse`) and from their noisy copy (`mse_noisy`)."""
    return {"mse": reconstruction_mse(model, test["clean"], test["clean"]),
            "mse_noisy": reconstruction_mse(model, test["noisy"], test["clean"])}


class CodeClassifier(nn.Module):
    """M small MLPs on (standardised) encoder codes, stacked: codes [M, B, code_dim] -> logits
    [M, B, 10], member i initialised as nn.Linear initialises it after torch.manual_seed(seeds[i])."""

    def __init__(self, seeds: Sequence[int], code_dim: int, hidden: int, mean: torch.Tensor,
                 std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.unsqueeze(1))  # [M, 1, code_dim]
        self.register_buffer("std", std.clamp_min(1e-6).unsqueeze(1))
        layers = []
        for seed in seeds:
            torch.manual_seed(seed)
            layers.append((nn.Linear(code_dim, hidden), nn.Linear(hidden, 10)))
        # Weights stored [M, in, out], so that each layer is one batched product h @ W + b.
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([pair[k].weight.detach().t() for pair in layers]))
                                        for k in range(2))
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([pair[k].bias.detach() for pair in layers]))
                                       for k in range(2))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        h = torch.relu(affine(self.biases[0], (codes - self.mean) / self.std, self.weights[0]))
        return affine(self.biases[1], h, self.weights[1])


@torch.no_grad()
def accuracy(classifier: nn.Module, codes: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each member's accuracy on its codes [M, N, code_dim] of the images with `labels` [N]."""
    classifier.eval()
    predicted = torch.cat([classifier(codes[:, i:i + 8192]).argmax(dim=2) for i in range(0, codes.shape[1], 8192)],
                          dim=1)
    return (predicted == labels).float().mean(dim=1).tolist()


def train_classifiers(train_codes: torch.Tensor, train_labels: torch.Tensor,
                      val_codes: torch.Tensor, val_labels: torch.Tensor, hidden: int,
                      config: FitConfig, seeds: Sequence[int], desc: Sequence[str], on_epoch=None,
                      progress: bool = True) -> CodeClassifier:
    """Fit one CodeClassifier per member on its frozen codes [M, N, code_dim], all stacked; each
    keeps its best validation epoch. `on_epoch(rows)`: every member's epoch, as dae.train.fit."""
    members = len(seeds)
    classifier = CodeClassifier(seeds, train_codes.shape[2], hidden, train_codes.mean(1), train_codes.std(1))
    classifier.to(train_codes.device)
    fit(classifier, classification_loss, (train_codes, shared(train_labels, members)),
        (val_codes, shared(val_labels, members)), config, seeds=seeds, desc=desc, on_epoch=on_epoch,
        progress=progress)
    return classifier


class PCACode(nn.Module):
    """The linear baseline: the top `k` principal directions of the clean training images as the
    code, x ↦ (x − μ)V, decoded as zVᵀ + μ. The best linear k-d code in squared error."""

    def __init__(self, images: torch.Tensor, k: int) -> None:
        super().__init__()
        centred = images.double() - images.double().mean(0)
        # Eigenvectors of the covariance (784 x 784, in float64): ascending eigenvalues, so the last k.
        _, vectors = torch.linalg.eigh(centred.T @ centred)
        self.register_buffer("mean", images.mean(0))
        self.register_buffer("components", vectors[:, -k:].flip(1).float().contiguous())  # [784, k]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.components.T + self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
