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


class PerStepPolicy(ScorePolicy):
    """s_theta(s, x) = s_pre(s, x) + c_{k(s)}(x): a separate MLP correction per step of a reference grid, with no
    time input (chapter 10). It is the control against which the continuous-time score parameterisation is judged:
    a discrete-time policy, a table of per-step networks indexed by the step.

    On its reference grid (the training grid) step k uses network k. On any other grid a time s uses the network of
    the reference step that contains it, the step k whose start s_k is the last reference time with s_k >= s (in RL
    time: the last t_k <= t), as a discrete-time policy's lookup table would; this is the "previous" extension of
    :meth:`sacode.theory.discrete_optimum.DiscreteOptimum.offsets`. Each correction starts at zero, so the policy
    starts as the pretrained sampler.

    Args:
        env: the environment (its pretrained score and event shape).
        grid_s: diffusion times s_0 = T > ... > s_K of the reference grid (``TimeGrid.s``).
    """

    def __init__(self, env, grid_s: Tensor, hidden: int = 64, depth: int = 2):
        super().__init__()
        self.env = env
        self.d = math.prod(env.event_shape)
        self.register_buffer("s_ref", torch.as_tensor(grid_s, dtype=torch.float64).clone())
        self.nets = nn.ModuleList(self._net(hidden, depth) for _ in range(self.K))
        self.double()

    def _net(self, hidden: int, depth: int) -> nn.Sequential:
        layers, w = [], self.d
        for _ in range(depth):
            layers += [nn.Linear(w, hidden), nn.SiLU()]
            w = hidden
        last = nn.Linear(w, self.d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(*layers, last)

    @property
    def K(self) -> int:
        """Number of steps of the reference grid (and of networks)."""
        return self.s_ref.numel() - 1

    def step_index(self, s: Tensor) -> Tensor:
        """The reference step containing each diffusion time s: the last k < K with s_k >= s (shape (n,), long)."""
        tol = 1e-9 * float(self.s_ref[0])                  # times on the reference grid map to their own step
        idx = (self.s_ref[:-1][None, :] >= s.reshape(-1, 1).to(self.s_ref) - tol).sum(1) - 1
        return idx.clamp(0, self.K - 1)

    def correction(self, s: Tensor, x: Tensor) -> Tensor:
        s = as_time(s, x)
        flat = x.reshape(x.shape[0], -1)
        idx = self.step_index(s)
        if bool((idx == idx[0]).all()):                     # one step (a rollout step): one network
            return self.nets[int(idx[0])](flat).reshape(x.shape)
        out = torch.zeros_like(flat)
        for k in torch.unique(idx).tolist():
            sel = idx == k
            out = out.index_put((sel,), self.nets[k](flat[sel]))
        return out.reshape(x.shape)

    def forward(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        s = as_time(s, x)
        return self.env.pretrained_score(s, x, cond) + self.correction(s, x)
