"""scikit-learn's ``load_digits`` (1797 images of 8x8 pixels, values 0..16, offline) as diffusion data.

Pixels are scaled to [-1, 1] by x = v / 8 - 1 (so 0 -> -1, white paper; 16 -> +1, full ink). A fixed permutation
(seed 0) splits the images into 1437 training images and 360 held-out images; the score model and the classifier
see only the training split, and sample quality is measured against the held-out split.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

PIXEL_MAX = 16.0
N_HELDOUT = 360
SPLIT_SEED = 0
SHAPE = (1, 8, 8)


def to_unit(v: np.ndarray | Tensor) -> Tensor:
    """Raw pixel values in [0, 16] -> [-1, 1]."""
    v = torch.as_tensor(v, dtype=torch.float32)
    return v / (PIXEL_MAX / 2) - 1.0


def to_pixels(x: Tensor) -> Tensor:
    """[-1, 1] -> raw pixel values in [0, 16] (clipped), the inverse of :func:`to_unit`."""
    return ((x.clamp(-1, 1) + 1.0) * (PIXEL_MAX / 2))


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits and labels. Reads the CSV that ships inside scikit-learn directly (the same file
    ``load_digits`` reads; importing scikit-learn itself costs seconds on a busy laptop), else calls it."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")            # locates the package without importing it
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.exists():
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",", dtype=np.float32)
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    if spec is None:
        raise ModuleNotFoundError("scikit-learn is needed for the digits data: pip install scikit-learn")
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """Images (n, 1, 8, 8) in [-1, 1] (float32) and labels (n,) of ``split`` in {"train", "heldout", "all"}."""
    images, labels = _load()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    idx = {"train": perm[N_HELDOUT:], "heldout": perm[:N_HELDOUT], "all": np.arange(len(images))}
    if split not in idx:
        raise ValueError(f"unknown split {split!r}; use 'train', 'heldout' or 'all'")
    i = np.sort(idx[split])
    return to_unit(images[i]).reshape(-1, *SHAPE), torch.from_numpy(labels[i])


def class_frequencies(split: str = "train") -> Tensor:
    """Fraction of each digit 0..9 in ``split`` (about 0.1 each)."""
    _, y = digits(split)
    return torch.bincount(y, minlength=10).double() / y.numel()


def encode_images(x: torch.Tensor) -> list[str]:
    """Images (n, 1, 8, 8) in [-1, 1] -> one hex string of 64 grey levels (0..255) per image (compact JSON)."""
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(x.shape[0], 64).numpy()
    return [row.tobytes().hex() for row in u8]


def decode_images(codes: list[str]) -> torch.Tensor:
    """The inverse of :func:`encode_images` (to 1/255 of the grey range): images (n, 1, 8, 8) in [-1, 1]."""
    a = np.stack([np.frombuffer(bytes.fromhex(c), dtype=np.uint8) for c in codes]).astype(np.float32)
    return torch.from_numpy(a / 127.5 - 1.0).reshape(-1, 1, 8, 8)
