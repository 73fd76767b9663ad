"""Per-trajectory gradient estimates of the engine's algorithms, for measuring estimators (chapter 7).

Each algorithm of :mod:`sacode.engine.algos` updates the policy with the gradient of a surrogate loss built from a
:class:`~sacode.theory.control.Rollout`. At the first optimiser step of an iteration (probability ratio 1) that
gradient is the average over the batch of one estimate per trajectory. This module computes those per-trajectory
estimates by autograd, on the gradient's own scale (the raw advantages, with leave-one-out means as baselines; a
batch-level positive factor such as DDPO's division by the reward std is left out because it changes neither the
direction nor the relative variance):

=================  =================================================================================================
``ddpo``           (R_i - b_i) sum_k grad log p_theta(x_{k+1} | x_k),  R = r(x_K) - beta sum_k log(p_theta/p_pre)
``ctpo``           sum_k [(V(t_{k+1}, x_{k+1}) - V(t_k, x_k) - b_k) grad log p_theta - beta grad KL_k(theta)]
``ctpo-pathwise``  sum_k [grad_theta m_theta(x_k) . grad_x V(t_{k+1}, x_{k+1}) - beta grad KL_k(theta)]
``dpok``           sum_k [(r(x_K) - W(t_k, x_k) - b_k) grad log p_theta - beta grad KL_k(theta)]
``backprop``       grad_theta [r(x_K) - beta sum_k KL_k] along the trajectory's own noise (reparameterised)
=================  =================================================================================================

V(t_K, .) = r exactly, as in the engine. :func:`value_along_states` evaluates a value network and its input gradient
at given states; :mod:`sacode.theory.estimators` has the same estimators in closed form for the affine policies
(:class:`~sacode.engine.affine.AffinePolicy`), and the tests check that both agree trajectory by trajectory.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..dynamics.gaussian_step import gaussian_log_prob, transition_kl
from ..dynamics.shapes import expand_time, sum_event
from ..dynamics.transition import Transition
from ..theory.control import Rollout
from ..theory.estimators import ESTIMATOR_ALGOS
from .value import skip_on_rollout, value_on_rollout

__all__ = ["value_along_states", "leave_one_out", "trajectory_gradients"]


def value_along_states(value: nn.Module, grid, xs: Tensor, cond=None, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """V(t_k, x_k) (K + 1, n) and grad_x V(t_k, x_k) (K + 1, n, *event) of a value network at states xs
    (K + 1, n, *event) on ``grid`` (autograd; the network's own dtype)."""
    K1, n = xs.shape[0], xs.shape[1]
    t = grid.t.to(xs).repeat_interleave(n)
    x = xs.reshape(K1 * n, *xs.shape[2:])
    cond_all = cond.repeat(K1) if cond is not None else None
    vals, grads = [], []
    for j in range(0, x.shape[0], chunk):
        xi = x[j:j + chunk].detach().clone().requires_grad_(True)
        ci = cond_all.index(torch.arange(j, j + xi.shape[0])) if cond_all is not None else None
        v = value(t[j:j + chunk], xi, ci)
        (g,) = torch.autograd.grad(v.sum(), xi)
        vals.append(v.detach())
        grads.append(g.detach())
    return torch.cat(vals).reshape(K1, n), torch.cat(grads).reshape(xs.shape)


def leave_one_out(v: Tensor) -> Tensor:
    """v minus the mean of the other trajectories (last axis): an unbiased per-trajectory baseline."""
    n = v.shape[-1]
    return v - (v.sum(-1, keepdim=True) - v) / (n - 1)


def _advantages(algo: str, env, batch: Rollout, beta: float, value: nn.Module | None) -> Tensor:
    """The per-step (K, n) or per-trajectory (n,) advantages the algorithm's surrogate weights log p_theta with."""
    if algo == "ddpo":
        return leave_one_out(batch.rewards - beta * batch.log_ratio_steps.sum(0))
    if value is None:
        raise ValueError(f"{algo} needs a value network")
    with torch.no_grad():
        v = value_on_rollout(value, batch, skip=skip_on_rollout(value, batch))
    adv = v[1:] - v[:-1] if algo == "ctpo" else batch.rewards[None] - v[:-1]
    return leave_one_out(adv)


def trajectory_gradients(algo: str, env, policy: nn.Module, transition: Transition, batch: Rollout, beta: float,
                         value: nn.Module | None = None) -> Tensor:
    """One gradient estimate per trajectory of ``batch``, shape (n, number of trainable parameters) (module
    docstring). ``value``: the value network ctpo and ctpo-pathwise use, dpok's reward critic for dpok."""
    if algo not in ESTIMATOR_ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ESTIMATOR_ALGOS)}")
    params = [p for p in policy.parameters() if p.requires_grad]
    K, n = batch.K, batch.n
    s = batch.grid.s.to(batch.xs)
    adv = _advantages(algo, env, batch, beta, value) if algo in ("ddpo", "ctpo", "dpok") else None
    gnext = None
    if algo == "ctpo-pathwise":
        if value is None:
            raise ValueError("ctpo-pathwise needs a value network")
        _, g = value_along_states(value, batch.grid, batch.xs, batch.cond)
        xK = batch.xs[-1].detach().clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(env.reward(xK, batch.cond).sum(), xK)
        gnext = torch.cat([g[1:-1], gr[None]], 0)                                  # grad V(t_{k+1}, x_{k+1})
    out = []
    for i in range(n):
        idx = torch.tensor([i])
        cond = batch.cond.index(idx)
        pol = lambda sc, x: policy(sc, x, cond)
        pre = lambda sc, x: env.pretrained_score(sc, x, cond)
        if algo == "backprop":
            x = batch.xs[0, i:i + 1]
            total = torch.zeros((), dtype=x.dtype)
            for k in range(K):
                with torch.no_grad():
                    m_old, std = transition.mean_std(pol, x.detach(), s[k], s[k + 1])
                    z = (batch.xs[k + 1, i:i + 1] - m_old) / expand_time(std, m_old)
                mean, std = transition.mean_std(pol, x, s[k], s[k + 1])
                mean_pre, _ = transition.mean_std(pre, x, s[k], s[k + 1])
                total = total - beta * transition_kl(mean, mean_pre, std).sum()
                x = mean + expand_time(std, mean) * z
            total = total + env.reward(x, cond).sum()
        else:
            x, xn = batch.xs[:-1, i], batch.xs[1:, i]                             # (K, *event)
            mean, std = transition.mean_std(pol, x, s[:-1], s[1:])
            if algo == "ddpo":
                total = adv[i] * gaussian_log_prob(xn, mean, std).sum()
            else:
                kl = transition_kl(mean, batch.pre_means[:, i], std).sum()
                if algo == "ctpo-pathwise":
                    total = sum_event(gnext[:, i] * mean).sum() - beta * kl
                else:
                    total = (adv[:, i] * gaussian_log_prob(xn, mean, std)).sum() - beta * kl
        grads = torch.autograd.grad(total, params, allow_unused=True)
        out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(grads, params)]))
    return torch.stack(out)
