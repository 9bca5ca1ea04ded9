import numpy as np
import pytest
import torch

from dae import analysis
from dae.model import TiedAutoencoder
from dae.train import FitConfig, fit, reconstruction_loss, shared


@pytest.fixture(scope="module")
def trained(mnist_raw):
    """A 1+1 denoiser trained briefly on real digits, and some test digits."""
    from dae.data import read_idx_split

    images, _ = read_idx_split(mnist_raw, "train")
    x = torch.from_numpy(images[:4000].copy()).float() / 255
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    stack = TiedAutoencoder.stacked([TiedAutoencoder([784, 32], linear_code=True)])
    fit(stack, reconstruction_loss, (shared(noisy[:3500], 1), shared(x[:3500], 1)),
        (shared(noisy[3500:], 1), shared(x[3500:], 1)), FitConfig(8, 32, 1e-2), seeds=[0], desc=["test"])
    return stack.unstacked()[0], x[3500:3600]


def test_morph_endpoints_are_the_reconstructions(trained):
    model, x = trained
    path = analysis.morph(model, x[0], x[1], [0.0, 0.5, 1.0])
    with torch.no_grad():
        assert torch.allclose(path[0], model(x[0:1])[0], atol=1e-6)
        assert torch.allclose(path[2], model(x[1:2])[0], atol=1e-6)
    assert not torch.allclose(path[1], path[0])


def test_pixel_blend_endpoints_and_midpoint(trained):
    _, x = trained
    blend = analysis.blend_pixels(x[0], x[1], [0.0, 0.5, 1.0])
    assert torch.equal(blend[0], x[0]) and torch.equal(blend[2], x[1])
    assert torch.allclose(blend[1], (x[0] + x[1]) / 2)


def test_iterating_on_a_clean_reconstruction_barely_moves_it(trained):
    model, x = trained
    steps = analysis.iterate_denoiser(model, x, [0, 1, 2])
    assert torch.equal(steps[0], x)
    reconstruction_move = (steps[2] - steps[1]).pow(2).mean()  # |AE(AE(x)) - AE(x)|²
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    denoising_move = (analysis.iterate_denoiser(model, noisy, [1])[1] - noisy).pow(2).mean()
    # A reconstruction is (nearly) on the learned manifold: the denoiser moves it far less
    # than it moves a noisy input onto the manifold.
    assert reconstruction_move < 0.2 * denoising_move


def test_iterating_from_noise_converges(trained):
    model, _ = trained
    noise = torch.rand(5, 784, generator=torch.Generator().manual_seed(0))
    steps = analysis.iterate_denoiser(model, noise, [1, 49, 50])
    late_move = (steps[50] - steps[49]).pow(2).mean()
    assert late_move < 1e-3 * (steps[1] - noise).pow(2).mean()


def test_pca_directions_are_orthonormal_and_ordered():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(500, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 1.0, 0.5, 0.1])
    projected, directions, mean = analysis.pca(codes)
    assert torch.allclose(directions @ directions.T, torch.eye(2), atol=1e-5)
    assert projected[:, 0].var() > projected[:, 1].var() > 1.0
    assert abs(directions[0, 0]) > 0.99


def test_decoded_plane_and_tsne_shapes(trained):
    model, x = trained
    codes = model.encode(x).detach()
    assert analysis.decoded_plane(model, codes, n=4).shape == (112, 112)
    embedding = analysis.tsne(codes.numpy(), seed=0)
    assert embedding.shape == (100, 2) and np.isfinite(embedding).all()
    two_d = TiedAutoencoder([784, 2], linear_code=True)
    plane = analysis.decoded_plane(two_d, two_d.encode(x).detach(), n=3, raw=True)
    assert plane.shape == (84, 84)
