"""Conditions c of a batch (prompts, class labels, or none): the third argument of s_pre(s, x, c) and r(x, c).

One small type replaces ad-hoc switches on "None, a tensor or a list" wherever the engine selects, repeats or
groups the conditions of a batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


class Conditions:
    """The conditions of n samples: ``values`` is None (unconditional), a tensor with n rows (labels, embeddings)
    or a sequence of n hashable items (prompts)."""

    __slots__ = ("values", "n")

    def __init__(self, values: Tensor | Sequence[Any] | None, n: int | None = None):
        if values is None:
            if n is None:
                raise ValueError("unconditional Conditions need the batch size n")
        elif isinstance(values, Tensor):
            n = values.shape[0] if n is None else n
            if values.shape[0] != n:
                raise ValueError(f"{values.shape[0]} conditions for a batch of {n}")
        elif isinstance(values, (list, tuple)):
            values = list(values)
            n = len(values) if n is None else n
            if len(values) != n:
                raise ValueError(f"{len(values)} conditions for a batch of {n}")
        else:
            raise TypeError(f"conditions must be None, a tensor or a list; got {type(values).__name__}")
        self.values, self.n = values, int(n)

    @classmethod
    def none(cls, n: int) -> "Conditions":
        return cls(None, n)

    @classmethod
    def of(cls, cond: "Conditions | Tensor | Sequence[Any] | None", n: int) -> "Conditions":
        """Wrap raw conditions (or return ``cond`` when it already is a Conditions)."""
        return cond if isinstance(cond, Conditions) else cls(cond, n)

    @property
    def empty(self) -> bool:
        """True for an unconditional batch."""
        return self.values is None

    def __len__(self) -> int:
        return self.n

    def index(self, idx: Tensor) -> "Conditions":
        """The conditions of the sub-batch ``idx`` (a 1-D index tensor)."""
        idx = torch.as_tensor(idx).reshape(-1)
        if self.values is None:
            return Conditions.none(idx.numel())
        if isinstance(self.values, Tensor):
            return Conditions(self.values[idx.to(self.values.device)])
        return Conditions([self.values[int(i)] for i in idx])

    def repeat(self, times: int) -> "Conditions":
        """The batch repeated ``times`` times in order (c_0..c_{n-1}, c_0..c_{n-1}, ...): the conditions of the
        states x_k of a rollout flattened step by step."""
        if self.values is None:
            return Conditions.none(self.n * times)
        if isinstance(self.values, Tensor):
            return Conditions(self.values.repeat(times, *([1] * (self.values.ndim - 1))))
        return Conditions(list(self.values) * times)

    def keys(self) -> list[str]:
        """A hashable group key per sample (for per-condition statistics); "" for every sample when unconditional."""
        if self.values is None:
            return [""] * self.n
        if isinstance(self.values, Tensor):
            return [str(c.tolist()) for c in self.values]
        return [str(c) for c in self.values]

    def gather(self, accelerator) -> "Conditions":
        """The conditions of every process of a distributed run (accelerate), in process order."""
        if self.values is None:
            return Conditions.none(self.n * accelerator.num_processes)
        if isinstance(self.values, Tensor):
            return Conditions(accelerator.gather(self.values))
        from accelerate.utils import gather_object
        return Conditions(gather_object(list(self.values)))

    def __repr__(self):
        kind = "none" if self.values is None else type(self.values).__name__
        return f"Conditions(n={self.n}, {kind})"
