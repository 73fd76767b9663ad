"""Denoising score matching (Vincent 2011; Song et al. 2021, eq. 7) and its closed-form minimum.

With X_s = alpha X_0 + sigma Z and weight lambda(s) = sigma(s)^2 the per-level loss is

    L_s(theta) = E || sigma(s) s_theta(s, X_s) + Z ||^2.

Since E[-Z/sigma | X_s] = grad log p_s(X_s), L_s = sigma^2 E||s_theta - grad log p_s||^2 + L_s*, with

    L_s* = d - sigma(s)^2 E || grad log p_s(X_s) ||^2      (the irreducible part; = d - sigma^2 tr Sigma_s^{-1}
                                                          for Gaussian data N(m, C), Sigma_s = alpha^2 C + sigma^2 I).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..dynamics.shapes import as_time, expand_time, sum_event
from .data import GaussianMixture
from ..dynamics.sde import LinearSDE, ScoreFn


def dsm_loss_per_sample(score_fn: ScoreFn, sde: LinearSDE, x0: Tensor, s: Tensor,
                        noise: Tensor | None = None) -> Tensor:
    """sigma(s)^2-weighted DSM loss || sigma s_theta(s, X_s) + Z ||^2 for each sample, shape (n,)."""
    s = as_time(s, x0)
    z = torch.randn_like(x0) if noise is None else noise
    xs = sde.marginal_sample(s, x0, z)
    sig = expand_time(sde.sigma(s).to(x0), x0)
    return sum_event((sig * score_fn(s, xs) + z) ** 2)


def dsm_minimum_gaussian(data: GaussianMixture, sde: LinearSDE, s: Tensor) -> Tensor:
    """Closed-form L_s* = d - sigma^2 tr Sigma_s^{-1} for single-Gaussian data, for each s (shape like s)."""
    if data.K != 1:
        raise ValueError("the closed-form DSM minimum needs single-Gaussian data; use dsm_minimum_mc for mixtures")
    s = torch.as_tensor(s, dtype=torch.float64)
    a, sg = sde.alpha(s), sde.sigma(s)
    v = a[..., None] ** 2 * data.lam[0] + sg[..., None] ** 2
    return data.d - sg**2 * (1.0 / v).sum(-1)


def dsm_minimum_mc(data: GaussianMixture, sde: LinearSDE, s: float, n: int,
                   generator: torch.Generator | None = None) -> tuple[float, float]:
    """L_s* = d - sigma^2 E||grad log p_s||^2 by Monte Carlo for any mixture: (estimate, standard error)."""
    x = data.noised(sde, s).sample(n, generator)
    sig2 = float(sde.sigma(torch.tensor(float(s), dtype=torch.float64))) ** 2
    vals = data.d - sig2 * sum_event(data.score(sde, s, x) ** 2)
    return float(vals.mean()), float(vals.std() / n**0.5)


def fisher_divergence(score_a: ScoreFn, score_b: ScoreFn, x: Tensor, s: float) -> tuple[float, float]:
    """E_{x ~ p_s} || score_a - score_b ||^2 at noise level s: (estimate, standard error)."""
    st = torch.full((x.shape[0],), float(s), dtype=x.dtype)
    with torch.no_grad():
        v = sum_event((score_a(st, x) - score_b(st, x)) ** 2)
    return float(v.mean()), float(v.std() / x.shape[0] ** 0.5)


def train_dsm(model: nn.Module, sde: LinearSDE, sample_data: Callable[[int, torch.Generator], Tensor],
              steps: int = 2000, batch: int = 512, lr: float = 2e-3, s_min: float = 1e-3, seed: int = 0,
              progress: bool = True, log_every: int = 50) -> list[dict]:
    """Fit ``model(s, x)`` (a score) by the sigma^2-weighted DSM loss with s ~ U(s_min, T).

    Adam with cosine learning-rate decay; returns a log of ``{"step", "loss", "wall_s"}`` records.
    ``sample_data(n, generator)`` draws training data (float32 is fine).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    log, t0, run = [], time.perf_counter(), None
    for it in tqdm(range(steps), disable=not progress, desc="DSM", leave=False):
        x0 = sample_data(batch, gen)
        s = s_min + (sde.T - s_min) * torch.rand(batch, generator=gen, dtype=x0.dtype)
        z = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        loss = dsm_loss_per_sample(model, sde, x0, s, z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        val = loss.item()
        run = val if run is None else 0.98 * run + 0.02 * val
        if (it + 1) % log_every == 0 or it == 0:
            log.append({"step": it + 1, "loss": run, "wall_s": time.perf_counter() - t0})
    return log
