"""Image tensors <-> PIL, and grids of images (the per-epoch pictures of a run)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """(n, 3, H, W) floats in [0, 1] -> (n, H, W, 3) uint8 on the CPU (rounded, clipped)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (n, 3, H, W) with values in [0, 1]; got {tuple(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(images: Tensor) -> list:
    """(n, 3, H, W) floats in [0, 1] -> list of PIL RGB images."""
    from PIL import Image

    arr = to_uint8(images).numpy()
    return [Image.fromarray(a if a.shape[2] == 3 else a[..., 0]) for a in arr]


def image_grid(images: Tensor, ncol: int | None = None, captions: list[str] | None = None, scale: int = 1):
    """A PIL grid of (n, 3, H, W) images in [0, 1]; optional one-line captions under each image (e.g. rewards).

    ``scale`` enlarges each image by pixel repetition (tiny 32x32 images are unreadable otherwise).
    """
    from PIL import Image, ImageDraw

    pils = to_pil(images)
    n = len(pils)
    ncol = ncol or min(n, 8)
    nrow = (n + ncol - 1) // ncol
    w, h = pils[0].size
    w, h = w * scale, h * scale
    cap_h = 12 if captions else 0
    grid = Image.new("RGB", (ncol * w, nrow * (h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(pils):
        r, c = divmod(i, ncol)
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        grid.paste(im, (c * w, r * (h + cap_h)))
        if captions:
            draw.text((c * w + 2, r * (h + cap_h) + h), str(captions[i])[: max(1, w // 6)], fill="black")
    return grid


def save_grid(images: Tensor, path: str | Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, **kw).save(path)
    return path
