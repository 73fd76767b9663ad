"""Forward SDEs (sacode.dynamics.sde): closed-form marginals, coefficients, shapes and the reverse-time eta family.

Oracles: the moment ODEs of a linear SDE dX = f(s) X ds + g(s) dW,

    d alpha/ds = f alpha,  alpha(0) = 1;       d var/ds = 2 f var + g^2,  var(0) = 0  (var = sigma^2),

integrated by scipy's solve_ivp at rtol 1e-12, quadrature of g^2 for int_g2, and golden numbers computed by hand
from the formulas stated next to them.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad, solve_ivp

from conftest import f64, make_gen
from sacode.dynamics.sde import OUSDE, VESDE, VPSDE, ReverseSDE
from sacode.dynamics.time import diffusion_time, rl_time

SDES = {
    "vp": VPSDE(0.1, 20.0, 1.0),
    "vp-short": VPSDE(0.1, 2.0, 1.0),
    "ve": VESDE(0.01, 10.0, 1.0),
    "ou": OUSDE(1.0, math.sqrt(2.0), 5.0),
    "ou-odd": OUSDE(0.7, 0.5, 2.0),
}
SHAPES = [(5,), (5, 3), (5, 2, 3, 4)]

# solve_ivp tolerances; the comparison allows a small multiple of rtol (float64 rounding is far below).
RTOL, ATOL = 1e-12, 1e-14


def _scalar(fn, s: float) -> float:
    return float(fn(f64(s)))


def _moment_ode(sde, s_end: float):
    """alpha(s_end) and sigma(s_end)^2 from the moment ODE (independent of the closed forms)."""
    def rhs(s, y):
        f, g2 = _scalar(sde.f_coef, s), _scalar(sde.g2, s)
        return [f * y[0], 2.0 * f * y[1] + g2]
    sol = solve_ivp(rhs, (0.0, s_end), [1.0, 0.0], method="DOP853", rtol=RTOL, atol=ATOL)
    assert sol.success
    return sol.y[0, -1], sol.y[1, -1]


@pytest.mark.parametrize("name", list(SDES))
def test_alpha_sigma_match_moment_ode(name):
    sde = SDES[name]
    for frac in [0.05, 0.3, 0.5, 1.0]:
        s = frac * sde.T
        a_ode, v_ode = _moment_ode(sde, s)
        a, sg = _scalar(sde.alpha, s), _scalar(sde.sigma, s)
        assert a == pytest.approx(a_ode, rel=100 * RTOL, abs=100 * ATOL), (name, s)
        assert sg**2 == pytest.approx(v_ode, rel=100 * RTOL, abs=100 * ATOL), (name, s)


@pytest.mark.parametrize("name", list(SDES))
def test_alpha_is_exp_int_f_and_g2_is_g_squared(name):
    sde = SDES[name]
    s = f64([0.0, 0.1 * sde.T, 0.77 * sde.T])
    torch.testing.assert_close(sde.g2(s), sde.g(s) ** 2, rtol=1e-14, atol=0)
    for si in s.tolist():
        int_f, _ = quad(lambda u: _scalar(sde.f_coef, u), 0.0, si, epsabs=1e-14, epsrel=1e-13)
        assert _scalar(sde.alpha, si) == pytest.approx(math.exp(int_f), rel=1e-12)
    # alpha(0) = 1, sigma(0) = 0 exactly
    assert _scalar(sde.alpha, 0.0) == 1.0
    assert _scalar(sde.sigma, 0.0) == 0.0


@pytest.mark.parametrize("name", list(SDES))
def test_int_g2_matches_quadrature(name):
    sde = SDES[name]
    for a, b in [(0.0, 0.3), (0.25, 0.75), (0.1, 1.0)]:
        s0, s1 = a * sde.T, b * sde.T
        ref, err = quad(lambda u: _scalar(sde.g2, u), s0, s1, epsabs=0, epsrel=1e-13)
        got = float(sde.int_g2(f64(s0), f64(s1)))
        assert got == pytest.approx(ref, rel=1e-11), (name, s0, s1)
    # batched and additive: int_{s0}^{s2} = int_{s0}^{s1} + int_{s1}^{s2}
    s0, s1, s2 = f64([0.0, 0.1]) * sde.T, f64([0.4, 0.5]) * sde.T, f64([0.9, 1.0]) * sde.T
    torch.testing.assert_close(sde.int_g2(s0, s2), sde.int_g2(s0, s1) + sde.int_g2(s1, s2), rtol=1e-13, atol=0)


# --- golden numbers ------------------------------------------------------------------------------

def test_vpsde_golden_numbers():
    # VPSDE(0.1, 20), T = 1: b(s) = 0.1 + 19.9 s, B(s) = 0.1 s + 9.95 s^2.
    # B(0.5) = 0.05 + 2.4875 = 2.5375; alpha(0.5) = exp(-B/2) = exp(-1.26875) = 0.28118288079675235;
    # sigma(0.5) = sqrt(1 - exp(-2.5375)) = 0.9596542020680363; B(1) = 10.05, alpha_bar(1) = exp(-10.05).
    sde = VPSDE(0.1, 20.0)
    half, one = f64(0.5), f64(1.0)
    assert float(sde.b(half)) == pytest.approx(10.05, rel=1e-15)
    assert float(sde.B(half)) == pytest.approx(2.5375, rel=1e-15)
    assert float(sde.B(one)) == pytest.approx(10.05, rel=1e-15)
    assert float(sde.alpha(half)) == pytest.approx(0.28118288079675235, rel=1e-14)
    assert float(sde.sigma(half)) == pytest.approx(0.9596542020680363, rel=1e-14)
    assert float(sde.alpha_bar(one)) == pytest.approx(4.3185749060341275e-05, rel=1e-13)
    assert float(sde.alpha_bar(half)) == pytest.approx(0.28118288079675235**2, rel=1e-14)
    assert float(sde.int_g2(f64(0.0), one)) == pytest.approx(10.05, rel=1e-15)
    assert sde.prior_std() == 1.0


def test_vesde_golden_numbers():
    # VESDE(0.01, 10), T = 1: sigma_n(s) = 0.01 * 1000^s, sigma(s)^2 = sigma_n(s)^2 - 0.01^2.
    # sigma(0.5) = sqrt(0.1 - 1e-4) = 0.3160696125855822; sigma(1) = sqrt(100 - 1e-4) = 9.99999499999875;
    # int_{0.25}^{0.75} g^2 = sigma_n(0.75)^2 - sigma_n(0.25)^2 = 1e-4 (1000^1.5 - 1000^0.5) = 3.159115382508211.
    sde = VESDE(0.01, 10.0)
    assert float(sde.noise_level(f64(0.5))) == pytest.approx(math.sqrt(0.1), rel=1e-14)
    assert float(sde.sigma(f64(0.5))) == pytest.approx(0.3160696125855822, rel=1e-13)
    assert float(sde.sigma(f64(1.0))) == pytest.approx(9.99999499999875, rel=1e-13)
    assert sde.prior_std() == pytest.approx(9.99999499999875, rel=1e-13)
    assert float(sde.int_g2(f64(0.25), f64(0.75))) == pytest.approx(3.159115382508211, rel=1e-12)
    assert float(sde.alpha(f64(0.5))) == 1.0
    # g(s)^2 = d sigma_n^2 / ds = 2 log(1000) sigma_n^2 = 2 log(1000) * 0.1 at s = 0.5
    assert float(sde.g2(f64(0.5))) == pytest.approx(0.2 * math.log(1000.0), rel=1e-14)


def test_ousde_golden_numbers():
    # OUSDE(theta=1, sigma0=sqrt 2, T=5): alpha(s) = e^{-s}, sigma(s)^2 = (1 - e^{-2s}) sigma0^2 / 2 = 1 - e^{-2s}.
    # alpha(0.5) = e^{-0.5} = 0.6065306597126334; sigma(0.5) = sqrt(1 - e^{-1}) = 0.7950600976206501; prior std 1.
    sde = OUSDE(1.0, math.sqrt(2.0), 5.0)
    assert float(sde.alpha(f64(0.5))) == pytest.approx(0.6065306597126334, rel=1e-14)
    assert float(sde.sigma(f64(0.5))) == pytest.approx(0.7950600976206501, rel=1e-14)
    assert sde.prior_std() == pytest.approx(1.0, rel=1e-15)
    # a non-default OU: stationary std sigma0 / sqrt(2 theta) = 0.5 / sqrt(1.4); sigma(s) -> it as s -> infinity
    ou = OUSDE(0.7, 0.5, 2.0)
    assert ou.prior_std() == pytest.approx(0.5 / math.sqrt(1.4), rel=1e-15)
    assert float(ou.int_g2(f64(0.5), f64(1.5))) == pytest.approx(0.25, rel=1e-15)
    assert float(ou.sigma(f64(60.0))) == pytest.approx(0.5 / math.sqrt(1.4), rel=1e-14)


@pytest.mark.parametrize("cls, args", [(VPSDE, (0.0, 20.0)), (VPSDE, (5.0, 1.0)), (VPSDE, (0.1, 20.0, -1.0)),
                                       (VESDE, (10.0, 0.01)), (VESDE, (0.0, 1.0)),
                                       (OUSDE, (0.0, 1.0)), (OUSDE, (1.0, -1.0))])
def test_invalid_parameters_raise(cls, args):
    with pytest.raises(ValueError, match="needs"):
        cls(*args)


def test_prior_std_is_sigma_T_where_not_overridden():
    # VE has no override: prior std = sigma(T). VP overrides with 1 (the usual N(0, I) prior, not p_T).
    for sde in [VESDE(0.05, 3.0, 2.0)]:
        assert sde.prior_std() == pytest.approx(float(sde.sigma(f64(sde.T))), rel=1e-15)
    x = VPSDE().prior_sample((4000, 2), make_gen(0))
    assert x.shape == (4000, 2) and x.dtype == torch.float64


# --- shapes, drift, diffusion ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["vp", "ve", "ou"])
def test_drift_and_diffusion_shapes_and_values(name, shape):
    sde = SDES[name]
    x = torch.randn(shape, generator=make_gen(1), dtype=torch.float64)
    n = shape[0]
    s_vec = torch.linspace(0.1, 0.9, n, dtype=torch.float64) * sde.T
    for s in [0.4 * sde.T, s_vec]:
        s_n = torch.as_tensor(s, dtype=torch.float64).expand(n)
        bshape = (n,) + (1,) * (len(shape) - 1)
        dr, df = sde.drift(s, x), sde.diffusion(s, x)
        assert dr.shape == x.shape and df.shape == x.shape
        torch.testing.assert_close(dr, sde.f_coef(s_n).reshape(bshape) * x, rtol=1e-15, atol=0)
        torch.testing.assert_close(df, sde.g(s_n).reshape(bshape).expand(shape), rtol=1e-15, atol=0)
        mean, std = sde.marginal_params(s, x)
        torch.testing.assert_close(mean, sde.alpha(s_n).reshape(bshape) * x, rtol=1e-15, atol=0)
        assert std.shape == bshape or std.ndim == 0
        z = torch.randn(shape, generator=make_gen(2), dtype=torch.float64)
        torch.testing.assert_close(sde.marginal_sample(s, x, z), mean + std * z, rtol=1e-15, atol=0)


def test_time_of_wrong_shape_raises():
    sde = VPSDE()
    with pytest.raises(ValueError, match="time must be a scalar or have shape"):
        sde.drift(torch.zeros(3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", ["vp", "ve", "ou"])
def test_reverse_drift_eta_family(name, eta, shape):
    """reverse_drift = -f x + (1 + eta^2)/2 g^2 score (chapter 1); eta = 0 is the PF-ODE drift."""
    sde = SDES[name]
    x = torch.randn(shape, generator=make_gen(3), dtype=torch.float64)
    score = torch.randn(shape, generator=make_gen(4), dtype=torch.float64)
    n = shape[0]
    s = torch.linspace(0.05, 0.95, n, dtype=torch.float64) * sde.T
    bshape = (n,) + (1,) * (len(shape) - 1)
    f, g2 = sde.f_coef(s).reshape(bshape), sde.g2(s).reshape(bshape)
    expected = -f * x + 0.5 * (1 + eta**2) * g2 * score
    got = sde.reverse_drift(s, x, score, eta)
    assert got.shape == shape
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(sde.pf_ode_drift(s, x, score), -f * x + 0.5 * g2 * score, rtol=1e-14, atol=1e-14)
    # the eta-family all have the same marginals: drift(eta) - drift(0) = eta^2/2 g^2 score (the Fokker-Planck
    # correction that pays for the extra noise eta g dB)
    torch.testing.assert_close(got - sde.pf_ode_drift(s, x, score), 0.5 * eta**2 * g2 * score,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
def test_reverse_sde_object_uses_rl_time(eta):
    """ReverseSDE.f/g at RL time t evaluate the eta-family at diffusion time s = T - t."""
    sde = OUSDE(0.7, 0.5, 2.0)
    score_fn = lambda s, x: -x * (1 + s[:, None])          # any score; depends on s to catch time mix-ups
    rev = sde.reverse(score_fn, eta)
    assert isinstance(rev, ReverseSDE) and rev.noise_type == "diagonal" and rev.sde_type == "ito"
    x = torch.randn(6, 2, generator=make_gen(5), dtype=torch.float64)
    t = 0.3
    s = diffusion_time(t, sde.T)
    assert s == pytest.approx(1.7) and rl_time(s, sde.T) == pytest.approx(t)
    s_n = torch.full((6,), s, dtype=torch.float64)
    torch.testing.assert_close(rev.f(torch.tensor(t), x), sde.reverse_drift(s_n, x, score_fn(s_n, x), eta))
    torch.testing.assert_close(rev.g(torch.tensor(t), x), eta * sde.diffusion(s_n, x))


def test_reverse_sde_integrates_with_torchsde():
    """The ReverseSDE protocol works with torchsde (shape contract only; accuracy is a verify check)."""
    torchsde = pytest.importorskip("torchsde")
    from sacode.theory.data import Gaussian
    sde = VPSDE(0.1, 2.0)
    data = Gaussian([0.5, -0.2], [[0.6, 0.1], [0.1, 0.3]])
    y0 = sde.prior_sample((8, 2), make_gen(6))
    ts = torch.tensor([0.0, 0.5, 0.99], dtype=torch.float64)
    ys = torchsde.sdeint(sde.reverse(data.score_fn(sde), 1.0), y0, ts, method="euler", dt=0.01)
    assert ys.shape == (3, 8, 2) and torch.isfinite(ys).all()
    ys_fwd = torchsde.sdeint(sde.torchsde(), y0, ts, method="euler", dt=0.01)
    assert ys_fwd.shape == (3, 8, 2) and torch.isfinite(ys_fwd).all()


def test_rl_time_and_diffusion_time_are_inverse():
    T = 2.5
    s = np.linspace(0, T, 7)
    np.testing.assert_allclose(diffusion_time(rl_time(s, T), T), s, rtol=0, atol=1e-15)
    assert rl_time(0.0, T) == T and diffusion_time(0.0, T) == T
