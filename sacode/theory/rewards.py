"""Terminal rewards r(x) for the toy presets (protocol: x of shape (n, *event) -> tensor of shape (n,)).

Both are closed-form friendly: a linear reward tilts a Gaussian into a shifted Gaussian, a quadratic one
into a Gaussian with smaller variance (chapter 5).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dynamics.shapes import flatten_event


class LinearReward:
    """r(x) = w . x (over the flattened event)."""

    def __init__(self, w):
        self.w = torch.as_tensor(w, dtype=torch.float64).reshape(-1)

    def __call__(self, x: Tensor) -> Tensor:
        return flatten_event(x) @ self.w.to(x)

    def grad(self, x: Tensor) -> Tensor:
        return self.w.to(x).expand(x.shape[0], -1).reshape(x.shape)

    def __repr__(self):
        return f"LinearReward(w={self.w.tolist()})"


class QuadraticReward:
    """r(x) = -(lam/2) ||x - center||^2."""

    def __init__(self, lam: float, center):
        self.lam = float(lam)
        self.center = torch.as_tensor(center, dtype=torch.float64).reshape(-1)

    def __call__(self, x: Tensor) -> Tensor:
        return -0.5 * self.lam * ((flatten_event(x) - self.center.to(x)) ** 2).sum(1)

    def grad(self, x: Tensor) -> Tensor:
        return (-self.lam * (flatten_event(x) - self.center.to(x))).reshape(x.shape)

    def __repr__(self):
        return f"QuadraticReward(lam={self.lam}, center={self.center.tolist()})"
