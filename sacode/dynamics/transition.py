"""The Gaussian transition x_{k+1} | x_k of a sampler on any grid, as a function of the score (chapters 3 and 10).

A :class:`Transition` fixes a sampler method and its noise (eta, state exploration, action exploration) and gives,
for any score function and any step s_k -> s_{k+1}, the mean and std of the next state. Rollouts, training passes
and the exact recursions all go through it, so a recomputed log-density equals the recorded one when the score has
not changed.

Deterministic samplers (the probability-flow ODE, DDIM with eta = 0) have no transition density. Adding Gaussian
exploration x_{k+1} = m(x_k) + explore sqrt(h) z makes them Gaussian steps again (chapter 10).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gaussian_step import AFFINE_METHODS, ActionStd, gaussian_log_prob, gaussian_step
from .samplers import METHODS, STOCHASTIC, pf_heun_step
from .sde import LinearSDE, ScoreFn
from .shapes import as_time


class Transition:
    """Mean and std of x_{k+1} | x_k for ``method`` (``em``, ``ddim``, ``pf-euler``, ``pf-heun``).

    Args:
        sde: the forward SDE.
        method, eta: the sampler and its noise level.
        explore: state exploration noise for deterministic samplers (std explore sqrt(h)); a stochastic sampler keeps
            its own noise and ignores it.
        action_std: Gaussian action exploration a ~ N(score, action_std^2 I) (a number or a function of RL time);
            the policy-Euler step of chapter 3.
        brownian: keep the sampler's own noise (False: the noiseless Euler step with sampled actions, chapter 3).
    """

    def __init__(self, sde: LinearSDE, method: str = "em", eta: float = 1.0, explore: float = 0.0,
                 action_std: ActionStd = 0.0, brownian: bool = True):
        if method not in METHODS:
            raise ValueError(f"unknown sampler method {method!r}; choose one of {', '.join(METHODS)}")
        self.sde, self.method, self.eta, self.explore = sde, method, float(eta), float(explore)
        self.action_std, self.brownian = action_std, bool(brownian)
        own_noise = STOCHASTIC[method] and self.eta > 0 and self.brownian
        self.deterministic = not own_noise
        self._state_noise = self.explore if self.deterministic else 0.0
        if self.deterministic and self.explore <= 0 and not (callable(action_std) or float(action_std) > 0):
            raise ValueError(f"sampler {method!r} with eta={eta} is deterministic: its transitions have no density. "
                             f"Set an exploration noise (explore > 0) to fine-tune through it (chapter 10).")
        if method == "pf-heun" and (callable(action_std) or float(action_std) > 0):
            raise ValueError("action exploration needs a step that is affine in a single score; pf-heun evaluates the "
                             "score twice; use explore > 0 instead")

    def mean_std(self, score_fn: ScoreFn, x: Tensor, s_cur: float | Tensor, s_next: float | Tensor
                 ) -> tuple[Tensor, Tensor]:
        """Mean (like x) and std (n,) of x_{k+1} given x_k = x, with the action score_fn(s_cur, x)."""
        s, sn = as_time(s_cur, x), as_time(s_next, x)
        if self.method in AFFINE_METHODS:
            st = gaussian_step(self.sde, s, sn, self.method, self.eta, self._state_noise, self.action_std, self.brownian)
            mean, std = st.mean(x, score_fn(s, x)), st.std
        else:
            mean = pf_heun_step(self.sde, score_fn, x, s, sn).mean
            std = self.explore * torch.sqrt(s - sn)
        if not bool((std > 0).all()):
            raise ValueError(f"the {self.method!r} step from s={float(torch.as_tensor(s_cur).max()):.3g} to "
                             f"s={float(torch.as_tensor(s_next).min()):.3g} is deterministic (zero variance), so it has "
                             f"no transition density; end the time grid at s_end > 0 (config key s_end)")
        return mean, std

    def log_prob(self, score_fn: ScoreFn, x: Tensor, x_next: Tensor, s_cur, s_next) -> Tensor:
        """log N(x_next; mean, std^2 I), summed over dimensions, shape (n,)."""
        mean, std = self.mean_std(score_fn, x, s_cur, s_next)
        return gaussian_log_prob(x_next, mean, std)

    def __repr__(self):
        extra = f", explore={self.explore}" if self.explore else ""
        return f"Transition({self.method!r}, eta={self.eta}{extra})"
