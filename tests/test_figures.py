import numpy as np
import pandas as pd
from matplotlib.image import imread

from dae import figures


def saved(fig, tmp_path, name="f.png") -> np.ndarray:
    figures.save(fig, tmp_path / name)
    return imread(tmp_path / name)


def test_image_grid_is_drawn_and_not_blank(tmp_path):
    rng = np.random.default_rng(0)
    rows = {"ground truth": rng.random((4, 784)), "noisy": rng.random((4, 784))}
    image = saved(figures.image_grid(rows, "title", col_labels=list("abcd")), tmp_path)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05


def test_latent_panels_colour_by_digit(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    points = rng.normal(size=(200, 2)) + labels[:, None]
    image = saved(figures.latent_panels({"model": {"PCA": points, "t-SNE": points}}, labels, "t"), tmp_path)
    colours = np.unique((image[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)
    assert len(colours) > 20  # ten digit colours and their blends, not a blank page


def test_loss_curves_and_manifold(tmp_path):
    curve = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [3, 2, 1], "val_loss": [0.3, 0.2, 0.1]})
    assert saved(figures.loss_curves({"a": curve}, "t"), tmp_path, "c.png")[..., :3].std() > 0.01
    traj = {"start": {0: np.zeros(784), 1: np.ones(784)}}
    image = saved(figures.manifold(traj, np.eye(56), "plane", "t"), tmp_path, "m.png")
    assert image[..., :3].std() > 0.05
