"""Time grids of the samplers: diffusion times s_0 = T > s_1 > ... > s_K >= 0 (RL times t_k = T - s_k increase).

A fine-tuning run samples on one grid; the continuous-time view of chapter 3 makes the policy a function of time,
so it can be evaluated on any other grid (chapter 10).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .time import rl_time

DDIM_S_END = 1e-3
"""Default last diffusion time of a DDIM grid, as a fraction of T: the DDIM step into s = 0 is deterministic
(it has no transition density), so DDIM grids stop at s_end = 1e-3 T, as diffusers' DDIM scheduler with
``set_alpha_to_one=False`` does."""


def default_s_end(method: str, T: float) -> float:
    """Where a grid ends by default for a sampler ``method``: 1e-3 T for ``ddim``, else 0 (the data end)."""
    return DDIM_S_END * T if method == "ddim" else 0.0


@dataclass(frozen=True)
class TimeGrid:
    """Diffusion times s_0 = T > s_1 > ... > s_K >= 0 visited by a sampler; ``t`` gives RL times."""

    s: Tensor
    T: float

    def __post_init__(self):
        s = torch.as_tensor(self.s, dtype=torch.float64)
        object.__setattr__(self, "s", s)
        if s.ndim != 1 or s.numel() < 2:
            raise ValueError(f"a time grid needs at least 2 times in a 1-D tensor; got shape {tuple(s.shape)}")
        if not bool((s[1:] < s[:-1]).all()):
            raise ValueError("diffusion times of a grid must decrease strictly (from noise s=T to data)")
        if float(s[0]) > self.T + 1e-12 or float(s[-1]) < 0:
            raise ValueError(f"grid times must lie in [0, T={self.T}]; got [{float(s[-1])}, {float(s[0])}]")

    @property
    def t(self) -> Tensor:
        """RL times t_k = T - s_k (increasing)."""
        return rl_time(self.s, self.T)

    @property
    def K(self) -> int:
        return self.s.numel() - 1

    @property
    def dt(self) -> Tensor:
        """Step lengths t_{k+1} - t_k > 0."""
        return self.s[:-1] - self.s[1:]

    @classmethod
    def uniform(cls, T: float, K: int, s_end: float = 0.0) -> "TimeGrid":
        """K equal steps from s = T to s = s_end."""
        return cls(torch.linspace(T, s_end, K + 1, dtype=torch.float64), T)

    @classmethod
    def power(cls, T: float, K: int, rho: float = 2.0, s_end: float = 0.0) -> "TimeGrid":
        """Non-uniform grid s_k = s_end + (T - s_end)(1 - k/K)^rho: steps shrink towards the data end."""
        u = torch.linspace(0, 1, K + 1, dtype=torch.float64)
        return cls(s_end + (T - s_end) * (1 - u) ** rho, T)

    @classmethod
    def random(cls, T: float, K: int, generator: torch.Generator | None = None, s_end: float = 0.0) -> "TimeGrid":
        """K steps with uniformly random interior times (a fresh grid per batch)."""
        inner = torch.sort(torch.rand(K - 1, generator=generator, dtype=torch.float64), descending=True).values
        ends = lambda v: torch.tensor([v], dtype=torch.float64)
        return cls(torch.cat([ends(T), s_end + (T - s_end) * inner, ends(s_end)]), T)

    def __len__(self) -> int:
        return self.K
