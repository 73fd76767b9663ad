"""Policies: trainable scores s_theta(s, x, c), the mean of the Gaussian score-action policy (chapter 3)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._shapes import as_time
from ..nets import MLP


class ScorePolicy(nn.Module):
    """Base class: ``forward(s, x, cond)`` returns the score (the action mean) at diffusion time s."""

    def forward(self, s: Tensor, x: Tensor, cond: Any = None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def score_fn(self, cond: Any = None):
        """The policy as a sampler score function ``score(s, x)`` for fixed conditions."""
        return lambda s, x: self(s, x, cond)


class ResidualMLPPolicy(ScorePolicy):
    """s_theta(s, x) = s_pre(s, x) + c_theta(s, x) with an MLP correction initialised to zero.

    At initialisation the policy *is* the pretrained sampler, as fine-tuning requires. On the toys the optimal
    correction (grad V* / beta, chapter 5) is O(1) at every noise level, so it is not rescaled.
    """

    def __init__(self, env, hidden: int = 64, depth: int = 2, n_freq: int = 4):
        super().__init__()
        self.env = env
        d = 1
        for k in env.event_shape:
            d *= k
        self.d = d
        self.net = MLP(d, d, hidden, depth, n_freq)
        nn.init.zeros_(self.net.net[-1].weight)
        nn.init.zeros_(self.net.net[-1].bias)
        self.double()

    def correction(self, s: Tensor, x: Tensor) -> Tensor:
        s = as_time(s, x)
        return self.net((s / self.env.sde.T).to(x.dtype), x.reshape(x.shape[0], -1)).reshape(x.shape)

    def forward(self, s: Tensor, x: Tensor, cond: Any = None) -> Tensor:
        s = as_time(s, x)
        return self.env.pretrained_score(s, x, cond) + self.correction(s, x)
