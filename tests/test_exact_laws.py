"""Exact terminal laws of the continuous-time reverse dynamics (sacode.theory.exact_laws).

Three independent oracles:
1. the moment ODEs of the linear reverse dynamics, integrated by scipy (no sacode code involved): with
   Sigma_s = alpha^2 C + sigma^2 I and the exact score -Sigma_s^{-1}(x - alpha m), in diffusion time s from T to 0,
       mean: d mu/ds = f mu + k g^2 Sigma_s^{-1} (mu - alpha m),
       cov:  dP/ds  = A P + P A^T - (2 k - 1) g^2 I,   A = f I + k g^2 Sigma_s^{-1},
   with k = 1 for the reverse SDE (eta = 1) and k = 1/2 for the PF-ODE (eta = 0; no noise term);
2. the posterior X_0 | X_T = y averaged over the prior y ~ N(0, p^2 I) (law of total variance) for the SDE;
3. the discrete sampler's own exact law (propagate_gaussian) on finer and finer grids: the error must shrink at
   the method's order (1 for Euler-Maruyama / PF-Euler, 2 for Heun), which fails if the closed form is wrong.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from conftest import f64
from sacode.theory.data import Gaussian
from sacode.theory.exact_laws import pf_ode_terminal_law, reverse_sde_terminal_law
from sacode.dynamics.grid import TimeGrid
from sacode.dynamics.samplers import propagate_gaussian
from sacode.dynamics.sde import OUSDE, VESDE, VPSDE

SDES = {"vp-short": VPSDE(0.1, 2.0), "vp": VPSDE(0.1, 20.0), "ve": VESDE(0.05, 3.0), "ou": OUSDE(0.7, 0.5, 2.0)}
DATA = Gaussian([0.5, -1.0], [[0.64, 0.3], [0.3, 0.5]])
LAWS = {"sde": (reverse_sde_terminal_law, 1.0), "pf": (pf_ode_terminal_law, 0.5)}


def _moment_ode(sde, data: Gaussian, k: float, mu_T: np.ndarray, P_T: np.ndarray):
    """Integrate the mean/covariance ODEs of the exact-score reverse dynamics from s = T down to s = 0."""
    m, C = data.means[0].numpy(), data.covs[0].numpy()
    d = m.size
    eye = np.eye(d)

    def coef(s):
        st = f64(s)
        return float(sde.f_coef(st)), float(sde.g2(st)), float(sde.alpha(st)), float(sde.sigma(st))

    def rhs(s, y):
        mu, P = y[:d], y[d:].reshape(d, d)
        f, g2, a, sg = coef(s)
        Sinv = np.linalg.inv(a * a * C + sg * sg * eye)
        A = f * eye + k * g2 * Sinv
        dmu = f * mu + k * g2 * Sinv @ (mu - a * m)
        dP = A @ P + P @ A.T - (2 * k - 1) * g2 * eye
        return np.concatenate([dmu, dP.ravel()])

    y0 = np.concatenate([mu_T, P_T.ravel()])
    sol = solve_ivp(rhs, (sde.T, 0.0), y0, method="DOP853", rtol=1e-11, atol=1e-13)
    assert sol.success
    return sol.y[:d, -1], sol.y[d:, -1].reshape(d, d)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("law", list(LAWS))
def test_terminal_law_matches_moment_ode(law, sde_name):
    sde, (fn, k) = SDES[sde_name], LAWS[law]
    p2 = sde.prior_std() ** 2
    mean, cov = fn(DATA, sde)
    mu, P = _moment_ode(sde, DATA, k, np.zeros(2), p2 * np.eye(2))
    np.testing.assert_allclose(mean.numpy(), mu, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(cov.numpy(), P, rtol=1e-8, atol=1e-9)
    assert mean.shape == (2,) and cov.shape == (2, 2)
    torch.testing.assert_close(cov, cov.T, rtol=0, atol=1e-15)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_reverse_sde_law_is_the_posterior_averaged_over_the_prior(sde_name):
    """X^rev_T | X^rev_0 = y is X_0 | X_T = y; its mean is affine in y, so with y ~ N(0, p^2 I)
    mean = E[X_0 | X_T = 0] and cov = Cov[X_0 | X_T] + p^2 J J^T, J the Jacobian of the posterior mean."""
    sde = SDES[sde_name]
    y = torch.cat([torch.zeros(1, 2), torch.eye(2)]).double()
    post = DATA.posterior(sde, sde.T, y)
    pm = post.mean()
    J = (pm[1:] - pm[0]).T
    p2 = sde.prior_std() ** 2
    mean, cov = reverse_sde_terminal_law(DATA, sde)
    torch.testing.assert_close(mean, pm[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, post.cov()[0] + p2 * J @ J.T, rtol=1e-11, atol=1e-12)


ORDERS = [("sde", "em", 1.0, [200, 400, 800], 1.0), ("sde", "ddim", 1.0, [200, 400, 800], 1.0),
          ("pf", "pf-euler", 0.0, [200, 400, 800], 1.0), ("pf", "pf-heun", 0.0, [50, 100, 200], 2.0)]


@pytest.mark.parametrize("law, method, eta, Ks, order", ORDERS, ids=[o[1] for o in ORDERS])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_discrete_sampler_converges_to_the_terminal_law_at_its_order(sde_name, law, method, eta, Ks, order):
    """|law of the K-step sampler - closed form| ~ C K^{-order}: the slope between successive doublings is within
    0.1 of the order (as in the verify check weak-order). A wrong closed form makes the error plateau (slope -> 0).

    The grid is TimeGrid.power(rho=2). On a uniform grid to s = 0, DDIM(eta=1) converges like h log(1/h): each step
    drops the posterior variance of X_0 (it plugs in x0_hat), ~ g^4 h^2 / sigma_s^2 per step, and sigma_s^2 ~ s near
    s = 0 sums to h log K; the quadratic grid removes the log (its steps near 0 are ~ sqrt(s)/K).
    """
    sde, (fn, _) = SDES[sde_name], LAWS[law]
    mean_cf, cov_cf = fn(DATA, sde)
    p2 = sde.prior_std() ** 2
    errs = []
    for K in Ks:
        m, C = propagate_gaussian(sde, DATA.score_fn(sde), TimeGrid.power(sde.T, K, rho=2.0),
                                  torch.zeros(2, dtype=torch.float64), p2 * torch.eye(2, dtype=torch.float64),
                                  method, eta)
        errs.append(max(float((m - mean_cf).abs().max()), float((C - cov_cf).abs().max())))
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(Ks) - 1)]
    assert all(abs(sl - order) < 0.1 for sl in slopes), (errs, slopes)


def test_prior_mismatch_makes_sde_and_pf_laws_differ():
    """With b_max = 2, alpha_T^2 = e^{-1.05}: N(0, I) is far from p_T, the two laws differ from each other and from
    the data law (the fixed-initial-law effect); PF cov = p^2 C Sigma_T^{-1} exactly."""
    sde = SDES["vp-short"]
    ms, cs = reverse_sde_terminal_law(DATA, sde)
    mp, cp = pf_ode_terminal_law(DATA, sde)
    assert float((cs - cp).abs().max()) > 0.01 and float((ms - DATA.means[0]).abs().max()) > 0.1
    T = f64(sde.T)
    a2, sg2 = float(sde.alpha(T)) ** 2, float(sde.sigma(T)) ** 2
    C = DATA.covs[0]
    Sigma_T = a2 * C + sg2 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(cp, C @ torch.linalg.inv(Sigma_T), rtol=1e-12, atol=1e-12)


# --- limits: the prior equals p_T -----------------------------------------------------------------

@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_moment_ode_from_p_T_returns_the_data_law(law, sde_name):
    """Started from p_T = N(alpha_T m, Sigma_T) instead of N(0, p^2 I), both dynamics end exactly at N(m, C)."""
    sde, (_, k) = SDES[sde_name], LAWS[law]
    T = f64(sde.T)
    a, sg = float(sde.alpha(T)), float(sde.sigma(T))
    m, C = DATA.means[0].numpy(), DATA.covs[0].numpy()
    mu, P = _moment_ode(sde, DATA, k, a * m, a * a * C + sg * sg * np.eye(2))
    np.testing.assert_allclose(mu, m, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(P, C, rtol=1e-8, atol=1e-9)


class _PriorIsPT(OUSDE):
    """OU whose sampler prior N(0, p^2 I) is exactly p_T for the data N(0, c I): p^2 = alpha_T^2 c + sigma_T^2."""

    def __init__(self, c: float):
        super().__init__(0.7, 0.5, 2.0)
        self.c = c

    def prior_std(self) -> float:
        T = f64(self.T)
        return math.sqrt(float(self.alpha(T)) ** 2 * self.c + float(self.sigma(T)) ** 2)


@pytest.mark.parametrize("law", list(LAWS))
def test_terminal_laws_equal_data_law_when_prior_is_p_T(law):
    fn, _ = LAWS[law]
    # (a) VP with data N(0, I): p_T = N(0, alpha^2 + sigma^2 = 1) is the N(0, I) prior exactly
    unit = Gaussian(torch.zeros(3), torch.eye(3))
    for sde in [VPSDE(0.1, 2.0), VPSDE(0.1, 20.0)]:
        mean, cov = fn(unit, sde)
        torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-14)
        torch.testing.assert_close(cov, torch.eye(3, dtype=torch.float64), rtol=1e-13, atol=1e-14)
    # (b) isotropic data N(0, c I) and an SDE whose prior is made equal to p_T
    c = 2.3
    data = Gaussian(torch.zeros(2, dtype=torch.float64), c * torch.eye(2, dtype=torch.float64))
    mean, cov = fn(data, _PriorIsPT(c))
    torch.testing.assert_close(mean, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(cov, c * torch.eye(2, dtype=torch.float64), rtol=1e-13, atol=1e-14)
    # (c) alpha_T -> 0 (VP with b_max = 200, alpha_T^2 = e^{-100.05}): N(0, I) = p_T to float64, so any data law
    mean, cov = fn(DATA, VPSDE(0.1, 200.0))
    torch.testing.assert_close(mean, DATA.means[0], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(cov, DATA.covs[0], rtol=1e-13, atol=1e-14)
