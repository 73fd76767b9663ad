"""Tests of sacode.theory.affine_policy and sacode.theory.policy_eval (chapter 6): closed forms, exactness, estimator means."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import Z, f64, make_gen
from sacode.theory import optimal as opt
from sacode.theory import policy_eval as pe
from sacode.theory.affine_policy import AffineScoreFamily, HatBasis, reward_coefficients
from sacode.theory.exact_laws import reverse_sde_terminal_law
from sacode.theory.presets import toy_preset
from sacode.theory.rewards import QuadraticReward
from sacode.dynamics.grid import TimeGrid
from sacode.dynamics.samplers import propagate_gaussian, reverse_sde_sample

THETA = np.array([0.1, 0.3, 0.5, 1.0, 1.5, 0.0, 0.0, -0.2, -0.5, -1.0])


def family(name="gauss1d-quadratic"):
    p = toy_preset(name)
    return AffineScoreFamily.from_preset(p, 5), p


# ------------------------------------------------------------------------------------------------
# the family
# ------------------------------------------------------------------------------------------------
def test_hat_basis_partition_of_unity_and_interpolation():
    b = HatBasis([0.0, 0.2, 0.7, 1.0])
    t = torch.linspace(0, 1, 37, dtype=torch.float64)
    phi = b(t)
    assert torch.allclose(phi.sum(1), torch.ones(37, dtype=torch.float64))
    assert torch.allclose(b(torch.tensor(b.knots)), torch.eye(4, dtype=torch.float64))
    c = np.array([1.0, -2.0, 0.5, 3.0])
    for tt in [0.0, 0.1, 0.45, 0.99, 1.0]:
        assert b.interp(tt, c) == pytest.approx(float(np.interp(tt, b.knots, c)), abs=1e-15)
        assert np.allclose(b.vector(tt), b(np.array([tt]))[0])
    with pytest.raises(ValueError, match="increasing"):
        HatBasis([0.0, 0.5, 0.5, 1.0])


def test_pretrained_score_and_score_fn_shapes():
    fam, p = family()
    x = f64([-1.0, 0.0, 0.7, 2.0])
    for s in [0.01, 0.3, 1.0]:
        assert torch.allclose(fam.pretrained_score(s, x), p.data.score(p.sde, s, x), atol=1e-14)
    sf = fam.score_fn(fam.zeros())
    assert torch.allclose(sf(0.3, x), p.data.score(p.sde, 0.3, x), atol=1e-14)
    assert sf(0.3, x[:, None]).shape == (4, 1)
    th = torch.as_tensor(THETA)
    t = 0.6
    th0 = np.interp(t, fam.basis.knots, THETA[:5])
    th1 = np.interp(t, fam.basis.knots, THETA[5:])
    expect = p.data.score(p.sde, 1.0 - t, x) + th0 + th1 * x
    assert torch.allclose(fam.score_fn(th)(1.0 - t, x), expect, atol=1e-14)


def test_bad_inputs_name_the_problem():
    fam, p = family()
    with pytest.raises(ValueError, match="vector of length 10"):
        pe.objective(fam, np.zeros(3), p.reward, p.beta)
    with pytest.raises(ValueError, match="1-D"):
        fam.pretrained_score(0.5, torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="stochastic sampler"):
        pe.discrete_objective(fam, THETA, p.reward, p.beta, TimeGrid.uniform(1.0, 10), "pf-euler")
    with pytest.raises(ValueError, match="deterministic"):
        pe.discrete_objective(fam, THETA, p.reward, p.beta, TimeGrid.uniform(1.0, 10), "ddim")
    grid = TimeGrid.uniform(1.0, 10)
    traj = reverse_sde_sample(p.sde, fam.score_fn(THETA), p.sde.prior_sample((5,), make_gen()), grid, "ddim", 1.0,
                              make_gen(), record=True)
    V = pe.value_function(fam, THETA, p.reward, p.beta)
    with pytest.raises(ValueError, match="Euler-Maruyama"):
        pe.pathwise_gradient(fam, THETA, traj, V, p.beta)
    with pytest.raises(TypeError, match="LinearReward or QuadraticReward"):
        reward_coefficients(lambda x: x)
    assert reward_coefficients(QuadraticReward(2.0, [2.0])) == (-1.0, 4.0, -4.0)


# ------------------------------------------------------------------------------------------------
# objectives
# ------------------------------------------------------------------------------------------------
def test_pretrained_objective_is_the_exact_terminal_law():
    for name in ["gauss1d-linear", "gauss1d-quadratic-short"]:
        fam, p = family(name)
        o = pe.objective(fam, fam.zeros(), p.reward, p.beta)
        m, C = reverse_sde_terminal_law(p.data, p.sde)
        assert o.kl == 0.0
        assert o.mean_T == pytest.approx(float(m[0]), abs=1e-9)
        assert o.var_T == pytest.approx(float(C[0, 0]), abs=1e-9)


def test_ode_error_is_within_objective_noise():
    fam, p = family()
    a = pe.objective(fam, THETA, p.reward, p.beta).objective
    b = pe.objective(fam, THETA, p.reward, p.beta, rtol=1e-13).objective
    assert abs(a - b) <= pe.objective_noise(a)


def test_discrete_moments_match_propagate_gaussian():
    fam, p = family()
    for method, grid in [("em", TimeGrid.uniform(1.0, 30)), ("ddim", TimeGrid.power(1.0, 30, 2.0, s_end=1e-3))]:
        d = pe.discrete_objective(fam, THETA, p.reward, p.beta, grid, method)
        m, C = propagate_gaussian(p.sde, fam.score_fn(THETA), grid, f64([0.0]), f64([[1.0]]), method)
        assert d.mean_T == pytest.approx(float(m[0]), abs=1e-13)
        assert d.var_T == pytest.approx(float(C[0, 0]), abs=1e-13)


def test_discrete_objective_em_kl_and_convergence():
    fam, p = family()
    grid = TimeGrid.uniform(1.0, 40)
    d = pe.discrete_objective(fam, THETA, p.reward, p.beta, grid)
    # em at eta = 1: per-step KL = (1/2) g^2 dt E(theta0 + theta1 x)^2
    g2 = p.sde.g2(grid.s[:-1]).numpy()
    th = [fam.theta_at(float(t), THETA) for t in grid.t[:-1]]
    expect = [0.5 * g2[k] * float(grid.dt[k]) * ((a + b * d.means[k]) ** 2 + b * b * d.vars[k])
              for k, (a, b) in enumerate(th)]
    assert np.allclose(d.kl_steps, expect, rtol=1e-12)
    J = pe.objective(fam, THETA, p.reward, p.beta).objective
    e1 = abs(pe.discrete_objective(fam, THETA, p.reward, p.beta, TimeGrid.uniform(1.0, 100)).objective - J)
    e2 = abs(pe.discrete_objective(fam, THETA, p.reward, p.beta, TimeGrid.uniform(1.0, 200)).objective - J)
    assert 1.7 < e1 / e2 < 2.3                         # first order in 1/K
    # ddim eta = 1 on a grid ending at s_end converges to J with the horizon T - s_end
    J_end = pe.objective(fam, THETA, p.reward, p.beta, t_end=1.0 - 1e-3).objective
    errs = [abs(pe.discrete_objective(fam, THETA, p.reward, p.beta, TimeGrid.uniform(1.0, K, s_end=1e-3),
                                      "ddim").objective - J_end) for K in (400, 800)]
    assert 1.6 < errs[0] / errs[1] < 2.4                # first order as well


# ------------------------------------------------------------------------------------------------
# value function, q, optimum
# ------------------------------------------------------------------------------------------------
def test_value_function_terminal_condition_and_mean():
    fam, p = family()
    V = pe.value_function(fam, THETA, p.reward, p.beta)
    x = f64([-1.0, 0.5, 3.0])
    assert torch.allclose(V(1.0, x), p.reward(x), atol=1e-13)
    J = pe.objective(fam, THETA, p.reward, p.beta).objective
    assert V.mean(0.0, 0.0, 1.0) == pytest.approx(J, abs=1e-8)


@pytest.mark.parametrize("name", ["gauss1d-linear", "gauss1d-quadratic", "gauss1d-quadratic-short"])
def test_optimal_control_is_the_tilted_score_and_value_is_vstar(name):
    fam, p = family(name)
    ofam = pe.optimal_family(fam, p.reward, p.beta)
    x = f64([-1.5, 0.0, 0.8, 2.5])
    V = pe.value_function(ofam, ofam.zeros(), p.reward, p.beta)
    for t in [0.05, 0.4, 0.8, 0.97]:
        a_mine = ofam.control(t, x, ofam.zeros())
        assert torch.allclose(a_mine, opt.optimal_control(p, t, x), atol=1e-10)
        # V^{theta*} (policy evaluation ODE) = V* (Cole-Hopf closed form)
        assert torch.allclose(V(t, x), opt.optimal_value(p, t, x), atol=1e-7)
        q2, q1, q0 = pe.optimal_value_coefficients(fam, p.reward, p.beta, t)
        assert torch.allclose(q2 * x**2 + q1 * x + q0, opt.optimal_value(p, t, x), atol=1e-12)
    if name == "gauss1d-linear":
        _, th1 = pe.optimal_affine_control(fam, p.reward, p.beta)
        assert np.allclose(th1(np.linspace(0, 1, 11)), 0.0)


def test_q_rate_integrates_to_zero_and_advantage_is_its_mean():
    fam, p = family()
    th, thn = torch.as_tensor(THETA), torch.as_tensor(THETA + 0.3)
    V = pe.value_function(fam, th, p.reward, p.beta)
    nodes, w = np.polynomial.hermite_e.hermegauss(6)
    w = torch.as_tensor(w / w.sum())
    x = f64([-1.0, 0.2, 2.0])
    for t, sig2 in [(0.1, 4.0), (0.7, 0.5)]:
        mu = fam.action_mean(t, x, th)
        mun = fam.action_mean(t, x, thn)
        q = torch.stack([pe.q_rate(fam, th, V, p.beta, t, x, mu + math.sqrt(sig2) * z, sig2) for z in nodes])
        assert (w[:, None] * q).sum(0).abs().max() < 1e-12
        qn = torch.stack([pe.q_rate(fam, th, V, p.beta, t, x, mun + math.sqrt(sig2) * z, sig2) for z in nodes])
        A = pe.advantage_rate(fam, th, thn, V, p.beta, t, x)
        assert torch.allclose((w[:, None] * qn).sum(0), A, atol=1e-12)


def test_optimality_gap_is_beta_times_path_kl():
    fam, p = family()
    ofam = pe.optimal_family(fam, p.reward, p.beta)
    d = np.r_[0.2 * np.ones(5), [0.0, -0.3, 0.1, 0.2, 0.4]]
    Js = pe.affine_optimal_objective(fam, p.reward, p.beta)
    J = pe.objective(ofam, d, p.reward, p.beta).objective
    assert Js - J == pytest.approx(p.beta * pe.path_kl(ofam, d, ofam.zeros()), abs=1e-8)
    assert Js - J > 0


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
def test_exact_gradient_matches_finite_differences():
    fam, p = family()
    J = pe.objective(fam, THETA, p.reward, p.beta).objective
    fd, err = pe.finite_difference_gradient(lambda th: pe.objective(fam, th, p.reward, p.beta).objective, THETA,
                                            noise=pe.objective_noise(J))
    g = pe.exact_gradient(fam, THETA, p.reward, p.beta)
    assert np.all(np.abs(g - fd) <= err + 1e-8)


def test_estimators_are_unbiased_for_their_exact_grid_means():
    """Each estimator's Monte-Carlo mean matches its exact mean on the grid within Z standard errors."""
    fam, p = family()
    grid = TimeGrid.uniform(1.0, 40)
    V = pe.value_function(fam, THETA, p.reward, p.beta)
    n = 6000
    traj = pe.sample_trajectories(fam, THETA, n, grid, make_gen(3))
    for form, est in [("pathwise", pe.pathwise_gradient(fam, THETA, traj, V, p.beta)),
                      ("lr-exact", pe.likelihood_ratio_gradient(fam, THETA, traj, V, p.beta, "exact")),
                      ("lr-td", pe.likelihood_ratio_gradient(fam, THETA, traj, V, p.beta, "td")),
                      ("lr-return", pe.likelihood_ratio_gradient(fam, THETA, traj, V, p.beta, "return", p.reward))]:
        mean = pe.expected_estimate(fam, THETA, V, p.beta, grid, form, p.reward)
        assert est.samples.shape == (n, 10)
        assert np.all(np.abs(est.mean - mean) <= Z * est.se + 1e-6), form


def test_surrogate_mean_and_clipping():
    fam, p = family()
    grid = TimeGrid.uniform(1.0, 40)
    thn = THETA + np.r_[0.1 * np.ones(5), np.zeros(5)]
    V = pe.value_function(fam, THETA, p.reward, p.beta)
    traj = pe.sample_trajectories(fam, THETA, 6000, grid, make_gen(4))
    est = pe.importance_weighted_surrogate(fam, THETA, thn, traj, V, p.beta)
    exact = pe.expected_surrogate(fam, THETA, thn, V, p.beta, grid)
    assert abs(est.mean - exact) <= Z * est.se
    sampled = pe.importance_weighted_surrogate(fam, THETA, thn, traj, V, p.beta, kl="sampled")
    assert abs(sampled.mean - exact) <= Z * sampled.se
    assert sampled.se > est.se                                      # the sampled KL noise costs variance
    clipped = pe.importance_weighted_surrogate(fam, THETA, thn, traj, V, p.beta, clip=0.01)
    assert np.all(clipped.samples <= est.samples + 1e-12)          # the clip is pessimistic
    same = pe.importance_weighted_surrogate(fam, THETA, THETA, traj, V, p.beta)
    assert abs(same.mean) <= Z * same.se                            # L_theta(theta) = J(theta)


# ------------------------------------------------------------------------------------------------
# performance difference
# ------------------------------------------------------------------------------------------------
def test_performance_difference_and_bounds():
    fam, p = family()
    d = np.r_[0.2 * np.ones(5), 0.0, 0.0, 0.0, -0.3, -0.3]
    for eps in [0.05, 1.0]:
        r = pe.performance_difference(fam, THETA, THETA + eps * d, p.reward, p.beta)
        assert r.pdl == pytest.approx(r.difference, abs=1e-8)
        assert r.local_error <= r.bound_marginal <= r.bound_path
        assert math.isinf(r.bound_sup)                 # A^theta is quadratic in x: the sup-norm bound is vacuous
        assert r.kl_path == pytest.approx(pe.path_kl(fam, THETA + eps * d, THETA), rel=1e-8)
    # the local approximation error is second order in the step
    e1 = pe.performance_difference(fam, THETA, THETA + 0.02 * d, p.reward, p.beta).local_error
    e2 = pe.performance_difference(fam, THETA, THETA + 0.01 * d, p.reward, p.beta).local_error
    assert 3.5 < e1 / e2 < 4.5


def test_linear_reward_shift_local_approximation_is_exact():
    fam, p = family("gauss1d-linear")
    d = np.r_[np.ones(5), np.zeros(5)]
    r = pe.performance_difference(fam, fam.zeros(), d, p.reward, p.beta)
    assert r.local == pytest.approx(r.difference, abs=1e-8)      # A is constant in x
    assert math.isfinite(r.bound_sup)
