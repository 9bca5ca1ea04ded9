import pytest
import torch
from torch import nn

from dae.evaluate import accuracy, reconstruction_mse, train_classifiers
from dae.train import apply_in_batches
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


def test_apply_in_batches_matches_one_call():
    x = torch.rand(20000, 3)
    assert torch.equal(apply_in_batches(lambda t: t * 2, x, batch_size=777), x * 2)


def test_classifier_on_codes_learns_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 8, generator=g) * 3 + 100  # far from zero mean: standardisation matters
    labels = torch.randint(0, 10, (3000,), generator=g)
    codes = centers[labels] + torch.randn(3000, 8, generator=g)
    codes = codes.unsqueeze(0)  # one member
    clf = train_classifiers(codes[:, :2000], labels[:2000], codes[:, 2000:2500], labels[2000:2500], 32,
                            FitConfig(5, 64, 3e-3), seeds=[0], desc=["clf"])
    assert accuracy(clf, codes[:, 2500:], labels[2500:])[0] > 0.95
    assert accuracy(clf, codes[:, 2500:], (labels[2500:] + 1) % 10)[0] < 0.1


def test_pca_code_is_the_best_linear_code_of_its_size():
    """PCACode: orthonormal directions of decreasing variance, and no other k-d linear code of
    the training images reconstructs them better (here: against a random orthonormal one)."""
    from dae.evaluate import PCACode

    g = torch.Generator().manual_seed(0)
    images = torch.rand(500, 3, generator=g) @ torch.rand(3, 20, generator=g) + 0.01 * torch.rand(500, 20, generator=g)
    pca = PCACode(images, 3)
    torch.testing.assert_close(pca.components.T @ pca.components, torch.eye(3), atol=1e-5, rtol=0)
    variances = pca.encode(images).var(0)
    assert variances[0] >= variances[1] >= variances[2]
    assert reconstruction_mse(pca, images, images) < 1e-4  # the data spans 3 directions
    q, _ = torch.linalg.qr(torch.rand(20, 3, generator=g))
    mean = images.mean(0)
    other = torch.mean(((images - mean) @ q @ q.T + mean - images) ** 2)
    assert reconstruction_mse(pca, images, images) < other
