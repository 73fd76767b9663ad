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
Where no such bound is at hand (DDIM's chain KL, the discrete terminal laws, the state-dependent control) the
exact discrete values are extrapolated (Richardson, :mod:`sacode.verify.convergence`) onto the closed form, and the
O(1/K) order itself is checked separately (slope 1 +- 0.1). Monte-Carlo rows compare a simulation with the exact
expectation of the same discrete estimator only (Z standard errors); a trajectory estimator of a shift control that
does not depend on x gives the same number on every path (SE 0), so those rows are exact comparisons.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..dynamics.gaussian_step import affine_coefficients, gaussian_chain, gaussian_step
from ..dynamics.time import diffusion_time
from ..theory.control import ScoreActionPolicy, ScoreControlProblem, transition_log_prob_via_policy
from ..theory.data import ring_mixture
from ..theory.exact_laws import reverse_sde_terminal_law
from ..theory.kl import (GaussianLinearExample, discrete_path_kl, eta_factor, gaussian_kl, path_kl_from_trajectory,
                         shift_path_kl, shift_per_step_kl, torchsde_path_kl)
from ..theory.presets import toy_preset
from ..dynamics.grid import TimeGrid
from ..dynamics.samplers import reverse_sde_sample
from . import EPS, CheckResult, check
from .convergence import order_check, richardson_check

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
                                           1e-12, note + ": max rel |log p - (log pi - d log B)|", kind="exact"))
            out.append(CheckResult.compare(f"control-step-policy/{label}/{method}-eta{eta:g}/mean", mean_err, 0.0,
                                           1e-12, note + ": max rel |A x + B score - mean|", kind="exact"))
    grid = TimeGrid.uniform(sde.T, 40, s_end=S_END)
    coef = gaussian_step(sde, grid.s[:-1], grid.s[1:], "em", 1.0)
    target = 1.0 / (sde.g(grid.s[:-1]) * torch.sqrt(grid.dt))
    out.append(CheckResult.compare("control-step-policy/em-cov=I/(g^2 dt)",
                                   float(((coef.policy_std - target).abs() / target).max()), 0.0, 1e-13,
                                   "max rel |std/B - 1/(g sqrt(dt))| over 40 steps (the same algebra on both sides)",
                                   kind="identity"))
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


def _affine_em_chain(sde, score, grid: TimeGrid, cost_score=None, eta: float = 1.0):
    """Exact law of the Euler-Maruyama(eta) chain with an affine score from N(0, 1) (gaussian_chain), optionally with
    the expected Girsanov-weighted cost sum_k 1/2 (int_step g^2) E(cost_score - s_pre)^2 (cost_score affine too)."""
    s = grid.s[:-1]
    zeros = torch.zeros(grid.K, 1, dtype=F64)
    S, b = affine_coefficients(score, s, zeros, ())
    st = gaussian_step(sde, s, grid.s[1:], "em", eta)
    A, B = st.A.numpy(), st.B.numpy()
    gain, offset = A[:, None, None] + B[:, None, None] * S, B[:, None] * b
    if cost_score is None:
        return gaussian_chain(gain, offset, st.std.numpy(), np.zeros(1), np.eye(1))
    Sc, bc = cost_score
    return gaussian_chain(gain, offset, st.std.numpy(), np.zeros(1), np.eye(1), Sc, bc,
                          sde.int_g2(grid.s[1:], s).numpy())


def _discrete_expected_kl(toy: GaussianLinearExample, kappa: float, grid: TimeGrid) -> float:
    """E of the exact-weight trajectory estimator under the discrete EM chain of s_theta = s_opt + kappa x: its
    exact Gaussian moments m_k, v_k give sum_k W_k/2 [(shift_k + kappa m_k)^2 + kappa^2 v_k]."""
    score = lambda s, x: toy.s_opt(s, x) + kappa * x
    S_t, b_t = affine_coefficients(score, grid.s[:-1], torch.zeros(grid.K, 1, dtype=F64), ())
    S_p, b_p = affine_coefficients(toy.s_pre, grid.s[:-1], torch.zeros(grid.K, 1, dtype=F64), ())
    return _affine_em_chain(toy.sde, score, grid, (S_t - S_p, b_t - b_p)).kl


def _weighted_shift_sum(toy: GaussianLinearExample, grid: TimeGrid, weight: str) -> float:
    """sum_k w_k 1/2 shift(s_k)^2 with w_k = int_step g^2 ("exact") or g(s_k)^2 dt_k ("riemann"): what the trajectory
    estimator gives on every path for the x-independent shift of the optimal control."""
    s = grid.s[:-1]
    w = toy.sde.int_g2(grid.s[1:], s) if weight == "exact" else toy.sde.g2(s) * grid.dt
    return float((w * 0.5 * toy.shift(s) ** 2).sum())


def _rounding(v: float, steps: int) -> float:
    """Rounding budget of a K-term float64 sum of positive terms: 64 ulps per term."""
    return 64 * EPS * steps * max(1.0, abs(v))


@functools.lru_cache(maxsize=None)
def _optimal_em_trajectories(K: int, n: int):
    toy = GaussianLinearExample.from_preset("gauss1d-linear")
    grid = TimeGrid.uniform(toy.sde.T, K, s_end=S_END)
    gen = torch.Generator().manual_seed(21)
    return reverse_sde_sample(toy.sde, toy.s_opt, toy.sde.prior_sample((n,), gen), grid, "em", 1.0, gen, record=True)


@functools.lru_cache(maxsize=None)
def _state_dependent_estimates(kappa: float, K: int, n: int) -> torch.Tensor:
    toy = GaussianLinearExample.from_preset("gauss1d-linear")
    grid = TimeGrid.uniform(toy.sde.T, K, s_end=S_END)
    score = lambda s, x: toy.s_opt(s, x) + kappa * x
    gen = torch.Generator().manual_seed(22)
    tr = reverse_sde_sample(toy.sde, score, toy.sde.prior_sample((n,), gen), grid, "em", 1.0, gen, record=True)
    return path_kl_from_trajectory(tr, toy.sde, toy.s_pre, "exact")


def _torchsde_log_ratio(toy: GaussianLinearExample, K: int) -> torch.Tensor:
    """torchsde.sdeint(logqp=True) on the optimally controlled exploratory SDE, Euler dt = (T - S_END)/K, seeded."""
    sde, T = toy.sde, toy.sde.T
    problem = ScoreControlProblem(sde, toy.s_pre, None, toy.beta)
    esde = problem.exploratory_sde(ScoreActionPolicy(toy.s_opt, 0.0, T), event_shape=())
    x0 = sde.prior_sample((8, 1), torch.Generator().manual_seed(23))
    return torchsde_path_kl(esde, x0, 0.0, T - S_END, (T - S_END) / K, entropy=24)


@check("control-kl-path")
@_one_thread
def girsanov_path_kl():
    """Path KL of the optimal control of gauss1d-linear on [S_END, T], I = int 1/2 g^2 shift^2 ds:

    (a) trajectory estimators (Riemann and step-exact weights) along sampled EM trajectories, K = 1000: the shift does
        not depend on x, so every path gives the same number, compared exactly with the discrete sum; the discrete sums
        against I by their a-priori quadrature bounds and by Richardson extrapolation;
    (b) the chain KL sum_k per-step transition KL of the recorded trajectories is exactly the Riemann sum (EM);
        DDIM(eta=1)'s chain KL converges to I at order 1 (fitted order, Richardson);
    (c) torchsde's logqp reproduces the Riemann sum, and lies within its bound of I;
    (d) a control with a state-dependent difference, s_theta = s_opt + 0.3 x: Monte Carlo against the exact
        expectation of the estimator on the grid (Z SE), and that expectation extrapolated onto the continuous value
        from the moment ODE.
    """
    out = []
    toy = GaussianLinearExample.from_preset("gauss1d-linear")
    sde, T = toy.sde, toy.sde.T
    I, qerr = shift_path_kl(sde, toy.shift, S_END)
    out.append(CheckResult.compare("control-kl-path/quad-vs-analytic", I, toy.path_kl_closed(S_END),
                                   qerr + 64 * EPS * I,
                                   "int 1/2 g^2 shift^2 (quad) vs w^2 s0^4 (a_e^2 - a_T^2)/(2 beta^2 D_e D_T)",
                                   kind="exact"))

    # (a) trajectories of the optimally controlled EM sampler, K = 1000
    K, n = 1000, 200
    grid = TimeGrid.uniform(T, K, s_end=S_END)
    tr = _optimal_em_trajectories(K, n)
    bounds = {"riemann": riemann_bound(lambda s: _F_rl(toy, s), S_END, T, K), "exact": weighted_sum_bound(toy, grid)}
    Ks = [K, 2 * K, 4 * K]
    for weight, bound in bounds.items():
        est = path_kl_from_trajectory(tr, sde, toy.s_pre, weight)
        disc = _weighted_shift_sum(toy, grid, weight)
        dev = float((est - disc).abs().max())
        out.append(CheckResult.compare(f"control-kl-path/mc-{weight}/K={K}", dev, 0.0, _rounding(disc, K),
                                       f"max over n={n} paths of |estimate - sum_k w_k shift_k^2/2| (SE 0: the shift "
                                       f"does not depend on x)", kind="exact"))
        out.append(CheckResult.compare(f"control-kl-path/{weight}-sum/K={K}", disc, I, bound,
                                       f"a-priori quadrature bound {bound:.2e}", kind="order"))
        sums = [_weighted_shift_sum(toy, TimeGrid.uniform(T, k, s_end=S_END), weight) for k in Ks]
        out.append(richardson_check(f"control-kl-path/{weight}-sum/richardson", Ks, sums, I, 1.0))

    # (b) the chain KL of the recorded EM trajectories is the Riemann sum; DDIM(1) converges at order 1
    dk = discrete_path_kl(tr, sde, toy.s_pre)
    riem = _weighted_shift_sum(toy, grid, "riemann")
    out.append(CheckResult.compare(f"control-kl-path/discrete-em/K={K}", float((dk - riem).abs().max()), 0.0,
                                   _rounding(riem, K), "max over paths |sum_k per-step KL - Riemann sum|",
                                   kind="exact"))
    Ks = [1000, 2000, 4000]
    sums = [float(shift_per_step_kl(sde, toy.shift, TimeGrid.uniform(T, k, s_end=S_END), "ddim", 1.0).sum())
            for k in Ks]
    out.append(order_check("control-kl-path/discrete-ddim1/order", Ks, sums, I, 1.0))
    out.append(richardson_check("control-kl-path/discrete-ddim1/richardson", Ks, sums, I, 1.0))

    # (c) torchsde logqp on the exploratory SDE (Euler, dt = (T - s_end)/K): the same left Riemann sum
    lr = _torchsde_log_ratio(toy, K)
    out.append(CheckResult.compare("control-kl-path/torchsde-vs-discrete-em", lr.mean(), riem, 1e-10 * I,
                                   "same left Riemann sum up to torchsde's accumulated time rounding", kind="exact"))
    out.append(CheckResult.compare("control-kl-path/torchsde-logqp/dt=1e-3", lr.mean(), I, bounds["riemann"],
                                   f"torchsde.sdeint(logqp=True), Euler; left Riemann bound {bounds['riemann']:.2e}",
                                   kind="order"))

    # (d) a control with state-dependent difference: s_theta = s_opt + kappa x
    kappa, K2, n2 = 0.3, 200, 4000
    est2 = _state_dependent_estimates(kappa, K2, n2)
    se2 = float(est2.std()) / math.sqrt(n2)
    disc2 = _discrete_expected_kl(toy, kappa, TimeGrid.uniform(T, K2, s_end=S_END))
    out.append(CheckResult.monte_carlo(f"control-kl-path/mc-state-dependent/K={K2}", est2.mean(), disc2, se2,
                                       f"s_theta = s_opt + {kappa} x, n={n2}: trajectory estimator vs its exact "
                                       f"expectation on the grid (moment recursion)"))
    Ks2 = [K2, 2 * K2, 4 * K2]
    discs = [_discrete_expected_kl(toy, kappa, TimeGrid.uniform(T, k, s_end=S_END)) for k in Ks2]
    out.append(richardson_check("control-kl-path/state-dependent/richardson", Ks2, discs,
                                _moment_ode_kl(toy, kappa, S_END), 1.0,
                                "continuous value from the moment ODE (solve_ivp, rtol 1e-11)",
                                extra_tol=1e-9))
    return out


@check("control-kl-eta")
@_one_thread
def eta_family_kl():
    """The eta-factor ((1 + eta^2)/(2 eta))^2 of the path KL (chapter 4, eq. ch04-eta), for eta = 0.5 and 0.2:

    * EM(eta): the chain KL per step is the factor times the Riemann term, exactly (gaussian_step vs eta_factor);
    * the trajectory estimator of an EM(eta) trajectory equals the chain KL of its transitions (exact);
    * DDIM(eta): the chain KL extrapolates (Richardson, K = 1000..4000) onto factor x I, I the eta = 1 path KL.
    """
    out = []
    toy = GaussianLinearExample.from_preset("gauss1d-linear")
    sde, T = toy.sde, toy.sde.T
    I, _ = shift_path_kl(sde, toy.shift, S_END)
    for eta in (0.5, 0.2):
        grid = TimeGrid.uniform(T, 200, s_end=S_END)
        em = float(shift_per_step_kl(sde, toy.shift, grid, "em", eta).sum())
        riem = eta_factor(eta) * _weighted_shift_sum(toy, grid, "riemann")
        out.append(CheckResult.compare(f"control-kl-eta/eta={eta:g}/em-chain = factor x riemann", em, riem,
                                       _rounding(em, grid.K), "K=200", kind="exact"))
        gen = torch.Generator().manual_seed(25)
        tr = reverse_sde_sample(sde, toy.s_opt, sde.prior_sample((50,), gen), grid, "em", eta, gen, record=True)
        est = path_kl_from_trajectory(tr, sde, toy.s_pre, "riemann")
        chain = discrete_path_kl(tr, sde, toy.s_pre)
        out.append(CheckResult.compare(f"control-kl-eta/eta={eta:g}/estimator = chain KL",
                                       float((est - chain).abs().max()), 0.0, _rounding(em, grid.K),
                                       "max over 50 EM(eta) paths, K=200", kind="exact"))
        Ks = [1000, 2000, 4000]
        sums = [float(shift_per_step_kl(sde, toy.shift, TimeGrid.uniform(T, k, s_end=S_END), "ddim", eta).sum())
                for k in Ks]
        cf, _ = shift_path_kl(sde, toy.shift, S_END, eta)
        out.append(richardson_check(f"control-kl-eta/eta={eta:g}/ddim-chain/richardson", Ks, sums, cf, 1.0,
                                    "closed form: factor x int 1/2 g^2 shift^2"))
    return out


# ------------------------------------------------------------------------------------------------
# data processing: terminal KL <= path KL
# ------------------------------------------------------------------------------------------------
def _terminal_laws(toy: GaussianLinearExample, K: int):
    grid = TimeGrid.uniform(toy.sde.T, K)
    return _affine_em_chain(toy.sde, toy.s_opt, grid), _affine_em_chain(toy.sde, toy.s_pre, grid)


@check("control-kl-dpi")
@_one_thread
def data_processing():
    """KL(p*_T || p^pre_T) <= KL(P* || P^pre) for the optimal control on both linear presets.

    Terminal KL and terminal mean shift: the exact laws of the discrete EM chains of the optimal and pretrained
    samplers (gaussian_chain, K = 400, 800, 1600), extrapolated (Richardson, order 1) onto (w v_T/beta)^2/(2 Var^pre_T)
    and w v_T/beta. The bound itself holds for the closed forms by algebra (ratio v_T/Var_T <= 1): an identity row.
    """
    out = []
    for name in ["gauss1d-linear", "gauss1d-linear-short"]:
        toy = GaussianLinearExample.from_preset(name)
        sde = toy.sde
        path = toy.path_kl_closed(0.0)
        I, qerr = shift_path_kl(sde, toy.shift, 0.0)
        out.append(CheckResult.compare(f"control-kl-dpi/{name}/path-kl", I, path, qerr + 64 * EPS * path,
                                       "quad vs w^2 v_T/(2 beta^2)", kind="exact"))
        Ks = [400, 800, 1600]
        kls, shifts = [], []
        for K in Ks:
            lo, lp = _terminal_laws(toy, K)
            kls.append(gaussian_kl(lo.mean, lo.cov, lp.mean, lp.cov))
            shifts.append(float(lo.mean[0] - lp.mean[0]))
        term = toy.terminal_kl_closed()
        out.append(richardson_check(f"control-kl-dpi/{name}/terminal-kl/richardson", Ks, kls, term, 1.0,
                                    "discrete EM laws vs (w v_T/beta)^2/(2 Var_T)"))
        out.append(richardson_check(f"control-kl-dpi/{name}/terminal-shift/richardson", Ks, shifts,
                                    toy.terminal_shift(), 1.0, "discrete EM laws vs w v_T/beta"))
        mcf, ccf = reverse_sde_terminal_law(toy_preset(name).data, sde)
        out.append(CheckResult.compare(f"control-kl-dpi/{name}/Var_T", toy.terminal_var_pre(), float(ccf[0, 0]),
                                       64 * EPS, "v_T + (alpha_T s0^2/D_T)^2 vs sacode.theory.exact_laws",
                                       kind="exact"))
        out.append(CheckResult.compare(f"control-kl-dpi/{name}/violation", max(0.0, term - path), 0.0, 0.0,
                                       f"terminal {term:.6f} <= path {path:.6f}, ratio v_T/Var_T = "
                                       f"{term / path:.6f}", kind="identity"))
    return out
