"""Seeded input corruption for denoising: gaussian, masking, salt-and-pepper."""
from __future__ import annotations

import torch

from dae.params import NOISE_TYPES


def corrupt(x: torch.Tensor, kind: str, level: float, generator: torch.Generator,
            clip: bool = False) -> torch.Tensor:
    """Return a corrupted copy of `x` (floats in [0, 1]).

    gaussian: x + N(0, level²) per pixel, clipped to [0, 1] only if `clip` (clipping shifts the
    mean of the input upwards, since most MNIST pixels are 0). masking: a fraction `level` of
    pixels set to 0. salt_and_pepper: a fraction `level` of pixels set to 0 or 1, equally likely.
    The same generator state always gives the same corruption.
    """
    if kind == "gaussian":
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        noisy = x + level * noise
        return noisy.clamp_(0.0, 1.0) if clip else noisy
    if kind == "masking":
        hit = torch.rand(x.shape, generator=generator, device=x.device) < level
        return x.masked_fill(hit, 0.0)
    if kind == "salt_and_pepper":
        hit = torch.rand(x.shape, generator=generator, device=x.device) < level
        salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
        return torch.where(hit, salt.to(x.dtype), x)
    raise ValueError(f"unknown noise type {kind!r}; choose one of {NOISE_TYPES}")
