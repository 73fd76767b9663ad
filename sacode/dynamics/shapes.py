"""Shape helpers: every function in sacode takes x of shape (n,), (n, d) or (n, c, h, w).

The leading axis is the batch; everything after it is the *event*. Times are scalars or
tensors of shape (n,) and are broadcast against the event with :func:`expand_time`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def as_time(s: float | Tensor, x: Tensor) -> Tensor:
    """Return ``s`` as a tensor of shape (n,) on x's device and dtype."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(
            f"time must be a scalar or have shape ({x.shape[0]},) to match the batch of x; got {tuple(s.shape)}"
        )
    return s


def expand_time(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample quantity v of shape (n,) (or a scalar) so it broadcasts against x."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def flatten_event(x: Tensor) -> Tensor:
    """(n, *event) -> (n, d); a 1-D batch (n,) becomes (n, 1)."""
    return x.reshape(x.shape[0], -1)


def sum_event(v: Tensor) -> Tensor:
    """Sum over every axis but the batch axis: (n, *event) -> (n,)."""
    return v.reshape(v.shape[0], -1).sum(dim=1)


def event_dim(x: Tensor) -> int:
    """Number of scalar coordinates per sample."""
    return int(torch.tensor(x.shape[1:]).prod().item()) if x.ndim > 1 else 1
