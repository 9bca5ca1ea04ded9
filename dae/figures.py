"""Figures of the report, drawn with matplotlib (Agg: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dae.io import write_with  # noqa: E402


def save(fig, path: str | Path) -> None:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def tile(images: np.ndarray, per_row: int, padding: int = 2) -> np.ndarray:
    """28x28 images ([n, 784], pixels in [0, 1]) tiled `per_row` to a row on a white background,
    `padding` pixels apart (torchvision's make_grid)."""
    import torch
    from torchvision.utils import make_grid

    batch = torch.as_tensor(np.clip(images, 0, 1), dtype=torch.float32).reshape(-1, 1, 28, 28)
    return make_grid(batch, nrow=per_row, padding=padding, pad_value=1.0)[0].numpy()


def _image_rows(axes, rows: dict[str, np.ndarray], col_labels: list[str] | None, fontsize: int) -> None:
    """One tiled row of images per axis, labelled on the left (and the columns on top)."""
    n_cols = max(len(v) for v in rows.values())
    for ax, (label, images) in zip(axes, rows.items()):
        images = np.asarray(images).reshape(-1, 784)
        blank = np.ones((n_cols - len(images), 784), images.dtype)  # a short row ends in white
        ax.imshow(tile(np.concatenate([images, blank]), n_cols), cmap="gray", vmin=0, vmax=1)
        ax.set_yticks([])
        ax.set_xticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=fontsize)
    if col_labels:  # above the first row, centred on each image (28 pixels, 2 of padding)
        axes[0].xaxis.tick_top()
        axes[0].set_xticks([2 + 30 * c + 14 for c in range(len(col_labels))], col_labels, fontsize=8)
        axes[0].tick_params(length=0)


def image_grid(rows: dict[str, np.ndarray], title: str, col_labels: list[str] | None = None):
    """One row of 28x28 images per entry of `rows` ({label: [n, 784]}), labelled on the left."""
    n_rows, n_cols = len(rows), max(len(v) for v in rows.values())
    fig, axes = plt.subplots(n_rows, 1, figsize=(1.0 * n_cols + 1.6, 1.0 * n_rows + 0.6), squeeze=False)
    _image_rows(axes[:, 0], rows, col_labels, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def loss_curves(curves: dict[str, "object"], title: str):
    """Validation loss per epoch for each named curve (DataFrames with epoch, val_loss)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, frame in curves.items():
        ax.plot(frame["epoch"], frame["val_loss"], marker="." if len(frame) < 30 else None, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def latent_panels(panels: dict[str, dict[str, np.ndarray]], labels: np.ndarray, title: str):
    """A grid of 2-D scatter plots coloured by class (0-9): {row: {column: points [n, 2]}}."""
    rows = list(panels)
    cols = list(panels[rows[0]])
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.2 * len(cols), 3.8 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for r, row in enumerate(rows):
        for c, col in enumerate(cols):
            ax = axes[r, c]
            points = panels[row][col]
            for digit in range(10):
                hit = labels == digit
                ax.scatter(points[hit, 0], points[hit, 1], s=3, color=cmap(digit), label=str(digit),
                           alpha=0.7, rasterized=True)
            ax.set_title(f"{row} — {col}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=cmap(d), label=str(d)) for d in range(10)]
    fig.legend(handles=handles, title="class", loc="center right", fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    return fig


def manifold(trajectories: dict[str, dict[int, np.ndarray]], plane: np.ndarray, plane_title: str, title: str):
    """Left: x ← AE(x) trajectories (one row per start, one column per step count);
    right: the decoded grid over the code plane."""
    fig = plt.figure(figsize=(15, 6.5))
    left, right = fig.subfigures(1, 2, width_ratios=[1.25, 1])
    starts = list(trajectories)
    steps = list(trajectories[starts[0]])
    rows = {start: np.stack([trajectories[start][step] for step in steps]) for start in starts}
    axes = left.subplots(len(starts), 1, squeeze=False)[:, 0]
    _image_rows(axes, rows, [f"{step} step{'s' if step != 1 else ''}" for step in steps], fontsize=8)
    left.suptitle("Iterating the denoiser x ← AE(x)", fontsize=11)
    ax = right.subplots()
    ax.imshow(np.clip(plane, 0, 1), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(plane_title, fontsize=10)
    fig.suptitle(title, fontsize=12, y=1.06)
    return fig
