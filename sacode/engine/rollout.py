"""Rollouts: sample trajectories of the policy and record what every algorithm needs.

For each step k (diffusion time s_k -> s_{k+1}, RL time t_k -> t_{k+1}) a stochastic sampler step is the
Gaussian transition x_{k+1} ~ N(m_theta(x_k), c_k^2 I). We record the states, the log-density of the realised
transition (summed over dimensions, DESIGN.md decision 6), the pretrained score at x_k, and the per-step KL

    KL_k = || m_theta(x_k) - m_pre(x_k) ||^2 / (2 c_k^2),

whose sum over steps is the discrete path KL (chapter 4); it converges to E int g^2/2 ||s_theta - s_pre||^2 dt.
Deterministic samplers (PF-ODE, DDIM eta=0) get explicit Gaussian exploration x_{k+1} = m(x_k) + sigma_e sqrt(dt) z
(theory-notes section 2.7), which makes the same formulas apply with c_k = sigma_e sqrt(dt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._shapes import as_time, expand_time, sum_event
from ..samplers import STOCHASTIC, TimeGrid, gaussian_log_prob, get_step


@dataclass
class Rollout:
    """A batch of n trajectories on a grid of K steps (all tensors detached)."""

    grid: TimeGrid
    xs: Tensor            # (K+1, n, *event)
    log_probs: Tensor     # (K, n)   behaviour-policy log-density of x_{k+1} | x_k
    stds: Tensor          # (K, n)   transition std c_k
    pre_means: Tensor     # (K, n, *event) pretrained transition mean m_pre(x_k)
    kl_steps: Tensor      # (K, n)   per-step KL between policy and pretrained transitions
    log_ratio_steps: Tensor  # (K, n) sampled log(pi_theta / p_pre)(x_{k+1} | x_k); its expectation is KL_k
    rewards: Tensor       # (n,)
    cond: Any
    pre_scores: Tensor | None = None   # (K, n, *event) pretrained score s_pre(s_k, x_k) (Tweedie for value networks)

    @property
    def n(self) -> int:
        return self.xs.shape[1]

    @property
    def K(self) -> int:
        return self.grid.K

    @property
    def kl_path(self) -> Tensor:
        """Discrete path KL of each trajectory, shape (n,)."""
        return self.kl_steps.sum(0)


class StepModel:
    """One sampler step as a function of the score: mean and std of x_{k+1} | x_k on a given method.

    Wraps :func:`sacode.samplers.get_step` so that rollouts and training passes use the *same* formula, which
    makes a recomputed log-density equal the stored one when the weights have not changed.
    """

    def __init__(self, sde, method: str = "em", eta: float = 1.0, explore: float = 0.0):
        self.sde, self.method, self.eta, self.explore = sde, method, float(eta), float(explore)
        self.step = get_step(method)
        self.deterministic = not (STOCHASTIC[method] and self.eta > 0)
        if self.deterministic and self.explore <= 0:
            raise ValueError(f"sampler {method!r} with eta={eta} is deterministic: its transitions have no density. "
                             f"Set an exploration noise (explore > 0) to fine-tune through it (chapter 9).")

    def mean_std(self, score_fn, x: Tensor, s_cur: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
        st = self.step(self.sde, score_fn, x, s_cur, s_next, None, eta=self.eta)
        std = st.std
        if self.deterministic:
            h = as_time(s_cur, x) - as_time(s_next, x)
            std = self.explore * torch.sqrt(h)
        elif not bool((std > 0).all()):
            raise ValueError(f"the {self.method!r} step from s={float(torch.as_tensor(s_cur).max()):.3g} to "
                             f"s={float(torch.as_tensor(s_next).min()):.3g} is deterministic (zero variance), so it has "
                             f"no transition density; end the time grid at s_end > 0 (config key s_end)")
        return st.mean, std

    def log_prob(self, score_fn, x: Tensor, x_next: Tensor, s_cur: Tensor, s_next: Tensor) -> Tensor:
        mean, std = self.mean_std(score_fn, x, s_cur, s_next)
        return gaussian_log_prob(x_next, mean, std)


def randn_on(generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device and moved to like's device
    (one CPU generator then drives CPU and GPU runs alike, as diffusers' randn_tensor does)."""
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
    return z.to(like.device)


def per_step_kl(mean_a: Tensor, mean_b: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean_a, std^2 I) || N(mean_b, std^2 I)) = ||mean_a - mean_b||^2 / (2 std^2), shape (n,)."""
    return sum_event((mean_a - mean_b) ** 2) / (2 * std**2)


@torch.no_grad()
def rollout(env, policy, grid: TimeGrid, stepper: StepModel, n: int, generator: torch.Generator,
            cond: Any = None) -> Rollout:
    """Sample n trajectories of ``policy`` in ``env`` along ``grid`` and record them (no gradients)."""
    if cond is None:
        cond = env.sample_conditions(n, generator)
    x = env.sample_init(n, generator)
    pol = policy.score_fn(cond)
    first_pre: list[Tensor] = []

    def pre(s, y):          # the pretrained score; its first call in a step is at (s_k, x_k): keep it
        out = env.pretrained_score(s, y, cond)
        if not first_pre:
            first_pre.append(out)
        return out

    xs, lps, stds, pre_means, kls, lrs, pre_scores = [x], [], [], [], [], [], []
    for k in range(grid.K):
        s_c, s_n = grid.s[k], grid.s[k + 1]
        mean, std = stepper.mean_std(pol, x, s_c, s_n)
        first_pre.clear()
        mean_pre, _ = stepper.mean_std(pre, x, s_c, s_n)
        pre_scores.append(first_pre[0].detach())
        z = randn_on(generator, x)
        x_next = mean + expand_time(std, x) * z
        if not torch.isfinite(x_next).all():
            raise FloatingPointError(f"NaN/inf in the rollout at step {k} (s = {float(s_c):.4g}); the policy "
                                     f"diverged: lower the learning rate or raise the KL weight beta")
        lps.append(gaussian_log_prob(x_next, mean, std))
        lrs.append(lps[-1] - gaussian_log_prob(x_next, mean_pre, std))
        stds.append(std)
        pre_means.append(mean_pre)
        kls.append(per_step_kl(mean, mean_pre, std))
        xs.append(x_next)
        x = x_next
    rewards = env.reward(x, cond)
    return Rollout(grid, torch.stack(xs), torch.stack(lps), torch.stack(stds), torch.stack(pre_means),
                   torch.stack(kls), torch.stack(lrs), rewards.detach(), cond, torch.stack(pre_scores))
