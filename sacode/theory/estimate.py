"""Monte-Carlo estimates: a sample mean with its standard error, computed in one place.

Every Monte-Carlo number of the book (J = E r - beta KL, a terminal mean, a gradient component) is reported as
mean +- SE with SE = sample std / sqrt(n) (ddof = 1); checks compare it with an exact value at Z = 4 standard errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MeanSE:
    """A sample mean, its standard error and the sample size."""

    mean: float
    se: float
    n: int

    def __iter__(self):                   # unpacks as (mean, se)
        yield self.mean
        yield self.se

    def within(self, value: float, z: float) -> bool:
        """|mean - value| <= z SE."""
        return abs(self.mean - value) <= z * self.se

    def __format__(self, spec: str) -> str:
        spec = spec or ".4g"
        return f"{self.mean:{spec}} +- {self.se:.2g}"


def mean_se(samples: Tensor | np.ndarray) -> MeanSE:
    """Mean and standard error of per-sample values (a 1-D tensor or array of n >= 2 values)."""
    if isinstance(samples, Tensor):
        v = samples.detach().reshape(-1).double()
        n = v.numel()
        return MeanSE(float(v.mean()), float(v.std() / math.sqrt(n)) if n > 1 else math.nan, n)
    v = np.asarray(samples, dtype=np.float64).reshape(-1)
    return MeanSE(float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan, v.size)
