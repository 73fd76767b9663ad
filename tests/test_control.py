"""The control formulation (sacode.theory.control): dynamics, rewards, the Gaussian score-action policy, sampler steps as
policies, the change-of-variables identity, rollouts with sampled actions, and bad input.

Oracles: sde.reverse_drift (the sampler's own drift), torch.distributions.Normal, the recorded means/stds/log-densities
of sacode.dynamics.samplers, closed forms of the VP DDIM(eta=1) step written with alpha_bar, and the exact discrete Gaussian
law (propagate_gaussian) for Monte-Carlo comparisons within Z standard errors.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import Z, f64, make_gen
from sacode.dynamics.gaussian_step import gaussian_log_prob, gaussian_step
from sacode.theory.control import (ScoreActionPolicy, ScoreControlProblem, action_of_transition, rollout,
                                   transition_log_prob_via_policy)
from sacode.theory.data import ring_mixture
from sacode.theory.presets import toy_preset
from sacode.theory.rewards import LinearReward
from sacode.dynamics.grid import TimeGrid
from sacode.dynamics.samplers import get_step, propagate_gaussian, reverse_sde_sample
from sacode.dynamics.sde import OUSDE, VESDE, VPSDE
from sacode.theory.kl import GaussianLinearExample

TOY = GaussianLinearExample.from_preset("gauss1d-linear")
SDE = TOY.sde


def _problem(beta=0.5):
    return ScoreControlProblem(SDE, TOY.s_pre, LinearReward([1.0]), beta)


def test_fast_gaussian_score_matches_data_score():
    data = toy_preset("gauss1d-linear").data
    x = f64([-1.0, 0.2, 2.0])
    for s in [0.01, 0.3, 1.0]:
        torch.testing.assert_close(TOY.s_pre(s, x), data.score(SDE, s, x), rtol=1e-13, atol=1e-14)


# --- dynamics and rewards --------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 0.37, 0.999])
def test_drift_is_the_sampler_drift_in_rl_time(t):
    pb = _problem()
    x = f64([-1.0, 0.5, 2.0])
    a = f64([0.3, -0.2, 1.1])
    torch.testing.assert_close(pb.b(t, x, a), SDE.reverse_drift(SDE.T - t, x, a, 1.0), rtol=1e-14, atol=0)
    torch.testing.assert_close(pb.sigma(t, x), SDE.g(f64(SDE.T - t)).expand(3), rtol=1e-14, atol=0)


def test_b_is_affine_in_the_action():
    pb = _problem()
    x, a1, a2 = f64([0.1, 0.7]), f64([1.0, -2.0]), f64([0.3, 0.4])
    lhs = pb.b(0.4, x, 0.25 * a1 + 0.75 * a2)
    torch.testing.assert_close(lhs, 0.25 * pb.b(0.4, x, a1) + 0.75 * pb.b(0.4, x, a2), rtol=1e-13, atol=1e-14)


def test_running_reward_and_its_policy_average(gen=None):
    gen = make_gen(1)
    pb = _problem(beta=0.7)
    t, std = 0.6, 0.4
    x = f64([0.3]).expand(200_000).clone()
    pol = ScoreActionPolicy(TOY.s_opt, std, SDE.T)
    a = pol.sample(t, x, gen)
    r = pb.running_reward(t, x, a)
    g2 = float(SDE.g2(f64(SDE.T - t)))
    exact = -0.5 * 0.7 * g2 * ((a - pb.pretrained_action(t, x)) ** 2)
    torch.testing.assert_close(r, exact, rtol=1e-13, atol=1e-14)
    mean_r = pb.mean_running_reward(t, x[:1], pol)
    se = float(r.std()) / math.sqrt(r.numel())
    assert abs(float(r.mean()) - float(mean_r)) < Z * se
    shift = float(TOY.shift(SDE.T - t))
    assert math.isclose(float(mean_r), -0.5 * 0.7 * g2 * (shift**2 + std**2), rel_tol=1e-12)


def test_terminal_reward():
    pb = _problem()
    torch.testing.assert_close(pb.reward(f64([1.5, -2.0])), f64([1.5, -2.0]))
    with pytest.raises(ValueError, match="no terminal reward"):
        ScoreControlProblem(SDE, TOY.s_pre).reward(f64([1.0]))


# --- the Gaussian score-action policy ---------------------------------------------------------------
def test_policy_log_prob_sample_entropy():
    data = ring_mixture()
    pol = ScoreActionPolicy(data.score_fn(SDE), lambda t: 0.2 + 0.1 * t, SDE.T)
    x = torch.randn(5, 2, generator=make_gen(2), dtype=torch.float64)
    t = f64([0.1, 0.2, 0.3, 0.4, 0.5])
    a = torch.randn(5, 2, generator=make_gen(3), dtype=torch.float64)
    mu = data.score(SDE, SDE.T - t, x)
    ref = torch.distributions.Normal(mu, (0.2 + 0.1 * t)[:, None]).log_prob(a).sum(1)
    torch.testing.assert_close(pol.log_prob(t, x, a), ref, rtol=1e-13, atol=1e-13)
    ent = torch.distributions.Normal(mu, (0.2 + 0.1 * t)[:, None]).entropy().sum(1)
    torch.testing.assert_close(pol.entropy(t, x), ent, rtol=1e-13, atol=1e-13)
    # sampling: mean and std within Z standard errors
    xx = f64([[0.5, -0.3]]).expand(100_000, 2).clone()
    s = pol.sample(0.3, xx, make_gen(4))
    mu0 = pol.mean(0.3, xx[:1])[0]
    assert ((s.mean(0) - mu0).abs() < Z * 0.23 / math.sqrt(1e5)).all()
    assert ((s.std(0) - 0.23).abs() < Z * 0.23 / math.sqrt(2e5)).all()


def test_policy_rejects_bad_std():
    with pytest.raises(ValueError, match="std"):
        ScoreActionPolicy(TOY.s_pre, -1.0, 1.0)
    pol = ScoreActionPolicy(TOY.s_pre, 0.0, 1.0)
    with pytest.raises(ValueError, match="positive exploration std"):
        pol.log_prob(0.5, f64([0.0]), f64([0.0]))


def test_problem_rejects_bad_input():
    with pytest.raises(ValueError, match="beta"):
        ScoreControlProblem(SDE, TOY.s_pre, None, -1.0)
    with pytest.raises(ValueError, match="shape of the state"):
        _problem().b(0.2, f64([0.0, 1.0]), f64([0.0]))


# --- sampler steps as policies -----------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), VESDE(0.01, 10.0), OUSDE(1.0, math.sqrt(2.0), 5.0)],
                         ids=["vp", "ve", "ou"])
@pytest.mark.parametrize("method,eta", [("em", 1.0), ("em", 0.5), ("ddim", 1.0), ("ddim", 0.5), ("ddim", 0.0)])
def test_step_mean_is_affine_in_the_score(sde, method, eta):
    x = f64([-1.0, 0.3, 2.0])
    sc = f64([0.7, -0.4, 0.1])
    sc_fn = lambda s, y: sc
    s_cur, s_next = 0.6 * sde.T, 0.55 * sde.T
    st = get_step(method)(sde, sc_fn, x, s_cur, s_next, None, eta=eta)
    coef = gaussian_step(sde, s_cur, s_next, method, eta)
    torch.testing.assert_close(coef.A * x + coef.B * sc, st.mean, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(coef.std.expand(3), st.std, rtol=1e-13, atol=1e-15)


def test_em_policy_covariance_is_inverse_g2_dt():
    grid = TimeGrid.uniform(SDE.T, 30)
    coef = gaussian_step(SDE, grid.s[:-1], grid.s[1:], "em", 1.0)
    torch.testing.assert_close(coef.policy_std**2, 1.0 / (SDE.g2(grid.s[:-1]) * grid.dt), rtol=1e-13, atol=0)


def test_ddim_eta1_coefficients_in_alpha_bar_form():
    """VP DDIM(1): B = (abar_n - abar_c)/sqrt(abar_c abar_n), std^2 = (1-abar_n)(abar_n-abar_c)/(abar_n (1-abar_c))."""
    sc, sn = f64(0.5), f64(0.45)
    ac, an = SDE.alpha_bar(sc), SDE.alpha_bar(sn)
    coef = gaussian_step(SDE, sc, sn, "ddim", 1.0)
    torch.testing.assert_close(coef.B, (an - ac) / torch.sqrt(ac * an), rtol=1e-12, atol=0)
    torch.testing.assert_close(coef.std**2, (1 - an) * (an - ac) / (an * (1 - ac)), rtol=1e-12, atol=0)
    torch.testing.assert_close(coef.A, torch.sqrt(an / ac), rtol=1e-14, atol=0)


@pytest.mark.parametrize("method,eta", [("em", 1.0), ("ddim", 1.0), ("ddim", 0.5)])
def test_transition_density_is_policy_density_2d(method, eta):
    data = ring_mixture()
    score = data.score_fn(SDE)
    grid = TimeGrid.uniform(SDE.T, 6, s_end=1e-3)
    gen = make_gen(5)
    tr = reverse_sde_sample(SDE, score, SDE.prior_sample((50, 2), gen), grid, method, eta, gen, record=True)
    pol = ScoreActionPolicy.of_sampler(SDE, score, grid, method, eta)
    for k in range(grid.K):
        coef = gaussian_step(SDE, grid.s[k], grid.s[k + 1], method, eta)
        lp = transition_log_prob_via_policy(pol, grid.t[k], tr.xs[k], tr.xs[k + 1], coef)
        torch.testing.assert_close(lp, tr.log_probs[k], rtol=1e-12, atol=1e-12)
        a = action_of_transition(tr.xs[k], tr.xs[k + 1], coef)
        # the action is the score plus policy noise: (a - score) / policy_std is the sampler's standard normal
        zhat = (a - tr.scores[k]) / coef.policy_std
        torch.testing.assert_close(zhat, (tr.xs[k + 1] - tr.means[k]) / coef.std, rtol=1e-9, atol=1e-9)


def test_of_sampler_policy_is_defined_on_the_grid_only():
    grid = TimeGrid.uniform(SDE.T, 10)
    pol = ScoreActionPolicy.of_sampler(SDE, TOY.s_pre, grid, "em", 1.0)
    x = f64([0.0, 1.0])
    expect = gaussian_step(SDE, grid.s[3], grid.s[4], "em").policy_std
    torch.testing.assert_close(pol.std(grid.t[3], x), expect.expand(2))
    with pytest.raises(ValueError, match="grid"):
        pol.std(0.05, x)


def test_gaussian_step_errors():
    with pytest.raises(ValueError, match="covers the methods"):
        gaussian_step(SDE, 0.5, 0.4, "pf-heun")
    with pytest.raises(ValueError, match="s_next < s_cur"):
        gaussian_step(SDE, 0.4, 0.5, "em")


# --- rollouts with sampled actions ------------------------------------------------------------------
def test_sampled_actions_without_brownian_noise_have_the_em_law():
    """x' = x + b(t, x, a) dt, a ~ N(s, 1/(g^2 dt)): exactly the law of the EM step (chapter 3)."""
    K, n = 20, 40_000
    grid = TimeGrid.uniform(SDE.T, K, s_end=1e-3)
    pb = _problem()
    pol = ScoreActionPolicy.of_sampler(SDE, TOY.s_opt, grid, "em", 1.0)
    tr = rollout(pb, pol, grid, pol.transition(SDE, brownian=False), n, make_gen(7),
                 x_init=SDE.prior_sample((n,), make_gen(6)))
    m, C = propagate_gaussian(SDE, TOY.s_opt, grid, f64([0.0]), f64([[1.0]]), "em", 1.0)
    x = tr.x
    assert abs(float(x.mean() - m[0])) < Z * float(x.std()) / math.sqrt(n)
    c = x - x.mean()
    se_v = math.sqrt(float((c**4).mean() - (c**2).mean() ** 2) / n)
    assert abs(float(x.var() - C[0, 0])) < Z * se_v
    # the recorded transition std is g^2 dt * policy std = g sqrt(dt)
    coef = gaussian_step(SDE, grid.s[:-1], grid.s[1:], "em", 1.0)
    torch.testing.assert_close(tr.stds[:, 0], coef.std, rtol=1e-12, atol=0)


def test_rollout_records_consistent_densities():
    """The policy-Euler rollout records the Gaussian transition x + b(t, x, mu) dt with variance
    g^2 dt + g^4 dt^2 std^2 (Brownian noise plus the sampled action's noise), and the pretrained step at x_k."""
    grid = TimeGrid.uniform(SDE.T, 5)
    pb = _problem()
    pol = ScoreActionPolicy(TOY.s_opt, 0.3, SDE.T)
    tr = rollout(pb, pol, grid, pol.transition(SDE), 7, make_gen(9), x_init=SDE.prior_sample((7,), make_gen(8)))
    for k in range(grid.K):
        g2dt = SDE.g2(grid.s[k]) * grid.dt[k]
        torch.testing.assert_close(tr.stds[k], torch.sqrt(g2dt + g2dt**2 * 0.09).expand(7), rtol=1e-13, atol=0)
        mean = tr.xs[k] + grid.dt[k] * pb.b(grid.t[k], tr.xs[k], pol.mean(grid.t[k], tr.xs[k]))
        torch.testing.assert_close(tr.log_probs[k], gaussian_log_prob(tr.xs[k + 1], mean, tr.stds[k]), rtol=1e-12,
                                   atol=1e-12)
        pre = tr.xs[k] + grid.dt[k] * pb.b(grid.t[k], tr.xs[k], pb.pretrained_action(grid.t[k], tr.xs[k]))
        torch.testing.assert_close(tr.pre_means[k], pre, rtol=1e-12, atol=1e-12)


def test_exploratory_sde_drift_is_the_sampler_drift():
    pb = _problem()
    pol = ScoreActionPolicy(TOY.s_opt, 0.5, SDE.T)
    esde = pb.exploratory_sde(pol, event_shape=())
    y = f64([[0.3], [-1.0]])
    t = f64(0.25)
    rev = SDE.reverse(TOY.s_opt, 1.0)
    torch.testing.assert_close(esde.f(t, y), rev.f(t, y[:, 0])[:, None], rtol=1e-14, atol=0)
    torch.testing.assert_close(esde.g(t, y), rev.g(t, y[:, 0])[:, None], rtol=1e-14, atol=0)
    torch.testing.assert_close(esde.h(t, y), SDE.reverse(TOY.s_pre, 1.0).f(t, y[:, 0])[:, None], rtol=1e-14, atol=0)
