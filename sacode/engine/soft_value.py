"""The soft value of a frozen sampler, learned from its own samples (chapter 13).

Chapter 5's optimal value is a log-mean-exp over the pretrained sampler, V*(t, x) = beta log E_pre[e^{r(X_T)/beta} |
X_t = x] (Cole-Hopf). Least squares on the returns G = r(X_T) learns E_pre[r | X_t = x] instead (the beta -> infinity
limit). The loss

    l(V; G) = 2 beta^2 (e^u - 1 - u),      u = (G - V)/beta,

is convex in V, equals (G - V)^2 to second order in u, and its conditional mean has derivative
2 beta (1 - e^{-V/beta} E[e^{G/beta} | t, x]) in V, which vanishes exactly at V = beta log E[e^{G/beta} | t, x]. So
regression of a value network on pretrained rollouts with this loss fits V* itself (the exponential, or Bregman,
loss of the log-partition function). :class:`SoftValueLearner` is the :class:`~sacode.engine.value.ValueLearner` with
this loss; :func:`fit_soft_value` samples the frozen sampler and fits, and records what it cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..dynamics.grid import TimeGrid
from ..dynamics.transition import Transition
from ..theory.control import ScoreControlProblem, rollout
from .policy import FixedScorePolicy
from .steering import Cost
from .value import StructuredValue, ValueLearner, returns_to_go, skip_on_rollout

__all__ = ["SoftValueLearner", "SoftValueFit", "fit_soft_value"]


class SoftValueLearner(ValueLearner):
    """Fits V = beta log E[e^{G/beta} | t, x] with the exponential loss (module docstring). ``max_u`` caps u so that
    one outlying return cannot overflow the loss."""

    def __init__(self, value: nn.Module, beta: float, lr: float, epochs: int = 2, minibatch: int = 1024,
                 max_grad_norm: float = 1.0, max_u: float = 30.0):
        super().__init__(value, lr, epochs, minibatch, max_grad_norm)
        if not beta > 0:
            raise ValueError(f"the soft value needs beta > 0; got {beta}")
        self.beta, self.max_u = float(beta), float(max_u)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        u = ((target - pred) / self.beta).clamp(max=self.max_u)
        return (2 * self.beta**2 * (torch.expm1(u) - u)).mean()


@dataclass
class SoftValueFit:
    """The fitted value network, the loss per batch, and the total cost of the fit (rollouts and value passes)."""

    value: nn.Module
    losses: list
    cost: Cost
    n_rollouts: int


def fit_soft_value(problem: ScoreControlProblem, value: nn.Module, grid: TimeGrid, transition: Transition,
                   n_rollouts: int, batch: int, generator: torch.Generator, lr: float = 3e-3, epochs: int = 2,
                   minibatch: int = 1024, beta: float | None = None) -> SoftValueFit:
    """Fit ``value`` to the soft value of the frozen sampler from ``n_rollouts`` pretrained trajectories, ``batch``
    at a time (each batch: ``epochs`` passes over its K n states).

    Cost: K score passes per rollout; a structured value also evaluates the reward of the Tweedie estimate at every
    state (from the recorded scores, no extra score pass); ``epochs`` forward and backward value passes per state.
    """
    beta = float(problem.beta if beta is None else beta)
    learner = SoftValueLearner(value, beta, lr, epochs, minibatch)
    pol = FixedScorePolicy.pretrained(problem)
    losses, done = [], 0
    while done < n_rollouts:
        b = rollout(problem, pol, grid, transition, min(batch, n_rollouts - done), generator)
        skip = skip_on_rollout(value, b)
        losses.append(learner.fit(b, returns_to_go(b, beta, with_kl=False), generator, skip))
        done += b.n
    K = grid.K
    per = Cost(score_fwd=K, reward=1.0 + (K if isinstance(value, StructuredValue) else 0.0),
               value_fwd=epochs * K, value_bwd=epochs * K)
    return SoftValueFit(value, losses, per * n_rollouts, n_rollouts)
