"""Environments of the fine-tuning engine (DESIGN.md decision 5).

An environment is a forward SDE (or a scheduler mapped onto one), a pretrained score s_pre(s, x, c), a
condition sampler and a terminal reward r(x, c). The same algorithms run on every environment; only the
environment and the policy change between a 1-D toy and Stable Diffusion.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from .._shapes import expand_time
from ..data import GaussianMixture
from ..sde import LinearSDE


class Environment(Protocol):
    """What an algorithm may ask of an environment. ``cond`` is whatever the environment's conditions are
    (None for unconditional toys, class labels for digits, prompt embeddings for Stable Diffusion)."""

    sde: LinearSDE
    event_shape: tuple[int, ...]
    reward_differentiable: bool

    def sample_init(self, n: int, generator: torch.Generator) -> Tensor: ...

    def sample_conditions(self, n: int, generator: torch.Generator) -> Any: ...

    def pretrained_score(self, s: Tensor, x: Tensor, cond: Any) -> Tensor: ...

    def reward(self, x: Tensor, cond: Any) -> Tensor: ...


def tweedie(sde: LinearSDE, s: Tensor, x: Tensor, score: Tensor) -> Tensor:
    """Tweedie denoiser x0_hat = (x + sigma(s)^2 score) / alpha(s) (any environment, any score)."""
    a, sg = sde.alpha(s).to(x), sde.sigma(s).to(x)
    return (x + expand_time(sg**2, x) * score) / expand_time(a, x)


def index_cond(cond: Any, idx: Tensor) -> Any:
    """Select the conditions of a sub-batch (None, tensors and lists are supported)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[idx]
    if isinstance(cond, (list, tuple)):
        return [cond[int(i)] for i in idx]
    if isinstance(cond, dict):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    raise TypeError(f"cannot index conditions of type {type(cond).__name__}; use a tensor, list or dict")


class ToyEnv:
    """A toy preset as an environment: exact or learned pretrained score, closed-form reward.

    ``pretrained`` is ``"exact"`` (the data's exact score) or a score model ``model(s, x)`` (e.g. a
    ScoreMLP trained by denoising score matching, so that fine-tuning also works when s_pre is imperfect).
    """

    def __init__(self, preset, pretrained: str | torch.nn.Module = "exact", dtype: torch.dtype = torch.float64):
        self.preset, self.sde, self.beta = preset, preset.sde, preset.beta
        self.event_shape = preset.event_shape
        self.dtype = dtype
        self.reward_differentiable = True
        if isinstance(pretrained, str):
            if pretrained != "exact":
                raise ValueError(f"pretrained must be 'exact' or a score model; got {pretrained!r}")
            self._score = preset.data.score_fn(preset.sde)
        else:
            for p in pretrained.parameters():
                p.requires_grad_(False)
            self._score = pretrained
        self.data: GaussianMixture = preset.data

    def sample_init(self, n: int, generator: torch.Generator) -> Tensor:
        return self.sde.prior_sample((n, *self.event_shape), generator, dtype=self.dtype)

    def sample_conditions(self, n: int, generator: torch.Generator):
        return None

    def pretrained_score(self, s: Tensor, x: Tensor, cond=None) -> Tensor:
        if isinstance(self._score, torch.nn.Module):       # frozen parameters; gradients may flow to x
            return self._score(s.to(x.dtype), x)
        return self._score(s, x)

    def reward(self, x: Tensor, cond=None) -> Tensor:
        return self.preset.reward(x)
