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


def image_grid(rows: dict[str, np.ndarray], title: str, col_labels: list[str] | None = None):
    """One row of 28x28 images per entry of `rows` ({label: [n, 784]}), labelled on the left."""
    n_rows, n_cols = len(rows), max(len(v) for v in rows.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.0 * n_cols + 1.6, 1.0 * n_rows + 0.6),
                             squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(np.clip(images[c].reshape(28, 28), 0, 1), cmap="gray", vmin=0, vmax=1)
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            if r == 0 and col_labels:
                ax.set_title(col_labels[c], fontsize=8)
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
    axes = left.subplots(len(starts), len(steps), squeeze=False)
    for r, start in enumerate(starts):
        for c, step in enumerate(steps):
            ax = axes[r, c]
            ax.imshow(np.clip(trajectories[start][step].reshape(28, 28), 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{step} step{'s' if step != 1 else ''}", fontsize=9)
            if c == 0:
                ax.set_ylabel(start, rotation=0, ha="right", va="center", fontsize=8)
    left.suptitle("Iterating the denoiser x ← AE(x)", fontsize=11)
    ax = right.subplots()
    ax.imshow(np.clip(plane, 0, 1), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(plane_title, fontsize=10)
    fig.suptitle(title, fontsize=12, y=1.06)
    return fig
