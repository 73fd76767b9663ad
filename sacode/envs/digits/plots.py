"""Image grids of 8x8 digits (ink dark on white paper, as scikit-learn shows them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def digit_grid(x: Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """Tile images (n, 1, 8, 8) in [-1, 1] into one array (values clipped, padding = paper, -1)."""
    x = x.detach().float().clamp(-1, 1)[:, 0].cpu().numpy()
    n = x.shape[0]
    ncol = min(nrow, n)
    nr = (n + ncol - 1) // ncol
    h, w = x.shape[1:]
    out = -np.ones((nr * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return out


def show_grid(ax, x: Tensor, nrow: int = 8, title: str | None = None) -> None:
    """Draw an image grid on a matplotlib axis."""
    ax.imshow(digit_grid(x, nrow), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)


def save_before_after(x_before: Tensor, x_after: Tensor, path: Path, n: int = 64, title: str = "",
                      labels: tuple[str, str] = ("pretrained", "fine-tuned")) -> None:
    """Two grids side by side (same initial noise and increments), saved as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.8))                 # no pyplot: leaves the caller's backend and figures alone
    axes = fig.subplots(1, 2)
    show_grid(axes[0], x_before[:n], title=labels[0])
    show_grid(axes[1], x_after[:n], title=labels[1])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
