"""Checks of chapter 6 (policy evaluation, q-function, policy gradients, performance difference).

All on the 1-D Gaussian toys with the affine family mu = s_pre + theta0(t) + theta1(t) x (5 hat knots), where
J, V^theta, q, grad J and the performance difference are exact (moment ODEs, rtol 1e-10). Monte-Carlo checks
compare a simulation with the exact mean of the same estimator on its grid (the exact moments of the
Euler-Maruyama chain) at Z standard errors; separate order rows extrapolate those exact grid values (Richardson,
K, 2K, 4K) onto the continuous closed form (V^theta, the finite-difference derivative of the exact J). Exact checks
allow EXACT_TOL.
"""
from __future__ import annotations

import functools
import math
from functools import lru_cache

import numpy as np
import torch

from ..theory import policy_eval as pe
from ..theory.affine_policy import AffineScoreFamily
from ..theory.presets import toy_preset
from ..dynamics.grid import TimeGrid
from ..dynamics.time import diffusion_time
from . import CheckResult, check
from .convergence import order_check, richardson_check

EXACT_TOL = 1e-8
"""Tolerance of comparisons between exact ODE results: 100 x the integrators' rtol (1e-10) on O(1) values."""

THETA_NT = np.array([0.1, 0.3, 0.5, 1.0, 1.5, 0.0, 0.0, -0.2, -0.5, -1.0])
"""A non-trivial parameter of the 5-knot family: theta0 rising to 1.5, theta1 falling to -1 at t = T."""


def _one_thread(fn):
    """Run a check with one intra-op torch thread (restored afterwards): these are many small tensor ops, where a
    second thread on a loaded 2-core machine slows transcendental functions by ~100x."""
    @functools.wraps(fn)
    def wrapped():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)
    return wrapped


def _family(name: str) -> tuple[AffineScoreFamily, object]:
    p = toy_preset(name)
    return AffineScoreFamily.from_preset(p, 5), p


def _value_grid(s0: float, K: int, T: float) -> TimeGrid:
    return TimeGrid(torch.linspace(s0, 0.0, K + 1, dtype=torch.float64), T)


@check("policy-value")
@_one_thread
def policy_value():
    """V^theta(t, x) from the backward ODEs vs Monte-Carlo returns from (t, x) (gauss1d-quadratic, THETA_NT).

    Returns use Euler-Maruyama with per-step KLs. Monte Carlo: the mean return against its exact mean on the same
    grid, V_K(t, x), from the discrete moment recursion started at the point mass (Z SE). Order: V_K at K, 2K, 4K
    extrapolated (Richardson) onto V^theta(t, x). Also E V^theta(0, X_0) = J(theta) (exact).
    """
    fam, p = _family("gauss1d-quadratic")
    V = pe.value_function(fam, THETA_NT, p.reward, p.beta)
    out = []
    n = 20000
    for t0, x0 in [(0.0, 0.0), (0.5, -1.0), (0.85, 2.5)]:
        s0 = diffusion_time(t0, fam.T)
        K = max(20, int(round(200 * s0)))
        grid = _value_grid(s0, K, fam.T)
        gen = torch.Generator().manual_seed(11)
        R = pe.sample_returns(fam, THETA_NT, p.reward, p.beta, grid, torch.full((n,), x0, dtype=torch.float64), gen)
        vks = [pe.discrete_objective(fam, THETA_NT, p.reward, p.beta, _value_grid(s0, k, fam.T), mean0=x0,
                                     var0=0.0).objective for k in (K, 2 * K, 4 * K)]
        v = float(V(t0, torch.tensor([x0], dtype=torch.float64)))
        se = float(R.std()) / math.sqrt(n)
        out.append(CheckResult.monte_carlo(f"policy-value/V(t={t0:g},x={x0:g})", R.mean(), vks[0], se,
                                           f"n={n}, K={K}: mean return vs its exact mean V_K on the grid"))
        out.append(richardson_check(f"policy-value/V(t={t0:g},x={x0:g})/richardson", [K, 2 * K, 4 * K], vks, v, 1.0,
                                    "V_K vs V^theta (backward ODEs)", extra_tol=EXACT_TOL))
    J = pe.objective(fam, THETA_NT, p.reward, p.beta).objective
    out.append(CheckResult.compare("policy-value/E V(0,X0) = J", V.mean(0.0, 0.0, fam.sde.prior_std() ** 2), J,
                                   EXACT_TOL, "backward Feynman-Kac ODE vs forward moment ODE", kind="exact"))
    return out


@check("policy-q")
@_one_thread
def policy_q():
    """The closed-form q-function vs its definition q = d_t V + b.grad V + g^2/2 V'' + r, and int q dpi = 0.

    d_t V by central differences of the dense ODE solution (steps h, h/2; error |D_h - D_{h/2}|); int q dpi by
    5-point Gauss-Hermite quadrature, exact for a quadratic in a (tolerance: float64 rounding of the summands). The
    second holds for any beta and any V (the closed form is centred by construction): an identity row.
    """
    fam, p = _family("gauss1d-quadratic")
    beta = p.beta
    V = pe.value_function(fam, THETA_NT, p.reward, beta)
    th = torch.as_tensor(THETA_NT)
    x = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64)
    a = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    tr_sigma = 3.0
    out = []
    worst, tol = 0.0, 0.0
    for t in [0.2, 0.6, 0.9]:
        s = torch.tensor(diffusion_time(t, fam.T), dtype=torch.float64)
        g2, f = float(fam.sde.g2(s)), float(fam.sde.f_coef(s))
        d = []
        for h in (1e-3, 5e-4):
            d.append((V(t + h, x) - V(t - h, x)) / (2 * h))
        dV, err = d[1], (d[0] - d[1]).abs()
        p2, _, _ = V.coefficients(t)
        sp = fam.pretrained_score(s, x)
        r = -0.5 * beta * g2 * ((a - sp) ** 2 - tr_sigma)    # centred running reward (V leaves out the constant)
        q_def = dV + (-f * x + g2 * a) * V.grad(t, x) + g2 * p2 + r
        q_cf = pe.q_rate(fam, th, V, beta, t, x, a, tr_sigma)
        worst = max(worst, float((q_def - q_cf).abs().max()))
        tol = max(tol, float(err.max()))
    out.append(CheckResult.compare("policy-q/closed form = definition", worst, 0.0, tol,
                                   "max over 9 (t, x, a); d_t V by finite differences", kind="exact"))
    nodes, weights = np.polynomial.hermite_e.hermegauss(5)
    weights = weights / weights.sum()
    worst, scale = 0.0, 0.0
    for t in [0.1, 0.5, 0.95]:
        for sig2 in [0.3, 5.0]:
            mu = fam.action_mean(torch.tensor(t, dtype=torch.float64), x, th)
            qs = torch.stack([pe.q_rate(fam, th, V, beta, t, x, mu + math.sqrt(sig2) * z, sig2) for z in nodes])
            mean = (torch.as_tensor(weights)[:, None] * qs).sum(0)
            worst = max(worst, float(mean.abs().max()))
            scale = max(scale, float(qs.abs().max()))
    out.append(CheckResult.compare("policy-q/int q dpi = 0", worst, 0.0, 50 * np.finfo(float).eps * scale,
                                   "Gauss-Hermite, 6 (t, Sigma) x 3 x", kind="identity"))
    return out


def _directional_fd(fam, p, theta, d, h=1e-3):
    fun = lambda eps: pe.objective(fam, theta + eps * d, p.reward, p.beta).objective
    g, err = pe.finite_difference_gradient(lambda e: fun(float(e[0])), np.zeros(1), h,
                                           noise=pe.objective_noise(fun(0.0)))
    return float(g[0]), float(err[0])


@check("policy-gradient")
@_one_thread
def policy_gradient():
    """Pathwise and likelihood-ratio Monte-Carlo gradients vs finite differences of the exact J.

    For gauss1d-linear and gauss1d-quadratic, at theta = 0 (pretrained) and THETA_NT: the exact pathwise formula
    (moments) vs central differences of J in every component; then each estimator along two directions, a constant
    shift of theta0 and a constant theta1. Monte Carlo: the estimate against its exact mean on the same grid
    (Z SE). Order: that exact mean at K, 2K, 4K extrapolated (Richardson) onto the directional finite difference of
    the exact J (plus the finite-difference error).
    """
    out = []
    n, K = 20000, 200
    grid = TimeGrid.uniform(1.0, K)
    Ks = [K, 2 * K, 4 * K]
    nb = 5
    dirs = {"shift0": np.r_[np.ones(nb), np.zeros(nb)], "theta1": np.r_[np.zeros(nb), np.ones(nb)]}
    for name in ["gauss1d-linear", "gauss1d-quadratic"]:
        fam, p = _family(name)
        for tlabel, theta in [("pre", np.zeros(2 * nb)), ("nt", THETA_NT)]:
            V = pe.value_function(fam, theta, p.reward, p.beta)
            g_exact = pe.exact_gradient(fam, theta, p.reward, p.beta, V)
            J = pe.objective(fam, theta, p.reward, p.beta).objective
            fd, err = pe.finite_difference_gradient(lambda th: pe.objective(fam, th, p.reward, p.beta).objective,
                                                    theta, noise=pe.objective_noise(J))
            i = int(np.argmax(np.abs(g_exact - fd) - err))
            out.append(CheckResult.compare(f"policy-gradient/{name}/{tlabel}/exact vs FD", g_exact[i], fd[i],
                                           err[i] + EXACT_TOL, f"worst of {theta.size} components (#{i})",
                                           kind="exact"))
            traj = _trajectories(name, tlabel, n, K)
            ests = {"pathwise": pe.pathwise_gradient(fam, theta, traj, V, p.beta),
                    "lr-exact": pe.likelihood_ratio_gradient(fam, theta, traj, V, p.beta, "exact")}
            for form, est in ests.items():
                means = [_grid_mean(name, tlabel, form, k) for k in Ks]
                for dlabel, d in dirs.items():
                    fd_d, err_d = _directional_fd(fam, p, theta, d)
                    samples = est.samples @ d
                    se = float(samples.std(ddof=1)) / math.sqrt(n)
                    row = f"policy-gradient/{name}/{tlabel}/{form}/{dlabel}"
                    exact_mean = float(means[0] @ d)
                    out.append(CheckResult.sampled(row, samples.mean(), exact_mean, se,
                                                   K * 64 * np.finfo(float).eps * max(1.0, abs(exact_mean)),
                                                   f"n={n}, K={K}: estimate vs its exact mean on the grid"))
                    out.append(richardson_check(row + "/richardson", Ks, [float(m @ d) for m in means], fd_d, 1.0,
                                                f"exact mean on the grid vs the finite difference of J "
                                                f"(FD error {err_d:.1e})", extra_tol=err_d))
    return out


@lru_cache(maxsize=None)
def _grid_mean(name: str, tlabel: str, form: str, K: int) -> np.ndarray:
    """The exact mean of an estimator on the uniform K-step grid (a discrete quantity: no closed form enters)."""
    fam, p = _family(name)
    theta = np.zeros(10) if tlabel == "pre" else THETA_NT
    V = pe.value_function(fam, theta, p.reward, p.beta)
    return pe.expected_estimate(fam, theta, V, p.beta, TimeGrid.uniform(1.0, K), form)


@lru_cache(maxsize=None)
def _trajectories(name: str, tlabel: str, n: int, K: int):
    fam, _ = _family(name)
    theta = np.zeros(10) if tlabel == "pre" else THETA_NT
    return pe.sample_trajectories(fam, theta, n, TimeGrid.uniform(1.0, K), torch.Generator().manual_seed(12))


@check("policy-pd")
@_one_thread
def policy_performance_difference():
    """J(theta') - J(theta) = E^theta' int A^theta dt (exact), and |J(theta') - L_theta(theta')| <= bound.

    Bounds (corrected, chapter 6): marginal int sqrt(2 (E'A^2 + E A^2) KL(p'_t||p_t)) dt and path
    sqrt(2 KL(P'||P)) int sqrt(E'A^2 + E A^2) dt. A row passes when the local-approximation error is <= the bound.
    """
    out = []
    cases = [("gauss1d-quadratic", THETA_NT, np.r_[0.2 * np.ones(5), 0.0, 0.0, 0.0, -0.3, -0.3]),
             ("gauss1d-linear", np.zeros(10), np.r_[np.zeros(5), -0.3 * np.ones(5)])]
    for name, theta, d in cases:
        fam, p = _family(name)
        for eps in [0.1, 0.5, 2.0]:
            r = pe.performance_difference(fam, theta, theta + eps * d, p.reward, p.beta)
            out.append(CheckResult.compare(f"policy-pd/{name}/eps={eps:g}/formula", r.pdl, r.difference,
                                           EXACT_TOL * (1 + abs(r.j_old) + abs(r.j_new)),
                                           "E^theta' int A dt vs J(theta') - J(theta)", kind="exact"))
            out.append(CheckResult.compare(f"policy-pd/{name}/eps={eps:g}/|J-L| <= marginal bound", r.local_error,
                                           0.0, r.bound_marginal, f"KL path {r.kl_path:.2e}; sup-bound "
                                           f"{'inf' if math.isinf(r.bound_sup) else f'{r.bound_sup:.2e}'}",
                                           kind="exact"))
            out.append(CheckResult.compare(f"policy-pd/{name}/eps={eps:g}/|J-L| <= path bound", r.local_error,
                                           0.0, r.bound_path, kind="exact"))
    return out


@check("policy-optimal")
@_one_thread
def policy_optimal():
    """The optimal control a* = s_pre + grad V*/beta lies in the affine family and attains J*.

    J(theta*) by the moment ODE vs the closed form J* = E V*(0, X_0) (and vs sacode.theory.optimal's J*);
    J* - J(theta* + delta) = beta KL(P^{theta*+delta} || P^*) (performance difference at the optimum; > 0);
    grad J(theta*) = 0 in every basis direction.
    """
    from ..theory import optimal as opt

    out = []
    for name in ["gauss1d-linear", "gauss1d-quadratic", "gauss1d-linear-short", "gauss1d-quadratic-short"]:
        fam, p = _family(name)
        ofam = pe.optimal_family(fam, p.reward, p.beta)
        J_theta = pe.objective(ofam, ofam.zeros(), p.reward, p.beta).objective
        J_star = pe.affine_optimal_objective(fam, p.reward, p.beta)
        out.append(CheckResult.compare(f"policy-optimal/{name}/J(theta*) = J*", J_theta, J_star, EXACT_TOL,
                                       kind="exact"))
        out.append(CheckResult.compare(f"policy-optimal/{name}/J* vs sacode.theory.optimal", J_star,
                                       opt.optimal_objective(p).J, EXACT_TOL, "two closed forms", kind="exact"))
        g = pe.exact_gradient(ofam, ofam.zeros(), p.reward, p.beta)
        out.append(CheckResult.compare(f"policy-optimal/{name}/max|grad J(theta*)|", np.abs(g).max(), 0.0, EXACT_TOL,
                                       kind="exact"))
        if name.endswith("-short"):
            continue
        for dlabel, d in [("shift0", np.r_[0.3 * np.ones(5), np.zeros(5)]),
                          ("theta1", np.r_[np.zeros(5), [0.0, 0.2, -0.4, 0.5, -0.6]])]:
            J_pert = pe.objective(ofam, d, p.reward, p.beta).objective
            kl = pe.path_kl(ofam, d, ofam.zeros())
            out.append(CheckResult.compare(f"policy-optimal/{name}/J*-J(theta*+{dlabel}) = beta KL", J_star - J_pert,
                                           p.beta * kl, EXACT_TOL, f"gap {J_star - J_pert:.3e} > 0", kind="exact"))
    return out


@check("policy-discrete")
@_one_thread
def policy_discrete():
    """J_K of the Euler-Maruyama sampler (exact moment recursion) converges to J at first order in 1/K.

    gauss1d-quadratic at THETA_NT, K = 50..400: the slope of log|J_K - J| against log K (tolerance 0.1, as for the
    samplers' weak-order checks), and the Richardson extrapolation of J_K onto J.
    """
    fam, p = _family("gauss1d-quadratic")
    J = pe.objective(fam, THETA_NT, p.reward, p.beta).objective
    Ks = [50, 100, 200, 400]
    JK = [pe.discrete_objective(fam, THETA_NT, p.reward, p.beta, TimeGrid.uniform(1.0, K)).objective for K in Ks]
    return [order_check("policy-discrete/em order of J_K -> J", Ks, JK, J, 1.0),
            richardson_check("policy-discrete/J_K -> J/richardson", Ks[1:], JK[1:], J, 1.0, extra_tol=EXACT_TOL)]
