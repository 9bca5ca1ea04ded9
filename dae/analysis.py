"""The slide's analyses of a trained autoencoder (named so as not to be confused with DVC/MLflow
experiments): latent projections, the denoiser as a projection onto the data manifold, and
digit morphing in code space versus pixel space."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def iterate_denoiser(model: nn.Module, x: torch.Tensor, steps: list[int]) -> dict[int, torch.Tensor]:
    """Apply x ← AE(x) repeatedly; return the images after each number of steps in `steps`."""
    model.eval()
    out, current = {}, x
    for step in range(max(steps) + 1):
        if step in steps:
            out[step] = current
        current = model(current)
    return out


@torch.no_grad()
def morph(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """Decode z = (1 − α)·z₁ + α·z₂ for each α: [len(alphas), 784]."""
    model.eval()
    z1, z2 = model.encode(x1[None]), model.encode(x2[None])
    a = torch.tensor(alphas, dtype=z1.dtype, device=z1.device)[:, None]
    return model.decode((1 - a) * z1 + a * z2)


def blend_pixels(x1: torch.Tensor, x2: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """The same interpolation in pixel space: a cross-fade."""
    a = torch.tensor(alphas, dtype=x1.dtype, device=x1.device)[:, None]
    return (1 - a) * x1[None] + a * x2[None]


def pca(codes: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(projections [n, k], principal directions [k, d], mean [d]) of `codes`."""
    mean = codes.mean(0)
    _, _, v = torch.linalg.svd(codes - mean, full_matrices=False)
    directions = v[:k]
    return (codes - mean) @ directions.T, directions, mean


@torch.no_grad()
def decoded_plane(model: nn.Module, codes: torch.Tensor, n: int = 10, span: float = 2.0,
                  raw: bool = False) -> np.ndarray:
    """Decode an n×n grid over the two leading principal directions of `codes` (±span std),
    or over the code plane itself when `raw` (a 2-D bottleneck). Returns a [28n, 28n] image."""
    if raw:
        lo, hi = codes.quantile(0.02, dim=0), codes.quantile(0.98, dim=0)
        u = torch.linspace(0, 1, n, device=codes.device)
        grid = torch.stack(torch.meshgrid(lo[0] + u * (hi[0] - lo[0]), hi[1] - u * (hi[1] - lo[1]),
                                          indexing="xy"), -1).reshape(-1, 2)
    else:
        projected, directions, mean = pca(codes)
        std = projected.std(0)
        steps = torch.linspace(-span, span, n, device=codes.device)
        a, b = torch.meshgrid(steps * std[0], -steps * std[1], indexing="xy")
        grid = mean + a.reshape(-1, 1) * directions[0] + b.reshape(-1, 1) * directions[1]
    from torchvision.utils import make_grid

    return make_grid(model.decode(grid).reshape(-1, 1, 28, 28).cpu(), nrow=n, padding=0)[0].numpy()


def tsne(codes: np.ndarray, seed: int) -> np.ndarray:
    """A 2-D t-SNE embedding (fixed seed, PCA init)."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(codes) - 1) / 3)
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(codes)


def example_indices(labels: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """The first `n` examples to show: the first image of each class, then the next ones in order;
    and the first image of each class alone."""
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(10) if (labels == c).any()]
    first_set = set(firsts)
    rest = [i for i in range(len(labels)) if i not in first_set]
    return (firsts + rest)[:n], firsts
