"""The reverse sampler as a controlled SDE: the score is the action (chapter 3). This module holds the objects that
chapter 3 teaches *and* that the fine-tuning engine runs: the control problem (every environment is one), the
Gaussian score-action policy, and the one rollout loop.

In RL time t = T - s (t = 0 noise, t = T data; conversions through :mod:`sacode.dynamics.time`) the pretrained
sampler is the controlled state equation dX_t = b(t, X_t, a_t) dt + sigma(t) dB_t with

    b(t, x, a) = -f(T - t, x) + g(T - t)^2 a,          sigma(t) = g(T - t),

and the action a in R^d is the value of the score (Zhao et al. 2024, 2025). The action enters the drift only,
and affinely. Fine-tuning maximises E[r(X_T)] - beta KL(P^theta || P^pre); by Girsanov (chapter 4) the KL
is the integral of the running reward

    r(t, x, a) = -(beta / 2) g(T - t)^2 || a - s_pre(T - t, x) ||^2.

A Gaussian score-action policy pi(a | t, x) = N(mu(t, x), std(t)^2 I) explores around its mean. Because b is
affine in a and sigma does not depend on a, the exploratory (relaxed) SDE of Wang, Zariphopoulou and Zhou
(2020) averages the drift over pi: dX = b(t, X, mu(t, X)) dt + sigma(t) dB. The exploration covariance does
not change the continuous-time state law.

Discretisation identity (chapter 3). Every Gaussian step of the samplers has a mean affine in the score,
x_{k+1} = A_k x_k + B_k score(s_k, x_k) + std_k z (:func:`sacode.dynamics.gaussian_step.gaussian_step`), so it *is*
the deterministic map x_{k+1} = A_k x_k + B_k a_k with a score-action a_k ~ N(score, (std_k/B_k)^2 I). For
Euler-Maruyama (eta = 1), B_k = g^2 dt and std_k = g sqrt(dt), so the policy covariance is I / (g^2 dt). By the
change of variables, log p(x_{k+1} | x_k) = log pi(a_k | t_k, x_k) - d log |B_k|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..dynamics.gaussian_step import GaussianStep, gaussian_log_prob, gaussian_step, randn_on, transition_kl
from ..dynamics.grid import TimeGrid
from ..dynamics.sde import LinearSDE, ScoreFn
from ..dynamics.shapes import as_time, event_dim, expand_time, sum_event
from ..dynamics.time import diffusion_time
from ..dynamics.transition import Transition
from .conditions import Conditions

StdFn = Callable[[Tensor], Tensor]
"""An exploration std ``std(t)``: RL time t of shape (n,) -> std of shape (n,)."""


# ------------------------------------------------------------------------------------------------
# the control problem (the base class of every environment of the engine)
# ------------------------------------------------------------------------------------------------
class ScoreControlProblem:
    """The fine-tuning problem as a stochastic control problem in RL time (chapter 3).

    It is also the engine's *environment*: a forward SDE, a pretrained score s_pre(s, x, c), an initial law, a
    condition sampler and a terminal reward r(x, c). The toys use it as it is; digits and Stable Diffusion subclass
    it (their scores are networks, their conditions class labels or prompts).

    Args:
        sde: the forward SDE (diffusion time s).
        s_pre: the pretrained score ``s_pre(s, x)`` in diffusion time (subclasses override
            :meth:`pretrained_score` instead).
        reward: terminal reward r(x) (x of shape (n, *event) -> (n,)), or None when only the dynamics are used.
        beta: KL weight beta >= 0.
        event_shape: the shape of one state (() for a 1-D law on x of shape (n,)).
        dtype: dtype of the states (float64 for the closed-form checks).
    """

    reward_differentiable: bool = True

    def __init__(self, sde: LinearSDE, s_pre: ScoreFn | None, reward: Callable[[Tensor], Tensor] | None = None,
                 beta: float = 1.0, event_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64):
        if beta < 0:
            raise ValueError(f"the KL weight beta must be >= 0; got {beta}")
        self.sde, self.s_pre, self.reward_fn, self.beta = sde, s_pre, reward, float(beta)
        self.event_shape, self.dtype = tuple(event_shape), dtype

    @property
    def T(self) -> float:
        return self.sde.T

    def _s(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Diffusion time s = T - t of RL time t, shape (n,)."""
        return diffusion_time(as_time(t, x), self.T)

    # --- the environment interface of the engine -------------------------------------------------------------
    def sample_init(self, n: int, generator: torch.Generator) -> Tensor:
        """x_0 ~ N(0, p^2 I), the sampler's prior (held fixed: chapter 5)."""
        return self.sde.prior_sample((n, *self.event_shape), generator, dtype=self.dtype)

    def sample_conditions(self, n: int, generator: torch.Generator) -> Conditions:
        """The conditions (prompts, labels) of n samples: none for an unconditional problem."""
        return Conditions.none(n)

    def pretrained_score(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        """s_pre(s, x, c) at diffusion time s."""
        if self.s_pre is None:
            raise ValueError(f"{type(self).__name__} has no pretrained score; pass s_pre=... when building it")
        return self.s_pre(s, x)

    def reward(self, x: Tensor, cond: Conditions | None = None) -> Tensor:
        """r(x, c), the reward of the generated sample X_T, shape (n,)."""
        if self.reward_fn is None:
            raise ValueError("this ScoreControlProblem has no terminal reward; pass reward=... when building it")
        return self.reward_fn(x)

    def time_grid(self, K: int) -> TimeGrid | None:
        """The problem's own K-step grid (e.g. a diffusers scheduler's), or None to use the engine's grids."""
        return None

    def value_correction(self, hidden: int = 64, depth: int = 2) -> torch.nn.Module | None:
        """The learned branch of a structured value network suited to these states, or None for a plain MLP."""
        return None

    # --- dynamics ---------------------------------------------------------------------------------
    def b(self, t: float | Tensor, x: Tensor, a: Tensor) -> Tensor:
        """State drift b(t, x, a) = -f(T - t, x) + g(T - t)^2 a (chapter 3, eq. ch03-state)."""
        if a.shape != x.shape:
            raise ValueError(f"the action must have the shape of the state {tuple(x.shape)}; got {tuple(a.shape)}")
        s = self._s(t, x)
        return -self.sde.drift(s, x) + expand_time(self.sde.g2(s), x) * a

    def sigma(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Diffusion coefficient sigma(t) = g(T - t), per sample, shape (n,) (it depends on t only)."""
        return self.sde.g(self._s(t, x))

    def pretrained_action(self, t: float | Tensor, x: Tensor) -> Tensor:
        """The pretrained score as an action: s_pre(T - t, x)."""
        return self.pretrained_score(self._s(t, x), x)

    # --- rewards ----------------------------------------------------------------------------------
    def running_reward(self, t: float | Tensor, x: Tensor, a: Tensor) -> Tensor:
        """r(t, x, a) = -(beta/2) g(T - t)^2 ||a - s_pre(T - t, x)||^2, shape (n,) (chapter 3)."""
        s = self._s(t, x)
        return -0.5 * self.beta * self.sde.g2(s) * sum_event((a - self.pretrained_score(s, x)) ** 2)

    def mean_running_reward(self, t: float | Tensor, x: Tensor, policy: "ScoreActionPolicy") -> Tensor:
        """E_{a ~ pi}[r(t, x, a)] = -(beta/2) g^2 (||mu - s_pre||^2 + tr Sigma_t) (chapter 3, eq. ch03-mean-reward)."""
        s = self._s(t, x)
        tr = event_dim(x) * policy.std(t, x) ** 2
        return -0.5 * self.beta * self.sde.g2(s) * (sum_event((policy.mean(t, x) - self.pretrained_score(s, x)) ** 2)
                                                    + tr)

    def exploratory_sde(self, policy: "ScoreActionPolicy", event_shape: tuple[int, ...] | None = None
                        ) -> "ExploratorySDE":
        """The relaxed SDE dX = b(t, X, mu(t, X)) dt + sigma(t) dB (torchsde protocol, with the prior drift h)."""
        return ExploratorySDE(self, policy, event_shape)

    def __repr__(self):
        return f"{type(self).__name__}(sde={self.sde!r}, beta={self.beta}, reward={self.reward_fn!r})"


# ------------------------------------------------------------------------------------------------
# the Gaussian score-action policy
# ------------------------------------------------------------------------------------------------
class ScoreActionPolicy:
    """pi(a | t, x) = N(mu(t, x), std(t)^2 I) with mean mu(t, x) = mean_score(T - t, x) (chapter 3).

    Args:
        mean_score: the mean as a score ``score(s, x)`` in diffusion time (pretrained or fine-tuned).
        std: the exploration std, a float or a callable ``std(t)`` of RL time (shape (n,) -> (n,)).
        T: horizon (``sde.T``).
    """

    def __init__(self, mean_score: ScoreFn, std: float | StdFn, T: float):
        if not callable(std):
            if not (float(std) >= 0 and math.isfinite(float(std))):
                raise ValueError(f"the exploration std must be a finite number >= 0; got {std}")
        self.mean_score, self._std, self.T = mean_score, std, float(T)

    def score_fn(self, cond: Conditions | None = None) -> ScoreFn:
        """The policy mean as a sampler score ``score(s, x)`` (what :func:`rollout` calls)."""
        return self.mean_score

    def mean(self, t: float | Tensor, x: Tensor) -> Tensor:
        """mu(t, x) = mean_score(T - t, x)."""
        return self.mean_score(diffusion_time(as_time(t, x), self.T), x)

    def std(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Exploration std at RL time t, shape (n,)."""
        tt = as_time(t, x)
        if callable(self._std):
            out = torch.as_tensor(self._std(tt), dtype=x.dtype, device=x.device)
            return out.expand(x.shape[0]) if out.ndim == 0 else out
        return torch.full_like(tt, float(self._std))

    def std_fn(self) -> float | StdFn:
        """The exploration std as given (a number or a function of RL time)."""
        return self._std

    def transition(self, sde: LinearSDE, brownian: bool = True) -> Transition:
        """The policy-Euler step of chapter 3: x' = x + b(t, x, a) dt [+ g sqrt(dt) z], a ~ pi(. | t, x), as a Gaussian
        transition (mean x + b(t, x, mu) dt, variance g^4 dt^2 std^2 [+ g^2 dt]) for :func:`rollout`."""
        return Transition(sde, "em", 1.0, action_std=self._std, brownian=brownian)

    def log_prob(self, t: float | Tensor, x: Tensor, a: Tensor) -> Tensor:
        """log pi(a | t, x), summed over the event dimensions; shape (n,)."""
        std = self.std(t, x)
        if not bool((std > 0).all()):
            raise ValueError("log_prob needs a positive exploration std; a deterministic policy has no density")
        return gaussian_log_prob(a, self.mean(t, x), std)

    def sample(self, t: float | Tensor, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a ~ pi(. | t, x)."""
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.mean(t, x) + expand_time(self.std(t, x), x) * z

    def entropy(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Differential entropy d/2 log(2 pi e std^2), shape (n,)."""
        return 0.5 * event_dim(x) * torch.log(2 * math.pi * math.e * self.std(t, x) ** 2)

    @classmethod
    def of_sampler(cls, sde: LinearSDE, score_fn: ScoreFn, grid: TimeGrid, method: str = "em",
                   eta: float = 1.0) -> "ScoreActionPolicy":
        """The score-action policy that a Gaussian sampler step *is*: std(t_k) = std_k / |B_k| on ``grid``.

        The policy is defined at the grid's step-start times t_0, ..., t_{K-1} only (a different step size is a
        different policy); other times raise an error.
        """
        pstd = gaussian_step(sde, grid.s[:-1], grid.s[1:], method, eta).policy_std
        tk = grid.t[:-1]

        def std(t: Tensor) -> Tensor:
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
            k = torch.argmin((t[:, None] - tk[None, :]).abs(), dim=1)
            if not bool(((t - tk[k]).abs() <= 1e-12 * max(1.0, grid.T)).all()):
                raise ValueError("this policy comes from a sampler step and is defined only at the step-start "
                                 "RL times grid.t[:-1]; evaluate it there")
            return pstd[k]

        return cls(score_fn, std, grid.T)


class ExploratorySDE:
    """The exploratory (relaxed) SDE dX = b(t, X, mu(t, X)) dt + sigma(t) dB in RL time (chapter 3).

    torchsde protocol (diagonal Ito noise, y of shape (n, d)); ``h`` is the pretrained drift b(t, x, s_pre), so
    ``torchsde.sdeint(sde, y0, ts, logqp=True)`` returns the Girsanov log-ratio increments of chapter 4.
    ``event_shape`` reshapes torchsde's (n, d) states for the score functions ((), for a 1-D law on x of shape (n,)).
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, problem: ScoreControlProblem, policy: ScoreActionPolicy,
                 event_shape: tuple[int, ...] | None = None):
        if abs(policy.T - problem.T) > 1e-12:
            raise ValueError(f"policy horizon T={policy.T} differs from the problem's T={problem.T}")
        self.problem, self.policy, self.event_shape = problem, policy, event_shape

    def _x(self, y: Tensor) -> Tensor:
        return y if self.event_shape is None else y.reshape(y.shape[0], *self.event_shape)

    def drift(self, t: float | Tensor, x: Tensor) -> Tensor:
        return self.problem.b(t, x, self.policy.mean(t, x))

    def prior_drift(self, t: float | Tensor, x: Tensor) -> Tensor:
        return self.problem.b(t, x, self.problem.pretrained_action(t, x))

    def diffusion(self, t: float | Tensor, x: Tensor) -> Tensor:
        return expand_time(self.problem.sigma(t, x), x).expand_as(x)

    # torchsde protocol
    def f(self, t: Tensor, y: Tensor) -> Tensor:
        return self.drift(t.to(y.dtype), self._x(y)).reshape(y.shape)

    def h(self, t: Tensor, y: Tensor) -> Tensor:
        return self.prior_drift(t.to(y.dtype), self._x(y)).reshape(y.shape)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        return self.diffusion(t.to(y.dtype), self._x(y)).reshape(y.shape)


# ------------------------------------------------------------------------------------------------
# sampler steps as score-action policies
# ------------------------------------------------------------------------------------------------
def action_of_transition(x: Tensor, x_next: Tensor, step: GaussianStep) -> Tensor:
    """The score-action a_k = (x_{k+1} - A x_k) / B that realises the transition x_k -> x_{k+1}."""
    A, B = expand_time(torch.as_tensor(step.A), x), expand_time(torch.as_tensor(step.B), x)
    return (x_next - A * x) / B


def transition_log_prob_via_policy(policy: ScoreActionPolicy, t: float | Tensor, x: Tensor, x_next: Tensor,
                                   step: GaussianStep) -> Tensor:
    """log p(x_{k+1} | x_k) = log pi(a_k | t_k, x_k) - d log |B_k| (change of variables a -> A x + B a).

    ``policy`` must have std = step.policy_std at t (e.g. :meth:`ScoreActionPolicy.of_sampler`).
    """
    a = action_of_transition(x, x_next, step)
    B = torch.as_tensor(step.B, dtype=x.dtype, device=x.device)
    return policy.log_prob(t, x, a) - event_dim(x) * torch.log(B.abs()).expand(x.shape[0])


# ------------------------------------------------------------------------------------------------
# the rollout loop (chapter 3's sampler with a policy; the engine's data)
# ------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """A batch of n trajectories on a grid of K steps (all tensors detached).

    For each step k (diffusion time s_k -> s_{k+1}, RL time t_k -> t_{k+1}) the transition is the Gaussian
    x_{k+1} ~ N(m_theta(x_k), c_k^2 I) of the rollout's :class:`~sacode.dynamics.transition.Transition`. Recorded:
    the states, the log-density of the realised transition (summed over dimensions), the pretrained step mean and
    score at x_k, and the per-step KL KL_k = ||m_theta(x_k) - m_pre(x_k)||^2 / (2 c_k^2), whose sum over steps is the
    exact KL between the fine-tuned and the pretrained Markov chains (chapter 4).
    """

    grid: TimeGrid
    xs: Tensor               # (K+1, n, *event)
    log_probs: Tensor        # (K, n)   behaviour-policy log-density of x_{k+1} | x_k
    stds: Tensor             # (K, n)   transition std c_k
    pre_means: Tensor        # (K, n, *event) pretrained transition mean m_pre(x_k)
    kl_steps: Tensor         # (K, n)   per-step KL between policy and pretrained transitions
    log_ratio_steps: Tensor  # (K, n)   sampled log(pi_theta / p_pre)(x_{k+1} | x_k); its expectation is KL_k
    rewards: Tensor | None   # (n,), None when the problem has no reward
    cond: Conditions
    pre_scores: Tensor | None = None   # (K, n, *event) pretrained score s_pre(s_k, x_k) (Tweedie for value networks)

    @property
    def n(self) -> int:
        return self.xs.shape[1]

    @property
    def K(self) -> int:
        return self.grid.K

    @property
    def x(self) -> Tensor:
        """The terminal states x_K (the generated samples), shape (n, *event)."""
        return self.xs[-1]

    @property
    def kl_path(self) -> Tensor:
        """Discrete path KL of each trajectory, shape (n,)."""
        return self.kl_steps.sum(0)


def _policy_score(policy, cond: Conditions) -> ScoreFn:
    return policy.score_fn(cond) if hasattr(policy, "score_fn") else policy


@torch.no_grad()
def rollout(problem: ScoreControlProblem, policy, grid: TimeGrid, transition: Transition, n: int,
            generator: torch.Generator, cond: Conditions | None = None, x_init: Tensor | None = None,
            with_reward: bool = True) -> Rollout:
    """Sample n trajectories of ``policy`` in ``problem`` along ``grid`` and record them (no gradients).

    ``policy`` is a score-action policy: anything with ``score_fn(cond) -> score(s, x)`` (an engine policy, a
    :class:`ScoreActionPolicy`) or a plain score function. ``x_init`` replaces draws from the problem's prior;
    ``cond`` its condition sampler. Each step draws one standard normal z from ``generator``.
    """
    if abs(grid.T - problem.T) > 1e-12:
        raise ValueError(f"the grid's horizon T={grid.T} differs from the problem's T={problem.T}")
    if cond is None:
        cond = problem.sample_conditions(n, generator)
    x = problem.sample_init(n, generator) if x_init is None else x_init
    pol = _policy_score(policy, cond)
    first_pre: list[Tensor] = []

    def pre(s, y):          # the pretrained score; its first call in a step is at (s_k, x_k): keep it
        out = problem.pretrained_score(s, y, cond)
        if not first_pre:
            first_pre.append(out)
        return out

    xs, lps, stds, pre_means, kls, lrs, pre_scores = [x], [], [], [], [], [], []
    for k in range(grid.K):
        s_c, s_n = grid.s[k], grid.s[k + 1]
        mean, std = transition.mean_std(pol, x, s_c, s_n)
        first_pre.clear()
        mean_pre, _ = transition.mean_std(pre, x, s_c, s_n)
        pre_scores.append(first_pre[0].detach())
        x_next = mean + expand_time(std, x) * randn_on(generator, x)
        if not torch.isfinite(x_next).all():
            raise FloatingPointError(f"NaN/inf in the rollout at step {k} (s = {float(s_c):.4g}); the policy "
                                     f"diverged: lower the learning rate or raise the KL weight beta")
        lps.append(gaussian_log_prob(x_next, mean, std))
        lrs.append(lps[-1] - gaussian_log_prob(x_next, mean_pre, std))
        stds.append(std)
        pre_means.append(mean_pre)
        kls.append(transition_kl(mean, mean_pre, std))
        xs.append(x_next)
        x = x_next
    rewards = problem.reward(x, cond).detach() if with_reward else None
    return Rollout(grid, torch.stack(xs), torch.stack(lps), torch.stack(stds), torch.stack(pre_means),
                   torch.stack(kls), torch.stack(lrs), rewards, cond, torch.stack(pre_scores))


__all__ = ["ScoreControlProblem", "ScoreActionPolicy", "ExploratorySDE", "action_of_transition",
           "transition_log_prob_via_policy", "Rollout", "rollout"]
