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
