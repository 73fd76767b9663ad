"""The exact K-step optimum (sacode.theory.discrete_optimum): dynamic programming against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sacode.theory import optimal as opt
from sacode.theory import policy_eval as pe
from sacode.theory.affine_policy import AffineScoreFamily, HatBasis
from sacode.theory.exploratory_optimum import exploratory_optimum
from sacode.theory.discrete_optimum import discrete_optimum, dpok_fixed_point
from sacode.theory.presets import toy_preset
from sacode.dynamics.grid import TimeGrid
from sacode.verify import Z

GAUSS = ["gauss1d-linear", "gauss1d-linear-short", "gauss1d-quadratic", "gauss1d-quadratic-short"]
EPS = 2**12 * torch.finfo(torch.float64).eps          # float64 rounding budget of a K-step recursion


@pytest.mark.parametrize("name", GAUSS)
@pytest.mark.parametrize("method,eta,s_end", [("em", 1.0, 0.0), ("ddim", 1.0, 1e-3), ("ddim", 0.5, 1e-3)])
def test_backward_value_equals_forward_objective_and_policy_eval(name, method, eta, s_end):
    p = toy_preset(name)
    grid = TimeGrid.uniform(1.0, 12, s_end)
    d = discrete_optimum(p, grid, method, eta)
    # J from the backward recursion, E V_0(X_0), equals E r - beta KL from the forward moments
    assert abs(d.value[0, 0] * p.sde.prior_std() ** 2 + d.value[0, 2] - d.J) <= EPS * (1 + abs(d.J))
    # the per-step optimum as score corrections, evaluated by the independent exact recursion of chapter 6
    fam = AffineScoreFamily.from_preset(p)
    for interp in ("previous", "linear"):
        f = fam.with_offsets(*d.offsets(interp))
        r = pe.discrete_objective(f, f.zeros(), p.reward, p.beta, grid, method, eta)
        assert abs(r.objective - d.J) <= EPS * (1 + abs(d.J))
        assert abs(r.mean_T - d.mean) <= EPS * (1 + abs(d.mean)) and abs(r.var_T - d.var) <= EPS


@pytest.mark.parametrize("name", ["gauss1d-linear", "gauss1d-quadratic"])
def test_optimum_dominates_other_policies(name):
    p = toy_preset(name)
    grid = TimeGrid.uniform(1.0, 10)
    d = discrete_optimum(p, grid)
    fam = AffineScoreFamily.from_preset(p, basis=HatBasis.uniform(1.0, 4))
    f = fam.with_offsets(*d.offsets("previous"))
    gen = np.random.default_rng(0)
    for _ in range(5):                                  # random perturbations of theta0 and theta1 lower J_K
        theta = 0.2 * gen.standard_normal(f.n_params)
        assert pe.discrete_objective(f, theta, p.reward, p.beta, grid).objective < d.J
    star = pe.optimal_family(fam, p.reward, p.beta)     # the continuous optimal control on this grid
    assert pe.discrete_objective(star, star.zeros(), p.reward, p.beta, grid).objective <= d.J + EPS


@pytest.mark.parametrize("name", GAUSS)
def test_converges_to_the_continuous_optimum_at_first_order(name):
    p = toy_preset(name)
    J_star = opt.optimal_objective(p).J
    e1, e2 = (abs(discrete_optimum(p, TimeGrid.uniform(1.0, K)).J - J_star) for K in (200, 400))
    assert 1.7 < e1 / e2 < 2.3                           # weak order 1: halving the step halves the gap
    law = opt.optimal_terminal_law(p)
    fine, finer = (discrete_optimum(p, TimeGrid.uniform(1.0, K)) for K in (200, 400))
    assert 1.7 < abs(fine.mean - float(law.mean[0])) / abs(finer.mean - float(law.mean[0])) < 2.3
    assert 1.7 < abs(fine.var - float(law.var[0])) / abs(finer.var - float(law.var[0])) < 2.3


@pytest.mark.parametrize("method", ["pf-euler", "pf-heun"])
def test_exploratory_pf_ode_optimum_matches_the_closed_form(method):
    p = toy_preset("gauss1d-linear-short")
    target = exploratory_optimum(p, 0.5)
    coarse, fine = (discrete_optimum(p, TimeGrid.uniform(1.0, K), method, 0.0, explore=0.5) for K in (400, 800))
    # weak order >= 1: the error at K = 800 is at most about the change from K = 400 (Richardson), so 2x that bounds it
    for key, a, b, want in [("J", coarse.J, fine.J, target["J"]), ("mean", coarse.mean, fine.mean, target["mean"][0]),
                            ("var", coarse.var, fine.var, target["var"][0]), ("kl", coarse.kl, fine.kl, target["kl"])]:
        assert abs(b - want) <= 2 * abs(a - b) + 1e-9, key


def test_engine_rollout_of_the_optimum_matches_the_exact_law():
    from sacode.engine.policy import FixedScorePolicy
    from sacode.envs.toys import ToyEnv
    from sacode.dynamics.transition import Transition
    from sacode.theory.control import rollout

    p = toy_preset("gauss1d-quadratic-short")
    grid = TimeGrid.uniform(1.0, 10)
    d = discrete_optimum(p, grid)
    n = 20_000
    b = rollout(ToyEnv(p), FixedScorePolicy(d.score_fn(p)), grid, Transition(p.sde, "em", 1.0), n,
                torch.Generator().manual_seed(3))
    x, J = b.xs[-1], b.rewards - p.beta * b.kl_path
    assert abs(float(x.mean()) - d.mean) <= Z * float(x.std()) / math.sqrt(n)
    assert abs(float(J.mean()) - d.J) <= Z * float(J.std()) / math.sqrt(n)
    # the recorded per-step KL is a function of x_k: its exact mean is d.kl_steps
    kl = b.kl_steps
    assert torch.all((kl.mean(1) - torch.as_tensor(d.kl_steps)).abs() <= Z * kl.std(1) / math.sqrt(n) + 1e-12)


def test_dpok_fixed_point_equals_the_optimum_only_for_a_linear_reward():
    grid = TimeGrid.uniform(1.0, 20)
    lin = toy_preset("gauss1d-linear")
    a, b = discrete_optimum(lin, grid), dpok_fixed_point(lin, grid)
    assert np.allclose(a.gain, b.gain, atol=1e-12) and np.allclose(a.offset, b.offset, atol=1e-12)
    quad = toy_preset("gauss1d-quadratic")
    a, b = discrete_optimum(quad, grid), dpok_fixed_point(quad, grid)
    assert a.J - b.J > 0.01 and abs(a.mean - b.mean) > 0.05


def test_errors_name_the_problem():
    grid = TimeGrid.uniform(1.0, 5)
    with pytest.raises(ValueError, match="1-D Gaussian"):
        discrete_optimum(toy_preset("mixture2d-linear"), grid)
    with pytest.raises(ValueError, match="explore"):
        discrete_optimum(toy_preset("gauss1d-linear"), grid, "pf-euler", 0.0)
    with pytest.raises(ValueError, match="zero variance"):
        discrete_optimum(toy_preset("gauss1d-linear"), grid, "ddim", 1.0)          # DDIM's last step to s = 0
    with pytest.raises(ValueError, match="unbounded"):                                 # a strong convex reward
        from sacode.theory.rewards import QuadraticReward
        import dataclasses
        p = dataclasses.replace(toy_preset("gauss1d-quadratic"), reward=QuadraticReward(-50.0, [2.0]), beta=0.01)
        discrete_optimum(p, grid)
    with pytest.raises(ValueError, match="pf-heun"):
        discrete_optimum(toy_preset("gauss1d-linear"), grid, "pf-heun", 0.0, explore=0.5).control()
