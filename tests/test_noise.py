import pytest
import torch

from dae.noise import corrupt


def images(n=2000):
    return torch.rand(n, 784, generator=torch.Generator().manual_seed(0))


def test_same_seed_same_noise_other_seed_other_noise():
    x = images()
    a = corrupt(x, "gaussian", 0.3, torch.Generator().manual_seed(1))
    b = corrupt(x, "gaussian", 0.3, torch.Generator().manual_seed(1))
    c = corrupt(x, "gaussian", 0.3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gaussian_statistics():
    x = images()
    noise = corrupt(x, "gaussian", 0.3, torch.Generator().manual_seed(0)) - x
    assert abs(noise.mean().item()) < 0.002
    assert noise.std().item() == pytest.approx(0.3, rel=0.01)


def test_gaussian_clip_stays_in_range_and_raises_the_mean():
    x = torch.zeros(1000, 784)  # MNIST is mostly background
    clipped = corrupt(x, "gaussian", 0.3, torch.Generator().manual_seed(0), clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1
    # E[max(0, N(0, σ²))] = σ/√(2π) ≈ 0.12 for σ = 0.3
    assert clipped.mean().item() == pytest.approx(0.3 / (2 * torch.pi) ** 0.5, rel=0.02)


def test_masking_zeroes_the_fraction():
    x = torch.ones(1000, 784)
    noisy = corrupt(x, "masking", 0.25, torch.Generator().manual_seed(0))
    assert (noisy == 0).float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert set(noisy.unique().tolist()) == {0.0, 1.0}


def test_salt_and_pepper_fraction_and_balance():
    x = torch.full((1000, 784), 0.5)
    noisy = corrupt(x, "salt_and_pepper", 0.2, torch.Generator().manual_seed(0))
    hit = noisy != 0.5
    assert hit.float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert (noisy[hit] == 1).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_unknown_noise_type():
    with pytest.raises(ValueError, match="unknown noise type"):
        corrupt(images(2), "speckle", 0.1, torch.Generator())
