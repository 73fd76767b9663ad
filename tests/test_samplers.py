"""Samplers (sacode.dynamics.samplers): time grids, golden runs, step formulas, log-densities, shapes, exact laws, errors.

Oracles: an independent pure-Python re-implementation of every step for the 1-D VP/Gaussian case (math module
only), the DDPM posterior written with alpha_bar, the Gaussian bridge q(x_{s'} | x_s, x_0) of a linear SDE
obtained by conditioning, torch.distributions.Normal for log-densities, and Monte Carlo within Z standard errors
for propagate_gaussian.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import Z, f64, make_gen, mean_se
from sacode.theory.data import Gaussian, GaussianMixture
from sacode.dynamics.grid import TimeGrid
from sacode.dynamics.gaussian_step import gaussian_log_prob
from sacode.dynamics.samplers import METHODS, ddim_step, em_step, get_step, propagate_gaussian, reverse_sde_sample
from sacode.dynamics.sde import OUSDE, VESDE, VPSDE

SDE = VPSDE(0.1, 20.0)
DATA = Gaussian.scalar(0.5, 0.8)
CONFIGS = [("em", 1.0), ("em", 0.5), ("ddim", 1.0), ("ddim", 0.5), ("ddim", 0.0), ("pf-euler", 0.0),
           ("pf-heun", 0.0)]

# Inputs of the golden run: fixed numbers, so the golden outputs do not depend on torch's RNG.
X_INIT = [-1.2, 0.3, 1.7]
NOISES = [[0.5, -1.0, 0.2], [1.3, 0.1, -0.7], [-0.4, 0.9, 1.1], [0.0, -1.5, 0.6]]

# Golden terminal states of reverse_sde_sample(VPSDE(0.1, 20), N(0.5, 0.8^2).score_fn, X_INIT,
# TimeGrid.uniform(1, 4), method, eta, noises=NOISES), produced once with sacode 0.1.0 (commit 3e3ddee) in float64:
#   tr = reverse_sde_sample(sde, data.score_fn(sde), x0, TimeGrid.uniform(1.0, 4), m, eta=eta, noises=z); tr.x
# and independently reproduced by the pure-Python reference sampler _ref_run below (test_golden_matches_reference).
GOLDEN = {
    ("em", 1.0): [0.5456394440876493, -1.05919842265279, 1.3769587948985804],
    ("em", 0.5): [0.8798478028352925, -0.024184605100899148, 1.3507892150945349],
    ("ddim", 1.0): [0.588688599879908, 0.8217594518391419, 0.8087233699047137],
    ("ddim", 0.0): [-0.0424871559331598, 0.6337700877459319, 1.264943515179751],
    ("pf-euler", 0.0): [-0.4932650128298417, 0.7356771698211682, 1.8826898736287776],
    ("pf-heun", 0.0): [-0.3275861056083994, 0.8129424832715233, 1.8774358328927845],
}


# --- an independent reference for VPSDE(0.1, 20) and data N(0.5, 0.8^2), scalar math only ---------------

def _b(s):        # noise rate b(s) = b_min + (b_max - b_min) s
    return 0.1 + 19.9 * s


def _abar(s):     # alpha_bar(s) = exp(-B(s)), B(s) = 0.1 s + 9.95 s^2
    return math.exp(-(0.1 * s + 9.95 * s * s))


def _score(s, x):  # N(0.5, 0.64) noised: N(a 0.5, a^2 0.64 + 1 - a^2), a^2 = alpha_bar
    ab = _abar(s)
    return -(x - math.sqrt(ab) * 0.5) / (ab * 0.64 + 1.0 - ab)


def _ref_step(method, eta, s, sn, x, z):
    """One step: returns (x_next, mean, std)."""
    h = s - sn
    if method == "em":       # EM on dX = [b x / 2 + (1 + eta^2)/2 b score] dt + eta sqrt(b) dB
        mean = x + h * (0.5 * _b(s) * x + 0.5 * (1 + eta**2) * _b(s) * _score(s, x))
        std = eta * math.sqrt(_b(s) * h)
        return mean + std * z, mean, std
    if method == "ddim":     # Song, Meng, Ermon 2021, eq. 12, in alpha_bar form
        ac, an = _abar(s), _abar(sn)
        x0 = (x + (1 - ac) * _score(s, x)) / math.sqrt(ac)
        eps = (x - math.sqrt(ac) * x0) / math.sqrt(1 - ac)
        var = eta**2 * (1 - an) / (1 - ac) * (1 - ac / an)
        mean = math.sqrt(an) * x0 + math.sqrt(max(1 - an - var, 0.0)) * eps
        return mean + math.sqrt(var) * z, mean, math.sqrt(var)
    drift = lambda u, y: 0.5 * _b(u) * y + 0.5 * _b(u) * _score(u, y)   # PF-ODE drift in RL time
    if method == "pf-euler":
        xn = x + h * drift(s, x)
        return xn, xn, 0.0
    if method == "pf-heun":  # Karras et al. 2022, Alg. 1: no corrector on a step that ends at sigma = 0
        xp = x + h * drift(s, x)
        if sn == 0.0:
            return xp, xp, 0.0
        xn = x + 0.5 * h * (drift(s, x) + drift(sn, xp))
        return xn, xn, 0.0
    raise AssertionError(method)


def _ref_run(method, eta, grid_s, x_init, noises):
    xs, means, stds = [list(x_init)], [], []
    x = list(x_init)
    for k in range(len(grid_s) - 1):
        out = [_ref_step(method, eta, grid_s[k], grid_s[k + 1], xi, (noises[k][i] if noises else 0.0))
               for i, xi in enumerate(x)]
        x = [o[0] for o in out]
        xs.append(x)
        means.append([o[1] for o in out])
        stds.append([o[2] for o in out])
    return xs, means, stds


def _golden_run(method, eta, record=False, grid=None):
    grid = grid or TimeGrid.uniform(1.0, 4)
    return reverse_sde_sample(SDE, DATA.score_fn(SDE), f64(X_INIT), grid, method, eta=eta, noises=f64(NOISES),
                              record=record)


# --- time grids -----------------------------------------------------------------------------------

def test_time_grid_uniform():
    g = TimeGrid.uniform(2.0, 8)
    assert g.K == 8 and g.s.dtype == torch.float64
    torch.testing.assert_close(g.s, torch.linspace(2.0, 0.0, 9, dtype=torch.float64))
    torch.testing.assert_close(g.dt, torch.full((8,), 0.25, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(g.t, 2.0 - g.s)
    assert bool((g.t[1:] > g.t[:-1]).all())
    g2 = TimeGrid.uniform(1.0, 4, s_end=0.2)
    assert float(g2.s[-1]) == pytest.approx(0.2) and float(g2.s[0]) == 1.0
    torch.testing.assert_close(g2.dt, torch.full((4,), 0.2, dtype=torch.float64), rtol=1e-14, atol=1e-15)


def test_time_grid_power():
    g = TimeGrid.power(1.0, 10, rho=3.0, s_end=0.01)
    assert float(g.s[0]) == pytest.approx(1.0, abs=1e-15) and float(g.s[-1]) == pytest.approx(0.01, abs=1e-15)
    # s_k = s_end + (T - s_end)(1 - k/K)^rho; steps shrink towards the data end
    k = torch.arange(11, dtype=torch.float64)
    torch.testing.assert_close(g.s, 0.01 + 0.99 * (1 - k / 10) ** 3)
    assert bool((g.dt[1:] < g.dt[:-1]).all())
    torch.testing.assert_close(TimeGrid.power(1.0, 5, rho=1.0).s, TimeGrid.uniform(1.0, 5).s)


def test_time_grid_random():
    g = TimeGrid.random(1.0, 12, make_gen(3), s_end=0.05)
    assert g.K == 12 and float(g.s[0]) == 1.0 and float(g.s[-1]) == pytest.approx(0.05)
    assert bool((g.dt > 0).all())
    torch.testing.assert_close(TimeGrid.random(1.0, 12, make_gen(3), s_end=0.05).s, g.s, rtol=0, atol=0)
    assert not torch.equal(TimeGrid.random(1.0, 12, make_gen(4), s_end=0.05).s, g.s)
    assert TimeGrid.random(1.0, 1, make_gen(0)).K == 1


def test_time_grid_random_keeps_T_exact():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)            # the default users have
    try:
        g = TimeGrid.random(0.3, 5, make_gen(0), s_end=1e-3)
    finally:
        torch.set_default_dtype(old)
    assert float(g.s[0]) == 0.3 and float(g.s[-1]) == 1e-3


@pytest.mark.parametrize("s, T, match", [
    ([[1.0, 0.5]], 1.0, "1-D tensor"),
    ([1.0], 1.0, "at least 2 times"),
    ([1.0, 0.5, 0.5, 0.0], 1.0, "decrease strictly"),
    ([0.0, 0.5, 1.0], 1.0, "decrease strictly"),
    ([1.5, 0.5, 0.0], 1.0, r"lie in \[0, T=1.0\]"),
    ([1.0, 0.5, -0.1], 1.0, r"lie in \[0, T=1.0\]"),
])
def test_time_grid_validation(s, T, match):
    with pytest.raises(ValueError, match=match):
        TimeGrid(torch.tensor(s, dtype=torch.float64), T)


# --- golden numbers and independent step formulas -------------------------------------------------

@pytest.mark.parametrize("method, eta", list(GOLDEN))
def test_golden_terminal_states(method, eta):
    tr = _golden_run(method, eta)
    torch.testing.assert_close(tr.x, f64(GOLDEN[(method, eta)]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, eta", CONFIGS)
def test_every_step_matches_reference(method, eta):
    """States, transition means and stds at every step equal the pure-Python reference (float64 rounding)."""
    grid = TimeGrid.uniform(1.0, 4)
    tr = _golden_run(method, eta, record=True, grid=grid)
    xs, means, stds = _ref_run(method, eta, grid.s.tolist(), X_INIT, NOISES)
    torch.testing.assert_close(tr.xs, f64(xs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tr.means, f64(means), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tr.stds, f64(stds), rtol=1e-12, atol=1e-12)
    scores = [[_score(float(grid.s[k]), x) for x in xs[k]] for k in range(4)]
    torch.testing.assert_close(tr.scores, f64(scores), rtol=1e-12, atol=1e-12)
    if (method, eta) in GOLDEN:
        torch.testing.assert_close(f64(xs[-1]), f64(GOLDEN[(method, eta)]), rtol=1e-12, atol=1e-12)


def test_ddim_eta1_is_ddpm_posterior_step():
    """DDIM(eta=1) = DDPM's q(x_{n} | x_c, x0_hat): mean sqrt(abar_n) beta/(1-abar_c) x0 +
    sqrt(alpha) (1-abar_n)/(1-abar_c) x_c, variance (1-abar_n)/(1-abar_c) beta, alpha = abar_c/abar_n, beta = 1-alpha."""
    x = torch.randn(6, 2, generator=make_gen(1), dtype=torch.float64)
    data = Gaussian([0.4, -0.3], [[0.5, 0.2], [0.2, 0.4]])
    for sc, sn in [(1.0, 0.8), (0.5, 0.45), (0.1, 0.0)]:
        st = ddim_step(SDE, data.score_fn(SDE), x, sc, sn, None, eta=1.0)
        abc, abn = SDE.alpha_bar(f64(sc)), SDE.alpha_bar(f64(sn))
        al, be = abc / abn, 1 - abc / abn
        x0 = data.denoise(SDE, sc, x)
        mean = abn.sqrt() * be / (1 - abc) * x0 + al.sqrt() * (1 - abn) / (1 - abc) * x
        var = (1 - abn) / (1 - abc) * be
        torch.testing.assert_close(st.mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.std, var.sqrt().expand(6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), VESDE(0.01, 10.0), OUSDE(0.7, 0.5, 2.0)], ids=["vp", "ve", "ou"])
def test_ddim_eta1_is_the_gaussian_bridge_for_any_linear_sde(sde):
    """For any linear SDE, DDIM(eta=1) is q(x_n | x_c, x0_hat) from conditioning the joint law of (X_n, X_c) | X_0:
    X_n ~ N(a_n x0, sg_n^2), X_c | X_n ~ N(r X_n, sg_c^2 - r^2 sg_n^2), r = a_c / a_n."""
    data = Gaussian.scalar(0.5, 0.8)
    x = torch.randn(5, generator=make_gen(2), dtype=torch.float64)
    for fc, fn in [(1.0, 0.7), (0.3, 0.29), (0.2, 0.0)]:
        sc, sn = fc * sde.T, fn * sde.T
        st = ddim_step(sde, data.score_fn(sde), x, sc, sn, None, eta=1.0)
        a_c, a_n, g_c, g_n = (float(f(f64(u))) for f, u in [(sde.alpha, sc), (sde.alpha, sn), (sde.sigma, sc),
                                                              (sde.sigma, sn)])
        r = a_c / a_n
        joint = f64([[g_n**2, r * g_n**2], [r * g_n**2, g_c**2]])          # Cov(X_n, X_c | X_0)
        x0 = data.denoise(sde, sc, x)
        gain = joint[0, 1] / joint[1, 1]
        torch.testing.assert_close(st.mean, a_n * x0 + gain * (x - a_c * x0), rtol=1e-11, atol=1e-11)
        var = joint[0, 0] - joint[0, 1] ** 2 / joint[1, 1]
        torch.testing.assert_close(st.std, var.clamp_min(0).sqrt().expand(5), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), VESDE(0.01, 10.0), OUSDE(0.7, 0.5, 2.0)], ids=["vp", "ve", "ou"])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_em_step_formula(sde, eta):
    """EM: x_next = x + h [-f x + (1 + eta^2)/2 g^2 score] + eta g sqrt(h) z with g, f at the current time."""
    x = torch.randn(4, 3, generator=make_gen(3), dtype=torch.float64)
    z = torch.randn(4, 3, generator=make_gen(4), dtype=torch.float64)
    score_fn = lambda s, y: -y / (1 + s[:, None])
    sc, sn = 0.6 * sde.T, 0.55 * sde.T
    st = em_step(sde, score_fn, x, sc, sn, z, eta=eta)
    h, f, g2 = sc - sn, float(sde.f_coef(f64(sc))), float(sde.g2(f64(sc)))
    mean = x + h * (-f * x + 0.5 * (1 + eta**2) * g2 * (-x / (1 + sc)))
    torch.testing.assert_close(st.mean, mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(st.std, f64(eta * math.sqrt(g2 * h)).expand(4), rtol=1e-13, atol=0)
    torch.testing.assert_close(st.x_next, mean + eta * math.sqrt(g2 * h) * z, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(st.score, -x / (1 + sc), rtol=1e-15, atol=0)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown sampler method 'heun'; choose one of em, ddim"):
        get_step("heun")
    with pytest.raises(ValueError, match="unknown sampler method"):
        reverse_sde_sample(SDE, DATA.score_fn(SDE), f64(X_INIT), TimeGrid.uniform(1.0, 4), "rk4")


# --- log-densities, recording, reproducibility ------------------------------------------------------

SHAPE_LAWS = {
    "(n,)": lambda: Gaussian.scalar(0.5, 0.8),
    "(n,d)": lambda: GaussianMixture.isotropic([0.3, 0.7], [[-1.0, 0.5, 0.0], [1.0, 0.0, 0.5]], [0.3, 0.5]),
    "(n,c,h,w)": lambda: GaussianMixture.isotropic([0.3, 0.7], [[-1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.5, -1.0]],
                                                   [0.3, 0.5], event_shape=(1, 2, 2)),
}


@pytest.mark.parametrize("shape_name", list(SHAPE_LAWS))
@pytest.mark.parametrize("method, eta", [("em", 1.0), ("em", 0.4), ("ddim", 1.0), ("ddim", 0.6)])
def test_recorded_log_probs_equal_normal_log_density(shape_name, method, eta):
    data = SHAPE_LAWS[shape_name]()
    n, K = 5, 6
    grid = TimeGrid.uniform(1.0, K, s_end=1e-3)
    x_init = SDE.prior_sample((n, *data.event_shape), make_gen(5))
    tr = reverse_sde_sample(SDE, data.score_fn(SDE), x_init, grid, method, eta, make_gen(6), record=True)
    ev = data.event_shape
    assert tr.xs.shape == (K + 1, n, *ev) and tr.scores.shape == (K, n, *ev) and tr.means.shape == (K, n, *ev)
    assert tr.stds.shape == (K, n) and tr.log_probs.shape == (K, n)
    torch.testing.assert_close(tr.xs[-1], tr.x, rtol=0, atol=0)
    torch.testing.assert_close(tr.xs[0], x_init, rtol=0, atol=0)
    bshape = (K, n) + (1,) * len(ev)
    normal = torch.distributions.Normal(tr.means, tr.stds.reshape(bshape).expand_as(tr.means))
    lp = normal.log_prob(tr.xs[1:]).reshape(K, n, -1).sum(-1)
    torch.testing.assert_close(tr.log_probs, lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian_log_prob(tr.xs[1], tr.means[0], tr.stds[0]), lp[0], rtol=1e-12, atol=1e-12)


def test_deterministic_methods_record_no_log_probs():
    for method, eta in [("pf-euler", 0.0), ("pf-heun", 0.0), ("em", 0.0), ("ddim", 0.0)]:
        tr = _golden_run(method, eta, record=True)
        assert tr.log_probs is None
        torch.testing.assert_close(tr.stds, torch.zeros(4, 3, dtype=torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(tr.means, tr.xs[1:], rtol=0, atol=0)
    tr = _golden_run("em", 1.0, record=False)
    assert tr.xs is None and tr.log_probs is None and tr.x.shape == (3,)


def test_ddim_to_s_zero_records_finite_log_probs():
    tr = reverse_sde_sample(SDE, DATA.score_fn(SDE), f64(X_INIT), TimeGrid.uniform(1.0, 4), "ddim", 1.0,
                            noises=f64(NOISES), record=True)
    assert torch.isfinite(tr.log_probs).all()


def test_generator_reproducible_and_equal_to_predrawn_noises():
    n, K = 7, 5
    grid = TimeGrid.uniform(1.0, K)
    x_init = SDE.prior_sample((n, 2), make_gen(7))
    data = Gaussian([0.5, -0.5], [[0.6, 0.1], [0.1, 0.3]])
    a = reverse_sde_sample(SDE, data.score_fn(SDE), x_init, grid, "em", 1.0, make_gen(8)).x
    b = reverse_sde_sample(SDE, data.score_fn(SDE), x_init, grid, "em", 1.0, make_gen(8)).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = make_gen(8)
    noises = torch.stack([torch.randn((n, 2), generator=g, dtype=torch.float64) for _ in range(K)])
    c = reverse_sde_sample(SDE, data.score_fn(SDE), x_init, grid, "em", 1.0, noises=noises).x
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("method, eta", CONFIGS)
def test_shape_agnostic_sampling(method, eta):
    """The same law sampled as (n,) vs (n, 1), and as (n, 1, 2, 2) vs (n, 4), with the same noises: same numbers."""
    n, K = 4, 5
    grid = TimeGrid.uniform(1.0, K, s_end=1e-3)
    pairs = [
        (Gaussian.scalar(0.5, 0.8), Gaussian([0.5], [[0.64]]), (n,), (n, 1)),
        (SHAPE_LAWS["(n,c,h,w)"](),
         GaussianMixture.isotropic([0.3, 0.7], [[-1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.5, -1.0]], [0.3, 0.5]),
         (n, 1, 2, 2), (n, 4)),
    ]
    for law_a, law_b, shape_a, shape_b in pairs:
        x_a = SDE.prior_sample(shape_a, make_gen(9))
        noises_a = torch.randn((K, *shape_a), generator=make_gen(10), dtype=torch.float64)
        ta = reverse_sde_sample(SDE, law_a.score_fn(SDE), x_a, grid, method, eta, noises=noises_a, record=True)
        tb = reverse_sde_sample(SDE, law_b.score_fn(SDE), x_a.reshape(shape_b), grid, method, eta,
                                noises=noises_a.reshape(K, *shape_b), record=True)
        assert ta.x.shape == shape_a and tb.x.shape == shape_b
        torch.testing.assert_close(ta.xs.reshape(K + 1, *shape_b), tb.xs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ta.stds, tb.stds, rtol=1e-12, atol=1e-14)
        if ta.log_probs is not None:
            torch.testing.assert_close(ta.log_probs, tb.log_probs, rtol=1e-12, atol=1e-12)


# --- propagate_gaussian: exact law of the discrete sampler vs Monte Carlo --------------------------

@pytest.mark.parametrize("method, eta", [("em", 1.0), ("em", 0.5), ("ddim", 1.0), ("ddim", 0.5), ("pf-euler", 0.0),
                                         ("pf-heun", 0.0)])
def test_propagate_gaussian_matches_monte_carlo(method, eta):
    sde = VPSDE(0.1, 2.0)
    data = Gaussian([0.5, -1.0], [[0.64, 0.3], [0.3, 0.5]])
    grid = TimeGrid.power(1.0, 8, rho=2.0, s_end=1e-3)
    mean0, cov0 = f64([0.3, -0.2]), f64([[1.0, 0.2], [0.2, 0.6]])
    m_ex, C_ex = propagate_gaussian(sde, data.score_fn(sde), grid, mean0, cov0, method, eta)
    n = 20_000
    L = torch.linalg.cholesky(cov0)
    x0 = mean0 + torch.randn(n, 2, generator=make_gen(11), dtype=torch.float64) @ L.T
    x = reverse_sde_sample(sde, data.score_fn(sde), x0, grid, method, eta, make_gen(12)).x
    assert ((x.mean(0) - m_ex).abs() <= Z * mean_se(x)).all()
    xc = x - m_ex
    prods = (xc[:, :, None] * xc[:, None, :]).reshape(n, 4)
    assert ((prods.mean(0) - C_ex.reshape(4)).abs() <= Z * mean_se(prods)).all()
    # the sampler moves the law by more than twice the tolerance, so returning x_init would fail
    assert (C_ex - cov0).abs().max() > 2 * float(Z * mean_se(prods).max())


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_non_finite_state_raises_naming_the_step(method):
    def bad_score(s, x):
        out = DATA.score(SDE, s, x)
        return torch.where((s <= 0.5).reshape(-1), torch.full_like(out, math.inf), out)
    grid = TimeGrid.uniform(1.0, 4)                     # s = 1, 0.75, 0.5, 0.25, 0: step 2 starts at s = 0.5
    eta = 1.0 if method in ("em", "ddim") else 0.0
    # pf-heun evaluates the score at s_next too, so its first bad step is step 1 (0.75 -> 0.5)
    first_bad = 1 if method == "pf-heun" else 2
    with pytest.raises(FloatingPointError, match=rf"non-finite state at step {first_bad} \(s = "):
        reverse_sde_sample(SDE, bad_score, f64(X_INIT), grid, method, eta, make_gen(0))


def test_pf_heun_with_eps_parametrised_score_to_s_zero():
    from sacode.engine.nets import ScoreMLP
    torch.manual_seed(0)
    model = ScoreMLP(SDE, 1, hidden=8, depth=1).double()
    with torch.no_grad():
        tr = reverse_sde_sample(SDE, model, f64(X_INIT), TimeGrid.uniform(1.0, 4), "pf-heun")
    assert torch.isfinite(tr.x).all()
