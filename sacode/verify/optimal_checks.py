"""Checks of chapter 5 (optimal fine-tuning in closed form): V* = beta log h, the HJB equation, the optimal score,
the terminal law with the initial law fixed at N(0, I), and J* with its split E r - beta KL.

Deterministic checks compare float64 computations with a rounding budget; Monte-Carlo checks allow Z standard
errors plus the discretisation bias of Euler-Maruyama, measured exactly (Gaussian presets: the optimal score is
affine, so the discrete law is Gaussian and propagated without MC error) or by a coupled K vs K/2 Richardson
estimate (the mixture).
"""
from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import torch
from scipy.integrate import quad

from ..theory.exact_laws import reverse_sde_terminal_law
from ..theory.optimal import (discrete_gaussian_objective, hjb_residual, mode_misassignment_bound, naive_tilt,
                       naive_tilt_law, optimal_objective, optimal_terminal_law, optimal_value, optimal_value_grad,
                       optimal_path_kl_rate, sample_optimal, sample_optimal_coupled)
from ..theory.presets import TOY_PRESETS, ToyPreset, toy_preset
from ..dynamics.grid import TimeGrid
from . import EPS, Z, CheckResult, check

ROUNDING_ULPS = 2**12
"""Rounding budget of the deterministic checks: 4096 ulps of the largest term (each quantity is a chain of
~100 float64 operations -- eigen-rotations, log-sum-exp, two autograd passes -- whose rounding errors add up to
far less; a wrong formula shows up at relative size 1e-3 or more)."""

GAUSS_PRESETS = [p for p in TOY_PRESETS if p.startswith("gauss1d")]
SHORT_PRESETS = [p for p in TOY_PRESETS if p.endswith("-short")]
N_GAUSS, K_GAUSS = 20_000, 400          # Gaussian presets: MC size and Euler-Maruyama steps
N_MIX, K_MIX = 4_000, 200               # the mixture: coupled rollouts with K and K/2 steps


@contextlib.contextmanager
def _one_thread():
    """Small tensors on a shared 2-core machine run fastest (and most predictably) on one intra-op thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _grid_points(preset: ToyPreset) -> torch.Tensor:
    if preset.data.d == 1:
        return torch.linspace(-3.0, 4.0, 29, dtype=torch.float64)
    g = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    return torch.cartesian_prod(g, g)


@check("optimal-terminal-condition")
def terminal_condition():
    """V*(T, x) = r(x) on a grid (the Cole-Hopf value at the data end is the reward itself)."""
    out = []
    for name in TOY_PRESETS:
        p = toy_preset(name)
        x = _grid_points(p)
        r = p.reward(x)
        err = (optimal_value(p, p.sde.T, x) - r).abs().max()
        tol = ROUNDING_ULPS * EPS * max(1.0, float(r.abs().max()))
        out.append(CheckResult.compare(f"optimal-terminal-condition/{name}", err, 0.0, tol, "max|V*(T,x)-r(x)|"))
    return out


@check("optimal-hjb")
def hjb():
    """HJB residual of V* = beta log h by float64 autograd on a (t, x) grid, relative to the largest term.

    d_t V + (-f + g^2 s_pre).grad V + g^2/2 Lap V + g^2/(2 beta)||grad V||^2; t in [0, T - 0.005] (sigma(s) has an
    infinite derivative at s = 0).
    """
    out = []
    ts = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9, 0.97, 0.995], dtype=torch.float64)
    for name in TOY_PRESETS:
        p = toy_preset(name)
        x0 = _grid_points(p)
        x = x0.repeat(len(ts), *([1] * (x0.ndim - 1)))
        t = ts.repeat_interleave(x0.shape[0])
        terms = hjb_residual(p, t, x)
        rel = float(terms.residual.abs().max() / terms.scale.max())
        out.append(CheckResult.compare(f"optimal-hjb/{name}", rel, 0.0, ROUNDING_ULPS * EPS,
                                       f"max|res|/max|term|, {x.shape[0]} points, max|term|="
                                       f"{float(terms.scale.max()):.3g}"))
    return out


@check("optimal-identities")
def identities():
    """Independent routes to the same numbers (float64 rounding):

    * grad V*: closed form beta (grad log p~_s - grad log p_s) vs autograd of the Cole-Hopf formula;
    * Gaussian presets: the terminal law by the law of total variance vs Gauss-Hermite over y vs the exact
      reverse-SDE law of the tilted data (exact_laws); J* closed form vs quadrature;
    * the KL split: (E r - J*)/beta vs the Girsanov time integral int 1/2 g^2 E||a* - s_pre||^2 dt (scipy quad).
    """
    out = []
    for name in TOY_PRESETS:
        p = toy_preset(name)
        x = _grid_points(p)
        xg = x.clone().requires_grad_(True)
        worst, scale = 0.0, 0.0
        for t in (0.0, 0.5, 0.9, 0.99):
            auto = torch.autograd.grad(optimal_value(p, t, xg).sum(), xg)[0]
            closed = optimal_value_grad(p, t, x)
            worst = max(worst, float((auto - closed).abs().max()))
            scale = max(scale, float(closed.abs().max()))
        out.append(CheckResult.compare(f"optimal-identities/{name}/grad-V", worst, 0.0,
                                       ROUNDING_ULPS * EPS * max(1.0, scale), "autograd vs tilt-score closed form"))
        if p.data.K != 1:
            obj = optimal_objective(p)
            out.append(CheckResult.compare(f"optimal-identities/{name}/quadrature-error", obj.quad_error, 0.0,
                                           1e-10, "Gauss-Hermite n vs 3n/4 nodes, max over mean, cov, weights, J*"))
            continue
        law = optimal_terminal_law(p)
        lq = optimal_terminal_law(p, "quadrature")
        mt, Ct = reverse_sde_terminal_law(naive_tilt(p), p.sde)
        tol = ROUNDING_ULPS * EPS * max(1.0, float(law.cov.abs().max()), float(law.mean.abs().max()))
        out.append(CheckResult.compare(f"optimal-identities/{name}/law-quadrature",
                                       max((law.mean - lq.mean).abs().max(), (law.cov - lq.cov).abs().max()), 0.0,
                                       tol, "max|mean, var diff|"))
        out.append(CheckResult.compare(f"optimal-identities/{name}/law-tilted-reverse",
                                       max((law.mean - mt).abs().max(), (law.cov - Ct).abs().max()), 0.0, tol,
                                       "vs exact_laws.reverse_sde_terminal_law(naive tilt)"))
        obj, objq = optimal_objective(p), optimal_objective(p, "quadrature")
        out.append(CheckResult.compare(f"optimal-identities/{name}/J-quadrature", objq.J, obj.J,
                                       ROUNDING_ULPS * EPS * max(1.0, abs(obj.J))))
        kl_path, err = quad(lambda t: optimal_path_kl_rate(p, t), 0.0, p.sde.T, epsabs=1e-12, epsrel=1e-12, limit=200)
        out.append(CheckResult.compare(f"optimal-identities/{name}/KL-Girsanov", kl_path, obj.kl,
                                       err + ROUNDING_ULPS * EPS * max(1.0, obj.kl), "int 1/2 g^2 E||a*-s_pre||^2 dt"))
    return out


# ------------------------------------------------------------------------------------------------
# Monte Carlo: the optimal sampler reproduces the closed forms
# ------------------------------------------------------------------------------------------------
def _rd(v) -> float:
    """Rounding allowance next to a Monte-Carlo tolerance (a per-sample KL that is deterministic has SE 0)."""
    return ROUNDING_ULPS * EPS * max(1.0, abs(float(v)))


def _se(v: torch.Tensor) -> float:
    return float(v.std()) / math.sqrt(v.shape[0])


def _var_se(x: torch.Tensor) -> float:
    c = x - x.mean()
    return float(torch.sqrt(((c**4).mean() - (c**2).mean() ** 2) / x.numel()))


@lru_cache(maxsize=None)
def _gauss_rollout(name: str):
    p = toy_preset(name)
    grid = TimeGrid.uniform(p.sde.T, K_GAUSS)
    with _one_thread():
        ro = sample_optimal(p, N_GAUSS, grid, torch.Generator().manual_seed(50 + TOY_PRESETS.index(name)))
    return ro, discrete_gaussian_objective(p, grid)


@check("optimal-mc-gauss")
def mc_gauss():
    """EM (K=400) with the closed-form optimal score from N(0,1): mean, var, J* and the path KL, all four Gaussian
    presets. tol = Z SE + |discrete - continuous| (the exact discrete law of the affine sampler)."""
    out = []
    for name in GAUSS_PRESETS:
        p = toy_preset(name)
        ro, disc = _gauss_rollout(name)
        law, obj = optimal_terminal_law(p), optimal_objective(p)
        x, note = ro.x, f"K={K_GAUSS}, n={N_GAUSS}"
        out.append(CheckResult.compare(f"optimal-mc-gauss/{name}/mean", x.mean(), law.mean[0],
                                       Z * _se(x) + abs(float(disc.mean[0] - law.mean[0])), note))
        out.append(CheckResult.compare(f"optimal-mc-gauss/{name}/var", x.var(), law.cov[0, 0],
                                       Z * _var_se(x) + abs(float(disc.cov[0, 0] - law.cov[0, 0])), note))
        out.append(CheckResult.compare(f"optimal-mc-gauss/{name}/J*", ro.objective.mean(), obj.J,
                                       Z * _se(ro.objective) + abs(disc.objective - obj.J), note))
        out.append(CheckResult.compare(f"optimal-mc-gauss/{name}/KL", ro.kl.mean(), obj.kl,
                                       Z * _se(ro.kl) + abs(disc.kl - obj.kl) + _rd(obj.kl), note))
    return out


@check("optimal-naive-tilt-rejected")
def naive_rejected():
    """-short presets: the simulated optimum sits many SEs away from the naive tilt p e^{r/beta}/Z.

    computed = |MC mean - naive-tilt mean| / SE; closed form = |exact optimum - naive| / SE; passes when these agree
    within Z + bias/SE *and* the gap exceeds 10 Z standard errors (the naive tilt is visibly wrong).
    """
    out = []
    for name in SHORT_PRESETS:
        p = toy_preset(name)
        ro, disc = _gauss_rollout(name)
        se = _se(ro.x)
        naive, law = float(naive_tilt_law(p).mean[0]), float(optimal_terminal_law(p).mean[0])
        gap_mc, gap_cf = abs(float(ro.x.mean()) - naive) / se, abs(law - naive) / se
        tol = Z + abs(float(disc.mean[0]) - law) / se
        out.append(CheckResult(f"optimal-naive-tilt-rejected/{name}", gap_mc, gap_cf, tol,
                               abs(gap_mc - gap_cf) <= tol and gap_mc > 10 * Z,
                               f"naive mean {naive:.4f} vs optimum {law:.4f}; gaps in SE units"))
    return out


@check("optimal-mc-mixture")
def mc_mixture():
    """mixture2d-linear: EM (K=200) with the optimal score from N(0, I) vs the Gauss-Hermite closed forms:
    mean, covariance, mode weights (nearest mode) and J*. tol = Z SE + coupled Richardson bias (K vs K/2 on the same
    Brownian path: |diff| + Z SE of the diff) + quadrature error (+ the misassignment bound for the weights)."""
    p = toy_preset("mixture2d-linear")
    with _one_thread():
        fine, coarse = sample_optimal_coupled(p, N_MIX, K_MIX, torch.Generator().manual_seed(60))
    law, obj = optimal_terminal_law(p), optimal_objective(p)
    n, note = N_MIX, f"K={K_MIX}, n={N_MIX}"

    def bias(a: torch.Tensor, b: torch.Tensor) -> float:       # per-sample statistics of coarse and fine runs
        d = a - b
        return abs(float(d.mean())) + Z * _se(d)

    out = []
    for i in range(2):
        out.append(CheckResult.compare(f"optimal-mc-mixture/mean[{i}]", fine.x[:, i].mean(), law.mean[i],
                                       Z * _se(fine.x[:, i]) + bias(coarse.x[:, i], fine.x[:, i]) + law.quad_error,
                                       note))
    xf, xc = fine.x - fine.x.mean(0), coarse.x - coarse.x.mean(0)
    prod_f = (xf[:, :, None] * xf[:, None, :]).reshape(n, -1)
    prod_c = (xc[:, :, None] * xc[:, None, :]).reshape(n, -1)
    dev = (prod_f.mean(0) * n / (n - 1) - law.cov.reshape(-1)).abs()
    se_c = prod_f.std(0) / math.sqrt(n)
    b_c = torch.tensor([bias(prod_c[:, j], prod_f[:, j]) for j in range(4)])
    out.append(CheckResult.compare("optimal-mc-mixture/max|cov-C*|", dev.max(), 0.0,
                                   float((Z * se_c + b_c).max()) + law.quad_error, note))
    kf, kc = p.data.nearest_component(fine.x), p.data.nearest_component(coarse.x)
    oh_f = torch.nn.functional.one_hot(kf, p.data.K).double()
    oh_c = torch.nn.functional.one_hot(kc, p.data.K).double()
    w_mc = oh_f.mean(0)
    se_w = torch.sqrt(law.weights * (1 - law.weights) / n)
    b_w = torch.tensor([bias(oh_c[:, j], oh_f[:, j]) for j in range(p.data.K)])
    mis = mode_misassignment_bound(p)
    out.append(CheckResult.compare("optimal-mc-mixture/max|w_k-w*_k|", (w_mc - law.weights).abs().max(), 0.0,
                                   float((Z * se_w + b_w).max()) + mis + law.quad_error,
                                   f"{note}, w*_0={float(law.weights[0]):.4f}, misassignment<={mis:.1e}"))
    out.append(CheckResult.compare("optimal-mc-mixture/J*", fine.objective.mean(), obj.J,
                                   Z * _se(fine.objective) + bias(coarse.objective, fine.objective) + obj.quad_error,
                                   note))
    out.append(CheckResult.compare("optimal-mc-mixture/KL", fine.kl.mean(), obj.kl,
                                   Z * _se(fine.kl) + bias(coarse.kl, fine.kl) + obj.quad_error, note))
    return out
