"""Checks of chapters 3-4: sampler steps as score-action policies, the Girsanov path KL, data processing.

Running example (chapter 5): data N(m0, s0^2) under the VP SDE of ``gauss1d-linear`` (b in [0.1, 20]) or
``gauss1d-linear-short`` (b in [0.1, 2]), reward r(x) = w x, KL weight beta. The optimal control is the score shift

    a*(t, x) - s_pre(s, x) = grad V*/beta = alpha_s s0^2 w / (beta D_s),   D_s = alpha_s^2 s0^2 + 1 - alpha_s^2,

constant in x, so its path KL is the deterministic integral int_{s_end}^T 1/2 g^2 (alpha s0^2 w/(beta D))^2 ds,
computed with scipy quad; in closed form (u = alpha^2, du = -g^2 u ds) it is
w^2 s0^4 (alpha_{s_end}^2 - alpha_T^2) / (2 beta^2 D_{s_end} D_T), i.e. w^2 v_T / (2 beta^2) at s_end = 0 with the
posterior variance v_T = s0^2 (1 - alpha_T^2) / D_T. The optimal terminal law from the fixed prior N(0, 1) is the
pretrained one shifted by w v_T / beta (chapter 4), so KL(p*_T || p^pre_T) = (w v_T/beta)^2 / (2 Var^pre_T) with
Var^pre_T = v_T + (alpha_T s0^2 / D_T)^2, and terminal KL / path KL = v_T / Var^pre_T <= 1.

Discretisation bounds used as tolerances (a priori, from the explicit integrand):
* left Riemann sum of a C^2 function F on a uniform grid of step h over [0, L] (trapezoid rule plus the end
  correction): |S - int F| <= (h/2) |F(0) - F(L)| + L h^2 max|F''| / 12;
* sum_k W_k G(s_k) with W_k = int over step k of g^2: |S - int g^2 G| <= |sum_k G'(s_k) M_k|
  + max|G''| h^2 sum_k W_k / 2, M_k = int over step k of g^2(u)(s_k - u) du (Taylor with remainder).
max|F''|, G' and G'' are evaluated on a grid 50x finer than the sampler's (F is smooth and explicit).
Where no such bound is at hand (DDIM's chain KL, the discrete terminal laws) the tolerance is the first-order
Richardson estimate 2|X_K - X_(K/2)|, and the O(1/K) order itself is checked separately (slope 1 +- 0.1).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..dynamics.gaussian_step import gaussian_step
from ..dynamics.time import diffusion_time
from ..theory.control import ScoreActionPolicy, ScoreControlProblem, transition_log_prob_via_policy
from ..theory.data import ring_mixture
from ..theory.exact_laws import reverse_sde_terminal_law
from ..theory.kl import (GaussianLinearExample, discrete_path_kl, gaussian_kl, path_kl_from_trajectory, shift_path_kl,
                  shift_per_step_kl, torchsde_path_kl)
from ..theory.presets import toy_preset
from ..dynamics.grid import TimeGrid
from ..dynamics.samplers import propagate_gaussian, reverse_sde_sample
from . import EPS, Z, CheckResult, check

F64 = torch.float64
S_END = 1e-3          # grids end at s = 1e-3: DDIM's step into s = 0 is deterministic (infinite step KL)


def _one_thread(fn):
    """Run a check with one intra-op thread (restored afterwards): these checks are long loops of tiny tensor
    ops, where a second thread only adds contention (on a loaded 2-core machine: 57 s -> 6 s wall)."""
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kw)
        finally:
            torch.set_num_threads(n)
    return wrapper


def _F_rl(toy: GaussianLinearExample, s: np.ndarray) -> np.ndarray:
    """Girsanov integrand F = 1/2 g^2 shift^2 at diffusion times s (numpy in, numpy out)."""
    st = torch.as_tensor(s, dtype=F64)
    return (0.5 * toy.sde.g2(st) * toy.shift(st) ** 2).numpy()


def riemann_bound(F, a: float, b: float, K: int, refine: int = 50) -> float:
    """(h/2)|F(a) - F(b)| + (b-a) h^2 max|F''| / 12 for the left Riemann sum with K uniform steps on [a, b]."""
    h = (b - a) / K
    xs = np.linspace(a, b, K * refine + 1)
    fx = F(xs)
    dx = xs[1] - xs[0]
    f2 = np.abs(np.diff(fx, 2)) / dx**2
    return 0.5 * h * abs(fx[0] - fx[-1]) + (b - a) * h**2 * float(f2.max()) / 12


def weighted_sum_bound(toy: GaussianLinearExample, grid: TimeGrid, refine: int = 50) -> float:
    """Bound on |sum_k W_k G(s_k) - int g^2 G| with G = 1/2 shift^2, W_k = int_step g^2 (uniform grid):

    G(s_k) - G(u) = G'(s_k)(s_k - u) + R, |R| <= max|G''| (s_k - u)^2 / 2, so the error is at most
    |sum_k G'(s_k) M_k| + max|G''| h^2 sum_k W_k / 2 with M_k = int_step g^2(u)(s_k - u) du
    (3-point Gauss-Legendre per step: exact for the VP's linear g^2).
    """
    s0, s1 = grid.s[1:], grid.s[:-1]                     # each step is [s_{k+1}, s_k]
    h = float((s1 - s0).max())
    nodes, wts = np.polynomial.legendre.leggauss(3)
    u = 0.5 * (s0 + s1)[:, None] + 0.5 * (s1 - s0)[:, None] * torch.as_tensor(nodes, dtype=F64)[None]
    M = (0.5 * (s1 - s0)[:, None] * torch.as_tensor(wts, dtype=F64)[None] * toy.sde.g2(u) * (s1[:, None] - u)).sum(1)
    ss = torch.linspace(float(grid.s[-1]), float(grid.s[0]), grid.K * refine + 1, dtype=F64)
    G = (0.5 * toy.shift(ss) ** 2).numpy()
    dx = float(ss[1] - ss[0])
    G1 = np.gradient(G, dx)
    G2 = np.abs(np.diff(G, 2)) / dx**2
    G1k = torch.as_tensor(np.interp(s1.numpy(), ss.numpy(), G1))
    first = float((G1k * M).sum())
    return abs(first) + float(G2.max()) * h**2 * float(toy.sde.int_g2(s0, s1).sum()) / 2


# ------------------------------------------------------------------------------------------------
# sampler steps are score-action policies
# ------------------------------------------------------------------------------------------------
@check("control-step-policy")
@_one_thread
def step_policy_density():
    """log p(x_{k+1} | x_k) from the sampler equals log pi(a_k | t_k, x_k) - d log|B_k| (change of variables).

    a_k = (x_{k+1} - A_k x_k)/B_k, pi = N(score, (std_k/B_k)^2 I). Exact algebra, so the tolerance is float64
    rounding: 1e-12 relative to max(1, |log p|) (observed ~1e-13). Also: the em(eta=1) policy std is
    1/(g sqrt(dt)) (chapter 3), and A_k x + B_k score reproduces the sampler's recorded mean.
    """
    out = []
    toy = GaussianLinearExample.from_preset("gauss1d-linear")
    sde = toy.sde
    ring = ring_mixture()
    cases = [("gauss1d", toy.s_pre, (), 40, 400), ("ring2d", ring.score_fn(sde), (2,), 12, 100)]
    for label, score, event, K, n in cases:
        grid = TimeGrid.uniform(sde.T, K, s_end=S_END)
        for method, eta in [("em", 1.0), ("ddim", 1.0), ("ddim", 0.5)]:
            gen = torch.Generator().manual_seed(11)
            tr = reverse_sde_sample(sde, score, sde.prior_sample((n, *event), gen), grid, method, eta, gen,
                                    record=True)
            pol = ScoreActionPolicy.of_sampler(sde, score, grid, method, eta)
            rel, mean_err = 0.0, 0.0
            for k in range(K):
                coef = gaussian_step(sde, grid.s[k], grid.s[k + 1], method, eta)
                lp = transition_log_prob_via_policy(pol, grid.t[k], tr.xs[k], tr.xs[k + 1], coef)
                rel = max(rel, float(((lp - tr.log_probs[k]).abs() / tr.log_probs[k].abs().clamp_min(1.0)).max()))
                m = coef.A * tr.xs[k] + coef.B * tr.scores[k]
                mean_err = max(mean_err, float(((m - tr.means[k]).abs() / tr.means[k].abs().clamp_min(1.0)).max()))
            note = f"{label}, {method} eta={eta:g}, K={K}, n={n}"
            out.append(CheckResult.compare(f"control-step-policy/{label}/{method}-eta{eta:g}/logp", rel, 0.0,
                                           1e-12, note + ": max rel |log p - (log pi - d log B)|"))
            out.append(CheckResult.compare(f"control-step-policy/{label}/{method}-eta{eta:g}/mean", mean_err, 0.0,
                                           1e-12, note + ": max rel |A x + B score - mean|"))
    grid = TimeGrid.uniform(sde.T, 40, s_end=S_END)
    coef = gaussian_step(sde, grid.s[:-1], grid.s[1:], "em", 1.0)
    target = 1.0 / (sde.g(grid.s[:-1]) * torch.sqrt(grid.dt))
    out.append(CheckResult.compare("control-step-policy/em-cov=I/(g^2 dt)",
                                   float(((coef.policy_std - target).abs() / target).max()), 0.0, 1e-13,
                                   "max rel |std/B - 1/(g sqrt(dt))| over 40 steps"))
    return out


# ------------------------------------------------------------------------------------------------
# the Girsanov path KL
# ------------------------------------------------------------------------------------------------
def _moment_ode_kl(toy: GaussianLinearExample, kappa: float, s_end: float) -> float:
    """Continuous-time path KL of s_theta = s_opt + kappa x: int 1/2 g^2 E(shift + kappa X)^2 dt (solve_ivp).

    Under P^theta, dX = [a(t) X + c(t)] dt + g dB with a = b/2 + b(kappa - 1/D), c = b(alpha m0/D + shift),
    so m' = a m + c, v' = 2 a v + b, from m = 0, v = 1 (the prior).
    """
    sde, T = toy.sde, toy.sde.T

    def rhs(t, y):
        s = torch.tensor(diffusion_time(t, T), dtype=F64)
        b = float(sde.g2(s))
        al, D, sh = float(sde.alpha(s)), float(toy.D(s)), float(toy.shift(s))
        m, v = y[0], y[1]
        a = 0.5 * b + b * (kappa - 1.0 / D)
        c = b * (al * toy.m0 / D + sh)
        return [a * m + c, 2 * a * v + b, 0.5 * b * ((sh + kappa * m) ** 2 + kappa**2 * v)]

    sol = solve_ivp(rhs, (0.0, T - s_end), [0.0, 1.0, 0.0], method="DOP853", rtol=1e-11, atol=1e-13)
    return float(sol.y[2, -1])


def _discrete_expected_kl(toy: GaussianLinearExample, kappa: float, grid: TimeGrid, score) -> float:
    """E of the exact-weight trajectory estimator under the discrete EM chain, from its exact Gaussian moments."""
    sde = toy.sde
    m, C = torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64)
    total = 0.0
    for k in range(grid.K):
        W = float(sde.int_g2(grid.s[k + 1], grid.s[k]))
        sh = float(toy.shift(grid.s[k]))
        total += 0.5 * W * ((sh + kappa * float(m[0])) ** 2 + kappa**2 * float(C[0, 0]))
        step = TimeGrid(grid.s[k:k + 2], grid.T)
        m, C = propagate_gaussian(sde, score, step, m, C, "em", 1.0)
    return total


@check("control-kl-path")
@_one_thread
def girsanov_path_kl():
    """Path KL of the optimal control of gauss1d-linear: (a) Monte Carlo along sampled EM trajectories,
    (b) the per-step transition-KL sum as K grows (EM: left Riemann sum; DDIM eta=1: O(1/K), fitted order),
    (c) torchsde's logqp; plus a state-dependent control where the Monte-Carlo error is not zero.
    """
    out = []
    toy = GaussianLinearExample.from_preset("gauss1d-linear")
    sde, T = toy.sde, toy.sde.T
    I, qerr = shift_path_kl(sde, toy.shift, S_END)
    out.append(CheckResult.compare("control-kl-path/quad-vs-analytic", I, toy.path_kl_closed(S_END),
                                   qerr + 64 * EPS * I,
                                   "int 1/2 g^2 shift^2 (quad) vs w^2 s0^4 (a_e^2 - a_T^2)/(2 beta^2 D_e D_T)"))

    # (a) + (b, em): trajectories of the optimally controlled EM sampler, K = 1000
    K, n = 1000, 200
    grid = TimeGrid.uniform(T, K, s_end=S_END)
    gen = torch.Generator().manual_seed(21)
    tr = reverse_sde_sample(sde, toy.s_opt, sde.prior_sample((n,), gen), grid, "em", 1.0, gen, record=True)
    F = lambda s: _F_rl(toy, s)
    b_riem = riemann_bound(F, S_END, T, K)
    b_exact = weighted_sum_bound(toy, grid)
    for weight, bound in [("riemann", b_riem), ("exact", b_exact)]:
        est = path_kl_from_trajectory(tr, sde, toy.s_pre, weight)
        se = float(est.std()) / math.sqrt(n)
        out.append(CheckResult.compare(f"control-kl-path/mc-{weight}/K={K}", est.mean(), I, Z * se + bound,
                                       f"n={n}, SE={se:.1e} (shift const in x), a-priori quadrature bound "
                                       f"{bound:.2e}"))
    dk = discrete_path_kl(tr, sde, toy.s_pre)
    out.append(CheckResult.compare(f"control-kl-path/discrete-em/K={K}", dk.mean(), I, b_riem,
                                   f"sum_k |mean_theta - mean_pre|^2/(2 std^2) = left Riemann sum; bound {b_riem:.2e}"))

    # (a') a control with state-dependent difference: s_theta = s_opt + kappa x
    kappa, K2, n2 = 0.3, 200, 4000
    grid2 = TimeGrid.uniform(T, K2, s_end=S_END)
    score_theta = lambda s, x: toy.s_opt(s, x) + kappa * x
    gen = torch.Generator().manual_seed(22)
    tr2 = reverse_sde_sample(sde, score_theta, sde.prior_sample((n2,), gen), grid2, "em", 1.0, gen, record=True)
    est2 = path_kl_from_trajectory(tr2, sde, toy.s_pre, "exact")
    se2 = float(est2.std()) / math.sqrt(n2)
    cont = _moment_ode_kl(toy, kappa, S_END)
    disc = _discrete_expected_kl(toy, kappa, grid2, lambda s, x: score_theta(s, x))
    out.append(CheckResult.compare(f"control-kl-path/mc-state-dependent/K={K2}", float(est2.mean()) - (disc - cont),
                                   cont, Z * se2,
                                   f"s_theta = s_opt + {kappa} x, n={n2}, SE={se2:.1e}; MC minus the exact "
                                   f"discrete bias {disc - cont:.2e} (moment recursion vs moment ODE)"))

    # (b, ddim eta=1): the per-step KL sum converges as O(1/K)
    Ks = [250, 500, 1000, 2000, 4000]
    sums = [float(shift_per_step_kl(sde, toy.shift, TimeGrid.uniform(T, k, s_end=S_END), "ddim", 1.0).sum())
            for k in Ks]
    errs = [abs(v - I) for v in sums]
    slope = float(-np.polyfit(np.log(Ks), np.log(errs), 1)[0])
    out.append(CheckResult.compare("control-kl-path/discrete-ddim1/order", slope, 1.0, 0.1,
                                   f"K={Ks[0]}..{Ks[-1]}, |sum - int| {errs[0]:.2e} -> {errs[-1]:.2e}"))
    out.append(CheckResult.compare(f"control-kl-path/discrete-ddim1/K={Ks[-1]}", sums[-1], I,
                                   2 * abs(sums[-1] - sums[-2]),
                                   "tol 2|S_K - S_(K/2)| (first-order Richardson error estimate, x2)"))

    # (c) torchsde logqp on the exploratory SDE (Euler, dt = (T - s_end)/K), same left Riemann sum
    problem = ScoreControlProblem(sde, toy.s_pre, None, toy.beta)
    policy = ScoreActionPolicy(toy.s_opt, 0.0, T)
    x0 = sde.prior_sample((8, 1), torch.Generator().manual_seed(23))
    torch.manual_seed(24)
    lr = torchsde_path_kl(problem.exploratory_sde(policy, event_shape=()), x0, 0.0, T - S_END, (T - S_END) / K)
    out.append(CheckResult.compare(f"control-kl-path/torchsde-logqp/dt=1e-3", lr.mean(), I, b_riem,
                                   f"torchsde.sdeint(logqp=True), Euler; left Riemann bound {b_riem:.2e}"))
    out.append(CheckResult.compare("control-kl-path/torchsde-vs-discrete-em", lr.mean(), dk.mean(), 1e-10 * I,
                                   "same left Riemann sum up to torchsde's accumulated time rounding"))
    return out


# ------------------------------------------------------------------------------------------------
# data processing: terminal KL <= path KL
# ------------------------------------------------------------------------------------------------
@check("control-kl-dpi")
@_one_thread
def data_processing():
    """KL(p*_T || p^pre_T) <= KL(P* || P^pre) for the optimal control on both linear presets.

    Terminal KL: the discrete EM laws of the optimal and pretrained samplers (propagate_gaussian, exact, K=800)
    vs (w v_T/beta)^2/(2 Var^pre_T); tolerance 2|KL_K - KL_(K/2)| (first-order weak error, Richardson).
    The bound itself is checked on the closed forms: violation max(0, terminal - path) must be 0.
    """
    out = []
    for name in ["gauss1d-linear", "gauss1d-linear-short"]:
        toy = GaussianLinearExample.from_preset(name)
        sde = toy.sde
        path = toy.path_kl_closed(0.0)
        I, qerr = shift_path_kl(sde, toy.shift, 0.0)
        out.append(CheckResult.compare(f"control-kl-dpi/{name}/path-kl", I, path, qerr + 64 * EPS * path,
                                       "quad vs w^2 v_T/(2 beta^2)"))
        kls = []
        for K in (400, 800):
            grid = TimeGrid.uniform(sde.T, K)
            m0, C0 = torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64)
            mo, Co = propagate_gaussian(sde, toy.s_opt, grid, m0, C0, "em")
            mp, Cp = propagate_gaussian(sde, toy.s_pre, grid, m0, C0, "em")
            kls.append(gaussian_kl(mo, Co, mp, Cp))
        term = toy.terminal_kl_closed()
        out.append(CheckResult.compare(f"control-kl-dpi/{name}/terminal-kl", kls[-1], term,
                                       2 * abs(kls[-1] - kls[0]),
                                       "discrete laws (K=800) vs (w v_T/beta)^2/(2 Var_T)"))
        mcf, ccf = reverse_sde_terminal_law(toy_preset(name).data, sde)
        out.append(CheckResult.compare(f"control-kl-dpi/{name}/Var_T", toy.terminal_var_pre(), float(ccf[0, 0]),
                                       64 * EPS, "v_T + (alpha_T s0^2/D_T)^2 vs sacode.theory.exact_laws"))
        out.append(CheckResult.compare(f"control-kl-dpi/{name}/violation", max(0.0, term - path), 0.0, 0.0,
                                       f"terminal {term:.6f} <= path {path:.6f}, ratio v_T/Var_T = "
                                       f"{term / path:.6f}"))
    return out
