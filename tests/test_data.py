"""Closed-form data laws (sacode.theory.data): scores, posteriors, noised marginals, sampling and validation.

Oracles: torch.autograd of log_prob for the score; the Gaussian conditioning formula on the joint covariance of
(X_0, X_s) computed directly with torch.linalg for the posterior; Tweedie's formula for the posterior mean;
1-D quadrature for the normalisation; Monte-Carlo moments within Z standard errors for sampling.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from conftest import Z, f64, make_gen, mean_se
from sacode.theory.data import Gaussian, GaussianMixture, ring_mixture
from sacode.dynamics.sde import OUSDE, VESDE, VPSDE

SDES = {"vp": VPSDE(0.1, 20.0), "ve": VESDE(0.01, 10.0), "ou": OUSDE(0.7, 0.5, 2.0)}


def _spd(d: int, seed: int, scale: float = 0.5) -> torch.Tensor:
    """A random symmetric positive definite d x d matrix (full covariance, not diagonal)."""
    a = torch.randn(d, d, generator=make_gen(seed), dtype=torch.float64)
    return scale * (a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64))


def _mixture_1d() -> GaussianMixture:
    return GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [[[0.25]], [[0.64]]], event_shape=())


def _mixture_2d() -> GaussianMixture:
    covs = torch.stack([_spd(2, 1), _spd(2, 2), _spd(2, 3, 0.2)])
    return GaussianMixture([0.2, 0.5, 0.3], [[-1.0, 0.5], [1.0, 1.0], [0.0, -1.5]], covs)


def _mixture_4d_image() -> GaussianMixture:
    """Two 4-d components with full covariances, used with x of shape (n, 1, 2, 2)."""
    covs = torch.stack([_spd(4, 4), _spd(4, 5, 0.3)])
    means = torch.tensor([[0.5, -0.5, 1.0, 0.0], [-1.0, 0.2, 0.0, 0.8]], dtype=torch.float64)
    return GaussianMixture([0.4, 0.6], means, covs, event_shape=(1, 2, 2))


def _gaussian_4d_image() -> Gaussian:
    return Gaussian([0.3, -0.2, 0.1, 0.5], _spd(4, 6), event_shape=(1, 2, 2))


LAWS = {
    "gauss1d": lambda: Gaussian.scalar(0.5, 0.8),
    "mix1d": _mixture_1d,
    "mix2d": _mixture_2d,
    "gauss4d-img": _gaussian_4d_image,
    "mix4d-img": _mixture_4d_image,
    "ring": ring_mixture,
}


def _x(data: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    """Points spread over the support: data samples scaled up, shape (n, *event)."""
    return 1.5 * data.sample(n, make_gen(seed))


def _s(sde, n):
    return torch.linspace(0.02, 0.98, n, dtype=torch.float64) * sde.T


# --- score --------------------------------------------------------------------------------------

@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_score_equals_autograd_of_log_prob(law, sde_name):
    data, sde = LAWS[law](), SDES[sde_name]
    n = 12
    x = _x(data, n, 1).requires_grad_(True)
    for s in [0.01 * sde.T, 0.3 * sde.T, sde.T, _s(sde, n)]:
        lp = data.log_prob(sde, s, x)
        assert lp.shape == (n,)
        (grad,) = torch.autograd.grad(lp.sum(), x)
        sc = data.score(sde, s, x)
        assert sc.shape == x.shape
        torch.testing.assert_close(sc, grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("law", ["gauss1d", "mix2d", "mix4d-img"])
def test_log_prob_matches_torch_distributions(law):
    """log p_s = log sum_k w_k N(x; alpha m_k, alpha^2 C_k + sigma^2 I), written with MultivariateNormal."""
    data, sde = LAWS[law](), VPSDE(0.1, 20.0)
    x = _x(data, 9, 2)
    s = 0.4
    a, sg = float(sde.alpha(f64(s))), float(sde.sigma(f64(s)))
    eye = torch.eye(data.d, dtype=torch.float64)
    xf = x.reshape(9, data.d)
    comps = torch.stack([torch.distributions.MultivariateNormal(a * data.means[k], a**2 * data.covs[k] + sg**2 * eye)
                         .log_prob(xf) + math.log(data.weights[k]) for k in range(data.K)], 1)
    torch.testing.assert_close(data.log_prob(sde, s, x), torch.logsumexp(comps, 1), rtol=1e-12, atol=1e-12)
    # sde=None is the data density (s = 0)
    comps0 = torch.stack([torch.distributions.MultivariateNormal(data.means[k], data.covs[k]).log_prob(xf)
                          + math.log(data.weights[k]) for k in range(data.K)], 1)
    torch.testing.assert_close(data.log_prob(None, 0.0, x), torch.logsumexp(comps0, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("law", ["gauss1d", "mix1d"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_log_prob_integrates_to_one(law, sde_name):
    data, sde = LAWS[law](), SDES[sde_name]
    for s in [None, 0.1 * sde.T, sde.T]:
        dens = lambda u: math.exp(float(data.log_prob(sde if s is not None else None, s or 0.0, f64([u]))))
        val, err = quad(dens, -math.inf, math.inf, epsabs=1e-12, epsrel=1e-12, limit=200)
        assert val == pytest.approx(1.0, abs=1e-9 + 10 * err), (s, val)


# --- posterior ------------------------------------------------------------------------------------

def _posterior_direct(data: GaussianMixture, sde, s: float, x: torch.Tensor):
    """Posterior mean (n, d) and covariance (n, d, d) by Gaussian conditioning of the joint law of (X_0, X_s).

    For component k the joint covariance is [[C, a C], [a C, a^2 C + sigma^2 I]]; conditioning gives
    mean m + S_01 S_11^{-1} (x - a m), cov S_00 - S_01 S_11^{-1} S_10. The mixture posterior weights are
    w_k N(x; a m_k, S_11) normalised, and the mixture covariance follows the law of total covariance.
    """
    a, sg = float(sde.alpha(f64(s))), float(sde.sigma(f64(s)))
    d = data.d
    xf = x.reshape(x.shape[0], d)
    eye = torch.eye(d, dtype=torch.float64)
    means, covs, logw = [], [], []
    for k in range(data.K):
        C, m = data.covs[k], data.means[k]
        J = torch.zeros(2 * d, 2 * d, dtype=torch.float64)
        J[:d, :d], J[:d, d:], J[d:, :d], J[d:, d:] = C, a * C, a * C, a**2 * C + sg**2 * eye
        S00, S01, S11 = J[:d, :d], J[:d, d:], J[d:, d:]
        K_gain = torch.linalg.solve(S11, S01.T).T                   # S01 S11^{-1}
        means.append(m + (xf - a * m) @ K_gain.T)
        covs.append(S00 - K_gain @ S01.T)
        logw.append(math.log(data.weights[k]) + torch.distributions.MultivariateNormal(a * m, S11).log_prob(xf))
    r = torch.softmax(torch.stack(logw, 1), 1)                       # (n, K)
    M = torch.stack(means, 1)                                        # (n, K, d)
    mean = (r[..., None] * M).sum(1)
    dm = M - mean[:, None]
    cov = sum(r[:, k, None, None] * (covs[k] + dm[:, k, :, None] * dm[:, k, None, :]) for k in range(data.K))
    return mean, cov, r


@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_posterior_matches_gaussian_conditioning(law, sde_name):
    data, sde = LAWS[law](), SDES[sde_name]
    n = 7
    x = _x(data, n, 3)
    for s in [0.05 * sde.T, 0.5 * sde.T]:
        post = data.posterior(sde, s, x)
        mean, cov, r = _posterior_direct(data, sde, s, x)
        torch.testing.assert_close(post.weights, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(data.responsibilities(sde, s, x), r, rtol=1e-10, atol=1e-12)
        assert post.mean().shape == x.shape
        torch.testing.assert_close(post.mean().reshape(n, data.d), mean, rtol=1e-10, atol=1e-10)
        assert post.cov().shape == (n, data.d, data.d)
        torch.testing.assert_close(post.cov(), cov, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_posterior_mean_is_tweedie(law, sde_name):
    """E[X_0 | X_s = x] = (x + sigma^2 score) / alpha (Efron 2011); denoise() is the same thing."""
    data, sde = LAWS[law](), SDES[sde_name]
    n = 10
    x = _x(data, n, 4)
    s = _s(sde, n)
    bshape = (n,) + (1,) * (x.ndim - 1)
    a, sg = sde.alpha(s).reshape(bshape), sde.sigma(s).reshape(bshape)
    tweedie = (x + sg**2 * data.score(sde, s, x)) / a
    torch.testing.assert_close(data.posterior(sde, s, x).mean(), tweedie, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(data.denoise(sde, s, x), tweedie, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("law", ["mix2d", "mix4d-img", "gauss1d"])
def test_posterior_sample_moments(law):
    """n draws of X_0 | X_s = x for one fixed x: mean within Z standard errors, covariance entries too."""
    data, sde = LAWS[law](), VPSDE(0.1, 20.0)
    n = 40_000
    x1 = _x(data, 1, 5)
    x = x1.expand(n, *x1.shape[1:]).clone()
    s = 0.25
    post = data.posterior(sde, s, x)
    draws = post.sample(make_gen(6))
    assert draws.shape == x.shape
    y = draws.reshape(n, data.d)
    m_cf, c_cf = post.mean()[0].reshape(data.d), post.cov()[0]
    assert ((y.mean(0) - m_cf).abs() <= Z * mean_se(y)).all()
    yc = y - m_cf
    prods = (yc[:, :, None] * yc[:, None, :]).reshape(n, -1)
    assert ((prods.mean(0) - c_cf.reshape(-1)).abs() <= Z * mean_se(prods)).all()


# --- noised marginals, moments and sampling -------------------------------------------------------

@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_noised_equals_formulas(law, sde_name):
    data, sde = LAWS[law](), SDES[sde_name]
    s = 0.35 * sde.T
    a, sg = float(sde.alpha(f64(s))), float(sde.sigma(f64(s)))
    ps = data.noised(sde, s)
    assert ps.event_shape == data.event_shape and ps.K == data.K
    torch.testing.assert_close(ps.weights, data.weights, rtol=0, atol=0)
    torch.testing.assert_close(ps.means, a * data.means, rtol=1e-15, atol=0)
    torch.testing.assert_close(ps.covs, a**2 * data.covs + sg**2 * torch.eye(data.d, dtype=torch.float64),
                               rtol=1e-14, atol=1e-15)
    x = _x(data, 8, 7)
    torch.testing.assert_close(ps.log_prob(None, 0.0, x), data.log_prob(sde, s, x), rtol=1e-11, atol=1e-11)
    # mean and covariance of p_s: alpha E[X_0] and alpha^2 Cov[X_0] + sigma^2 I
    torch.testing.assert_close(ps.mean(), a * data.mean(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ps.cov(), a**2 * data.cov() + sg**2 * torch.eye(data.d, dtype=torch.float64),
                               rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("law", ["mix2d", "mix4d-img", "ring", "mix1d"])
def test_sample_moments_and_shape(law):
    data = LAWS[law]()
    n = 40_000
    x = data.sample(n, make_gen(8))
    assert x.shape == (n, *data.event_shape) and x.dtype == torch.float64
    assert data.sample(5, make_gen(8), dtype=torch.float32).dtype == torch.float32
    y = x.reshape(n, data.d)
    assert ((y.mean(0) - data.mean()).abs() <= Z * mean_se(y)).all()
    yc = y - data.mean()
    prods = (yc[:, :, None] * yc[:, None, :]).reshape(n, -1)
    assert ((prods.mean(0) - data.cov().reshape(-1)).abs() <= Z * mean_se(prods)).all()
    # reproducible with a seeded generator
    torch.testing.assert_close(data.sample(10, make_gen(9)), data.sample(10, make_gen(9)), rtol=0, atol=0)


def test_mixture_moments_closed_form():
    # two-component 1-D mixture: mean = 0.3*(-1) + 0.7*1.5 = 0.75;
    # E[X^2] = 0.3*(0.25 + 1) + 0.7*(0.64 + 2.25) = 0.375 + 2.023 = 2.398; var = 2.398 - 0.5625 = 1.8355
    data = _mixture_1d()
    assert float(data.mean()[0]) == pytest.approx(0.75, rel=1e-15)
    assert float(data.cov()[0, 0]) == pytest.approx(1.8355, rel=1e-14)


def test_ring_mixture_and_nearest_component():
    data = ring_mixture(8, 2.0, 0.2)
    ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    torch.testing.assert_close(data.means, 2.0 * torch.stack([ang.cos(), ang.sin()], 1), rtol=0, atol=1e-15)
    torch.testing.assert_close(data.covs, 0.04 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2),
                               rtol=1e-15, atol=0)
    torch.testing.assert_close(data.weights, torch.full((8,), 1 / 8, dtype=torch.float64), rtol=0, atol=0)
    # points slightly off each mean are assigned to that mode
    pts = 0.9 * data.means
    assert data.nearest_component(pts).tolist() == list(range(8))
    # cov of the ring: std^2 I + (radius^2 / 2) I = (0.04 + 2) I, mean 0
    torch.testing.assert_close(data.cov(), 2.04 * torch.eye(2, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(data.mean(), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-15)


def test_gaussian_scalar_and_eigen_attributes():
    g = Gaussian.scalar(0.5, 0.8)
    assert g.event_shape == () and g.K == 1 and g.d == 1
    torch.testing.assert_close(g.covs, f64([[[0.64]]]), rtol=1e-15, atol=0)
    data = _mixture_2d()
    recon = data.U @ torch.diag_embed(data.lam) @ data.U.transpose(1, 2)
    torch.testing.assert_close(recon, data.covs, rtol=1e-13, atol=1e-14)


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[1.0], means=[0.0, 1.0], covs=[[[1.0]]]), r"means must have shape \(K, d\)"),
    (dict(weights=[0.5, 0.5], means=[[0.0]], covs=[[[1.0]]]), r"weights must have shape \(1,\)"),
    (dict(weights=[1.0], means=[[0.0, 1.0]], covs=[[[1.0]]]), r"covs must have shape \(1, 2, 2\)"),
    (dict(weights=[0.5, 0.6], means=[[0.0], [1.0]], covs=[[[1.0]], [[1.0]]]), "sum to 1"),
    (dict(weights=[1.5, -0.5], means=[[0.0], [1.0]], covs=[[[1.0]], [[1.0]]]), "non-negative"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 0.0], [0.0, 1.0]]], event_shape=(3,)),
     "does not hold d = 2"),
])
def test_invalid_mixture_raises_helpful_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_wrong_x_shape_raises():
    data, sde = _mixture_2d(), VPSDE()
    for bad in [torch.zeros(4, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64),
                torch.zeros(4, 1, 2, dtype=torch.float64)]:
        with pytest.raises(ValueError, match=r"x must have shape \(n, \*\(2,\)\)"):
            data.score(sde, 0.5, bad)
    with pytest.raises(ValueError, match=r"x must have shape"):
        Gaussian.scalar(0.0, 1.0).log_prob(sde, 0.5, torch.zeros(4, 1, dtype=torch.float64))
