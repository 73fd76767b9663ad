"""Denoising score matching (sacode.theory.dsm): the closed-form minimum, its Monte-Carlo twin, Fisher divergence, training.

Closed form (Vincent 2011): with X_s = alpha X_0 + sigma Z the sigma^2-weighted loss of a score s_theta is
L_s(theta) = L_s* + sigma^2 E||s_theta - grad log p_s||^2, and for Gaussian data N(m, C)
L_s* = d - sigma^2 tr Sigma_s^{-1}, Sigma_s = alpha^2 C + sigma^2 I. Monte-Carlo comparisons allow Z standard errors.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import Z, f64, make_gen
from sacode.theory.data import Gaussian, GaussianMixture, ring_mixture
from sacode.theory.dsm import dsm_loss_per_sample, dsm_minimum_gaussian, dsm_minimum_mc, fisher_divergence, train_dsm
from sacode.dynamics.sde import OUSDE, VESDE, VPSDE

SDES = {"vp": VPSDE(0.1, 20.0), "ve": VESDE(0.01, 10.0), "ou": OUSDE(0.7, 0.5, 2.0)}


def _gauss4d_img() -> Gaussian:
    a = torch.randn(4, 4, generator=make_gen(1), dtype=torch.float64)
    return Gaussian([0.3, -0.2, 0.1, 0.5], 0.3 * (a @ a.T / 4 + 0.3 * torch.eye(4, dtype=torch.float64)),
                    event_shape=(1, 2, 2))


LAWS = {"gauss1d": lambda: Gaussian.scalar(0.5, 0.8), "gauss4d-img": _gauss4d_img}


def _mc_loss(score_fn, data, sde, s, n, seed):
    x0 = data.sample(n, make_gen(seed))
    z = torch.randn(x0.shape, generator=make_gen(seed + 1), dtype=torch.float64)
    return dsm_loss_per_sample(score_fn, sde, x0, f64(s), z)


def test_dsm_minimum_gaussian_golden():
    # 1-D N(0.5, 0.8^2), VPSDE(0.1, 20) at s = 0.5: alpha^2 = exp(-2.5375), sigma^2 = 1 - exp(-2.5375);
    # L* = 1 - sigma^2 / (0.64 alpha^2 + sigma^2).
    ab = math.exp(-2.5375)
    expected = 1 - (1 - ab) / (0.64 * ab + 1 - ab)
    got = float(dsm_minimum_gaussian(Gaussian.scalar(0.5, 0.8), VPSDE(0.1, 20.0), f64(0.5)))
    assert got == pytest.approx(expected, rel=1e-13)
    # limits: sigma -> 0 gives L* -> d (nothing to learn about Z from X_s = X_0); for C = I under VP the noised law
    # is N(alpha m, I) at every s, so L* = d - sigma^2 d = d alpha^2.
    data = _gauss4d_img()
    assert float(dsm_minimum_gaussian(data, VPSDE(0.1, 20.0), f64(1e-9))) == pytest.approx(4.0, abs=1e-7)
    unit = Gaussian(torch.zeros(3), torch.eye(3))
    s = f64([0.1, 0.5, 1.0])
    torch.testing.assert_close(dsm_minimum_gaussian(unit, VPSDE(0.1, 20.0), s), 3 * VPSDE(0.1, 20.0).alpha_bar(s),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_dsm_loss_of_exact_score_equals_closed_form_minimum(law, sde_name):
    data, sde = LAWS[law](), SDES[sde_name]
    n = 20_000
    for frac in [0.05, 0.4, 1.0]:
        s = frac * sde.T
        losses = _mc_loss(data.score_fn(sde), data, sde, s, n, seed=10)
        assert losses.shape == (n,)
        cf = float(dsm_minimum_gaussian(data, sde, f64(s)))
        assert abs(float(losses.mean()) - cf) <= Z * float(losses.std()) / math.sqrt(n), (s, cf)


@pytest.mark.parametrize("law", list(LAWS))
def test_dsm_minimum_mc_agrees_with_closed_form_for_one_component(law):
    data, sde = LAWS[law](), VPSDE(0.1, 20.0)
    for s in [0.02, 0.3, 0.9]:
        est, se = dsm_minimum_mc(data, sde, s, 20_000, make_gen(3))
        cf = float(dsm_minimum_gaussian(data, sde, f64(s)))
        assert se > 0 and abs(est - cf) <= Z * se, (s, est, cf, se)


def test_dsm_minimum_mc_agrees_with_dsm_loss_for_a_mixture():
    """For a mixture there is no closed form: two independent Monte-Carlo estimates of L* must agree."""
    data, sde = ring_mixture(), VPSDE(0.1, 20.0)
    n = 20_000
    for s in [0.05, 0.3]:
        est, se = dsm_minimum_mc(data, sde, s, n, make_gen(4))
        losses = _mc_loss(data.score_fn(sde), data, sde, s, n, seed=20)
        se2 = float(losses.std()) / math.sqrt(n)
        assert abs(est - float(losses.mean())) <= Z * math.hypot(se, se2)
    with pytest.raises(ValueError, match="single-Gaussian data; use dsm_minimum_mc"):
        dsm_minimum_gaussian(data, sde, f64(0.3))


def test_dsm_loss_decomposition_for_a_shifted_score():
    """L(s* + c) = L* + sigma^2 d c^2: the cross term 2 sigma c . E[sigma s* + Z] vanishes in expectation."""
    data, sde = _gauss4d_img(), VPSDE(0.1, 20.0)
    n, c, s = 20_000, 0.3, 0.2
    exact = data.score_fn(sde)
    shifted = lambda u, x: exact(u, x) + c
    diff = _mc_loss(shifted, data, sde, s, n, 30) - _mc_loss(exact, data, sde, s, n, 30)   # common random numbers
    sig2 = float(sde.sigma(f64(s))) ** 2
    assert abs(float(diff.mean()) - sig2 * 4 * c**2) <= Z * float(diff.std()) / math.sqrt(n)


def test_fisher_divergence_identical_and_shifted_scores():
    data, sde = Gaussian.scalar(0.5, 0.8), VPSDE(0.1, 20.0)
    x = data.noised(sde, 0.3).sample(1000, make_gen(5))
    assert fisher_divergence(data.score_fn(sde), data.score_fn(sde), x, 0.3) == (0.0, 0.0)
    # a constant offset c gives exactly d c^2 with zero spread
    est, se = fisher_divergence(data.score_fn(sde), lambda s, y: data.score(sde, s, y) + 0.5, x, 0.3)
    assert est == pytest.approx(0.25, rel=1e-12) and se == pytest.approx(0.0, abs=1e-12)
    x4 = _gauss4d_img().sample(100, make_gen(6))
    est4, _ = fisher_divergence(lambda s, y: torch.zeros_like(y), lambda s, y: torch.ones_like(y), x4, 0.1)
    assert est4 == pytest.approx(4.0, rel=1e-15)


def test_train_dsm_reduces_fisher_divergence():
    """A few hundred seeded Adam steps on 1-D N(0.5, 0.8^2) under VP(0.1, 2) bring the sigma^2-weighted Fisher
    divergence to the exact score well below its value at initialisation (beyond the Monte-Carlo error of both)."""
    from sacode.engine.nets import ScoreMLP
    sde, data = VPSDE(0.1, 2.0), Gaussian.scalar(0.5, 0.8)
    torch.manual_seed(0)
    model = ScoreMLP(sde, 1, hidden=32, depth=2, n_freq=4)
    exact = data.score_fn(sde)

    def weighted_fd(s):
        x = data.noised(sde, s).sample(4000, make_gen(7), dtype=torch.float32)
        est, se = fisher_divergence(model, exact, x, s)
        sig2 = float(sde.sigma(f64(s))) ** 2
        return sig2 * est, sig2 * se

    levels = [0.1, 0.4, 0.9]
    before = [weighted_fd(s) for s in levels]
    log = train_dsm(model, sde, lambda n, g: data.sample(n, g, dtype=torch.float32), steps=300, batch=256,
                    lr=5e-3, seed=0, progress=False, log_every=100)
    after = [weighted_fd(s) for s in levels]
    assert [r["step"] for r in log] == [1, 100, 200, 300]
    assert all(math.isfinite(r["loss"]) and r["wall_s"] >= 0 for r in log)
    for s, (fb, seb), (fa, sea) in zip(levels, before, after):
        assert fa + Z * sea < fb - Z * seb, (s, fb, fa)
