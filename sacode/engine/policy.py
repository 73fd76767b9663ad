"""Policies: trainable scores s_theta(s, x, c), the mean of the Gaussian score-action policy (chapter 3)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..dynamics.shapes import as_time
from ..theory.conditions import Conditions
from .nets import MLP


class ScorePolicy(nn.Module):
    """Base class: ``forward(s, x, cond)`` returns the score (the action mean) at diffusion time s."""

    def forward(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def score_fn(self, cond: Conditions | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """The policy as a sampler score function ``score(s, x)`` for fixed conditions."""
        return lambda s, x: self(s, x, cond)

    def checkpoint_state(self) -> dict:
        """What a checkpoint stores of the policy (default: the whole state dict; a LoRA policy keeps its adapter)."""
        return self.state_dict()

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state)


class FixedScorePolicy(ScorePolicy):
    """A non-trainable policy from a score function: a closed-form optimum, or the pretrained sampler itself.

    ``score(s, x)``, or ``score(s, x, cond)`` with ``conditional=True`` (e.g. an environment's pretrained score).
    """

    def __init__(self, score: Callable[..., Tensor], conditional: bool = False):
        super().__init__()
        self.fn, self.conditional = score, conditional

    @classmethod
    def pretrained(cls, env) -> "FixedScorePolicy":
        """The pretrained sampler of ``env`` as a policy (the fine-tuning baseline)."""
        return cls(env.pretrained_score, conditional=True)

    def forward(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        return self.fn(s, x, cond) if self.conditional else self.fn(s, x)


class ResidualMLPPolicy(ScorePolicy):
    """s_theta(s, x) = s_pre(s, x) + c_theta(s, x) with an MLP correction initialised to zero.

    At initialisation the policy *is* the pretrained sampler, as fine-tuning requires. On the toys the optimal
    correction (grad V* / beta, chapter 5) is O(1) at every noise level, so it is not rescaled.
    """

    def __init__(self, env, hidden: int = 64, depth: int = 2, n_freq: int = 4):
        super().__init__()
        self.env = env
        self.d = math.prod(env.event_shape)
        self.net = MLP(self.d, self.d, hidden, depth, n_freq)
        nn.init.zeros_(self.net.net[-1].weight)
        nn.init.zeros_(self.net.net[-1].bias)
        self.double()

    def correction(self, s: Tensor, x: Tensor) -> Tensor:
        s = as_time(s, x)
        return self.net((s / self.env.sde.T).to(x.dtype), x.reshape(x.shape[0], -1)).reshape(x.shape)

    def forward(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        s = as_time(s, x)
        return self.env.pretrained_score(s, x, cond) + self.correction(s, x)
