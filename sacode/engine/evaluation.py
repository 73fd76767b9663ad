"""Evaluation of a policy: a seeded rollout summarised as J = E r - beta KL (with its standard error), the terminal
law and, against a closed-form target, the error of the terminal mean (chapters 8-11).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..dynamics.grid import TimeGrid
from ..dynamics.samplers import reverse_sde_sample
from ..dynamics.transition import Transition
from ..theory.control import rollout
from ..theory.estimate import MeanSE, mean_se

EVAL_SEED = 12345
"""Seed of evaluation rollouts (a common random number across the policies that are compared)."""


@dataclass
class Evaluation:
    """Terminal samples x (n, *event), per-sample reward and path KL (None through a sampler without a transition
    density), and the KL weight beta."""

    x: Tensor
    reward: Tensor
    kl: Tensor | None
    beta: float

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def objective(self) -> Tensor:
        """Per-sample r(x_K) - beta KL_path; its mean estimates J_K."""
        if self.kl is None:
            raise ValueError("this evaluation ran a sampler without a transition density: it has no path KL and no J")
        return self.reward - self.beta * self.kl

    @property
    def J(self) -> MeanSE:
        """J = E r - beta KL with its standard error."""
        return mean_se(self.objective)

    def mean_se(self, v: Tensor) -> tuple[float, float]:
        """Sample mean and standard error of per-sample values v."""
        return tuple(mean_se(v.reshape(self.n, -1) if v.ndim > 1 else v))

    @property
    def terminal_mean(self) -> Tensor:
        return self.x.reshape(self.n, -1).mean(0)

    @property
    def terminal_mean_se(self) -> Tensor:
        return self.x.reshape(self.n, -1).std(0) / math.sqrt(self.n)

    @property
    def terminal_var(self) -> Tensor:
        return self.x.reshape(self.n, -1).var(0)

    def record(self, target_mean: Tensor) -> dict:
        """A JSON-ready summary against a target terminal mean: err_mean = |E x - target| (with the largest
        coordinate SE, se_mean), J and its SE, reward, KL and the mean itself."""
        xf = self.x.reshape(self.n, -1)
        out = {"err_mean": float((xf.mean(0) - target_mean.reshape(-1)).norm()),
               "se_mean": float(xf.std(0).max() / math.sqrt(self.n)),
               "reward": float(self.reward.mean()), "mean": xf.mean(0).tolist()}
        if self.kl is None:
            return out | {"J": None, "J_se": None, "kl": None}
        J = self.J
        return out | {"J": J.mean, "J_se": J.se, "kl": float(self.kl.mean())}


def evaluate(env, policy, grid: TimeGrid, transition: Transition, n: int, beta: float | None = None,
             seed: int = EVAL_SEED) -> Evaluation:
    """n trajectories of ``policy`` on ``grid`` from a generator seeded with ``seed``; beta defaults to env.beta."""
    b = rollout(env, policy, grid, transition, n, torch.Generator().manual_seed(seed))
    return Evaluation(b.x, b.rewards, b.kl_path, env.beta if beta is None else float(beta))


@torch.no_grad()
def evaluate_deterministic(env, policy, grid: TimeGrid, method: str, eta: float, n: int,
                           seed: int = EVAL_SEED) -> Evaluation:
    """Evaluation through a sampler without a transition density (DDIM with eta = 0, Heun): samples and rewards
    only (no path KL)."""
    gen = torch.Generator().manual_seed(seed)
    cond = env.sample_conditions(n, gen)
    x = reverse_sde_sample(env.sde, policy.score_fn(cond), env.sample_init(n, gen), grid, method, eta,
                           generator=gen).x
    return Evaluation(x, env.reward(x, cond), None, env.beta)


def evaluate_run(trainer, n: int, seed: int = EVAL_SEED, grid: TimeGrid | None = None) -> Evaluation:
    """Evaluate a trainer's current policy on ``grid`` (default: its evaluation grid) with n fresh trajectories."""
    b = trainer.evaluate(n=n, grid=grid, seed=seed)
    return Evaluation(b.x, b.rewards, b.kl_path, float(trainer.algo.beta))
