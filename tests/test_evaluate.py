import pytest
import torch
from torch import nn

from dae.evaluate import accuracy, batched, reconstruction_mse, train_classifier
from dae.train import FitConfig


class Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


def test_mse_of_known_tensors():
    x = torch.zeros(10, 784)
    x[:, :392] = 1.0  # half the pixels on
    assert reconstruction_mse(nn.Identity(), x, x) == 0.0
    assert reconstruction_mse(Constant(0.0), x, x) == pytest.approx(0.5)
    assert reconstruction_mse(Constant(0.5), x, x) == pytest.approx(0.25)


def test_mse_is_per_pixel_mean_of_per_image_squared_error():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(50, 784, generator=g), torch.rand(50, 784, generator=g)
    per_image = ((x - y) ** 2).sum(dim=1) / 784
    assert reconstruction_mse(nn.Identity(), x, y) == pytest.approx(per_image.mean().item(), rel=1e-6)


def test_batched_matches_unbatched():
    x = torch.rand(20000, 3)
    assert torch.equal(batched(lambda t: t * 2, x, batch_size=777), x * 2)


def test_classifier_on_codes_learns_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 8, generator=g) * 3 + 100  # far from zero mean: standardisation matters
    labels = torch.randint(0, 10, (3000,), generator=g)
    codes = centers[labels] + torch.randn(3000, 8, generator=g)
    clf = train_classifier(codes[:2000], labels[:2000], codes[2000:2500], labels[2000:2500], 32,
                           FitConfig(5, 64, 3e-3), seed=0, desc="clf")
    assert accuracy(clf, codes[2500:], labels[2500:]) > 0.95
    assert accuracy(clf, codes[2500:], (labels[2500:] + 1) % 10) < 0.1
