"""The Girsanov path KL (sacode.theory.kl): the eta factor, trajectory estimators, per-step transition KLs, their limits,
the Gaussian KL, torchsde's logqp, and the closed forms of the gauss1d-linear optimal control.

Oracles: the analytic path KL w^2 s0^4 (a_e^2 - a_T^2)/(2 beta^2 D_e D_T), torch.distributions.kl_divergence,
the per-step identity KL_k = (B_k/std_k)^2 ||shift||^2/2, and Richardson error estimates for O(1/K) limits.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import f64, make_gen
from sacode.theory.control import ScoreActionPolicy, ScoreControlProblem
from sacode.theory.kl import (discrete_path_kl, eta_factor, gaussian_kl, path_kl_from_trajectory, path_kl_rate,
                       per_step_kl, shift_path_kl, shift_per_step_kl, torchsde_path_kl)
from sacode.dynamics.grid import TimeGrid
from sacode.dynamics.samplers import reverse_sde_sample
from sacode.theory.kl import GaussianLinearExample

TOY = GaussianLinearExample.from_preset("gauss1d-linear")
SDE = TOY.sde


def test_eta_factor():
    assert eta_factor(1.0) == 1.0
    assert math.isclose(eta_factor(0.5), (1.25 / 1.0) ** 2)
    assert eta_factor(0.0) == math.inf
    assert math.isclose(eta_factor(1e-3) * 4e-6, 1.0, rel_tol=1e-5)      # ~ 1/(4 eta^2)
    with pytest.raises(ValueError, match="eta"):
        eta_factor(-0.1)


def test_path_kl_rate_formula():
    x = f64([[0.1, 0.2], [0.3, -0.4]])
    st, sp = f64([[1.0, 0.0], [0.5, 0.5]]), f64([[0.0, 0.0], [0.0, 1.0]])
    r = path_kl_rate(SDE, 0.3, x, st, sp, eta=0.5)
    g2 = float(SDE.g2(f64(0.3)))
    torch.testing.assert_close(r, 0.5 * eta_factor(0.5) * g2 * f64([1.0, 0.5]))


@pytest.mark.parametrize("name", ["gauss1d-linear", "gauss1d-linear-short"])
@pytest.mark.parametrize("s_end", [0.0, 1e-3])
def test_shift_path_kl_closed_form(name, s_end):
    toy = GaussianLinearExample.from_preset(name)
    val, err = shift_path_kl(toy.sde, toy.shift, s_end)
    assert abs(val - toy.path_kl_closed(s_end)) < err + 1e-13
    if s_end == 0.0:
        assert math.isclose(val, toy.w**2 * toy.v_T() / (2 * toy.beta**2), rel_tol=1e-12)


@pytest.mark.parametrize("method,eta", [("em", 1.0), ("em", 0.5), ("ddim", 1.0), ("ddim", 0.5)])
def test_per_step_kl_of_trajectory_equals_shift_formula(method, eta):
    grid = TimeGrid.uniform(SDE.T, 30, s_end=1e-3)
    gen = make_gen(1)
    tr = reverse_sde_sample(SDE, TOY.s_opt, SDE.prior_sample((3,), gen), grid, method, eta, gen, record=True)
    kl = per_step_kl(tr, SDE, TOY.s_pre)
    ref = shift_per_step_kl(SDE, TOY.shift, grid, method, eta)
    torch.testing.assert_close(kl, ref[:, None].expand(-1, 3), rtol=1e-10, atol=1e-14)
    if method == "em":
        # Euler-Maruyama: per-step KL = factor * 1/2 g^2 dt ||shift||^2, the Riemann-weighted estimator
        riem = path_kl_from_trajectory(tr, SDE, TOY.s_pre, "riemann")
        torch.testing.assert_close(discrete_path_kl(tr, SDE, TOY.s_pre), riem, rtol=1e-12, atol=0)


def test_exact_weight_uses_int_g2():
    grid = TimeGrid.uniform(SDE.T, 7)
    gen = make_gen(2)
    tr = reverse_sde_sample(SDE, TOY.s_opt, SDE.prior_sample((2,), gen), grid, "em", 1.0, gen, record=True)
    est = path_kl_from_trajectory(tr, SDE, TOY.s_pre, "exact")
    ref = sum(0.5 * float(SDE.int_g2(grid.s[k + 1], grid.s[k])) * float(TOY.shift(grid.s[k])) ** 2
              for k in range(grid.K))
    torch.testing.assert_close(est, f64([ref, ref]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="weight"):
        path_kl_from_trajectory(tr, SDE, TOY.s_pre, "midpoint")
    bare = reverse_sde_sample(SDE, TOY.s_opt, SDE.prior_sample((2,), gen), grid, "em", 1.0, gen)
    with pytest.raises(ValueError, match="record=True"):
        path_kl_from_trajectory(bare, SDE, TOY.s_pre)


def test_ddim_step_into_data_is_deterministic_and_has_infinite_kl():
    grid = TimeGrid.uniform(SDE.T, 5)                   # ends at s = 0: the last DDIM step has c = 0
    gen = make_gen(3)
    tr = reverse_sde_sample(SDE, TOY.s_opt, SDE.prior_sample((2,), gen), grid, "ddim", 1.0, gen, record=True)
    kl = per_step_kl(tr, SDE, TOY.s_pre)
    assert torch.isinf(kl[-1]).all() and torch.isfinite(kl[:-1]).all()
    tr_same = reverse_sde_sample(SDE, TOY.s_pre, SDE.prior_sample((2,), gen), grid, "ddim", 1.0, gen, record=True)
    assert (per_step_kl(tr_same, SDE, TOY.s_pre)[-1] == 0).all()
    with pytest.raises(ValueError, match="deterministic"):
        shift_per_step_kl(SDE, TOY.shift, grid, "ddim", 1.0)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_per_step_sum_converges_to_eta_factor_times_integral(eta):
    I = eta_factor(eta) * shift_path_kl(SDE, TOY.shift, 1e-3)[0]
    S = [float(shift_per_step_kl(SDE, TOY.shift, TimeGrid.uniform(SDE.T, K, s_end=1e-3), "ddim", eta).sum())
         for K in (1000, 2000, 4000)]
    e = [abs(v - I) for v in S]
    assert 1.8 < e[0] / e[1] < 2.2 and 1.8 < e[1] / e[2] < 2.2          # O(1/K)
    assert abs(S[2] - I) < 2 * abs(S[2] - S[1])


def test_gaussian_kl_matches_torch():
    m1, m2 = f64([0.1, -0.3]), f64([0.5, 0.2])
    C1, C2 = f64([[1.0, 0.3], [0.3, 0.5]]), f64([[0.7, -0.1], [-0.1, 1.2]])
    ref = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(m1, C1),
                                            torch.distributions.MultivariateNormal(m2, C2))
    assert math.isclose(gaussian_kl(m1, C1, m2, C2), float(ref), rel_tol=1e-12)
    assert math.isclose(gaussian_kl(f64([0.0]), f64([[1.0]]), f64([0.5]), f64([[2.0]])),
                        0.5 * (0.5 + 0.25 / 2 - 1 + math.log(2.0)), rel_tol=1e-13)


def test_torchsde_logqp_equals_em_riemann_sum():
    K = 100
    grid = TimeGrid.uniform(SDE.T, K, s_end=1e-3)
    pb = ScoreControlProblem(SDE, TOY.s_pre, None, TOY.beta)
    esde = pb.exploratory_sde(ScoreActionPolicy(TOY.s_opt, 0.0, SDE.T), event_shape=())
    torch.manual_seed(0)
    lr = torchsde_path_kl(esde, SDE.prior_sample((4, 1), make_gen(4)), 0.0, SDE.T - 1e-3, (SDE.T - 1e-3) / K)
    ref = float(shift_per_step_kl(SDE, TOY.shift, grid, "em", 1.0).sum())
    torch.testing.assert_close(lr, f64([ref] * 4), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        torchsde_path_kl(esde, SDE.prior_sample((4,), make_gen(4)), 0.0, 1.0, 0.1)


def test_shift_matches_the_optimal_control():
    from sacode.theory import optimal
    from sacode.theory.presets import toy_preset

    preset = toy_preset("gauss1d-linear")
    x = f64([-1.0, 0.0, 2.0])
    for t in [0.1, 0.5, 0.95]:
        got = optimal.optimal_control(preset, t, x)
        torch.testing.assert_close(got, TOY.shift(SDE.T - t).expand(3), rtol=1e-10, atol=1e-12)
