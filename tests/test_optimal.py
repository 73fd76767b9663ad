"""Optimal fine-tuning in closed form (sacode.theory.optimal): Cole-Hopf value, optimal score, tilted and terminal laws, J*.

Oracles: scipy quadrature of the defining integrals (h = E[e^{r/beta} | X_t = x], Z = E e^{r/beta}), the
the closed forms derived in chapter 5, sacode.theory.exact_laws / propagate_gaussian (the
exact law of the discrete sampler for affine scores), and Monte Carlo with Z standard errors plus an exactly
computed discretisation bias.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from conftest import Z, f64, make_gen
from sacode.theory import optimal as O
from sacode.theory.data import Gaussian, ring_mixture
from sacode.theory.exact_laws import reverse_sde_terminal_law
from sacode.theory.presets import TOY_PRESETS, ToyPreset, toy_preset
from sacode.theory.rewards import LinearReward, QuadraticReward
from sacode.dynamics.grid import TimeGrid
from sacode.dynamics.samplers import propagate_gaussian, reverse_sde_sample
from sacode.dynamics.sde import VPSDE

GAUSS = [p for p in TOY_PRESETS if p.startswith("gauss1d")]
EPS = torch.finfo(torch.float64).eps


def _scalars(p: ToyPreset, s: float):
    """alpha, sigma^2, D = alpha^2 s0^2 + sigma^2 of the 1-D presets at diffusion time s."""
    st = f64(s)
    a, sg2 = float(p.sde.alpha(st)), float(p.sde.sigma(st)) ** 2
    return a, sg2, a * a * 0.64 + sg2


def _post(p: ToyPreset, s: float, x: float):
    """Posterior mean and variance of X_0 | Y_s = x for N(0.5, 0.8^2) data (chapter 5)."""
    a, sg2, D = _scalars(p, s)
    return 0.5 + a * 0.64 / D * (x - a * 0.5), 0.64 * sg2 / D


def _custom(data, reward, beta=0.5, b_max=2.0, name="custom") -> ToyPreset:
    return ToyPreset(name, VPSDE(0.1, b_max), data, reward, beta)


# ------------------------------------------------------------------------------------------------
# value function
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GAUSS)
def test_doob_h_matches_scipy_integral(name):
    """h(t, x) = int N(x0; posterior) e^{r(x0)/beta} dx0, by scipy quad, at a few (t, x)."""
    p = toy_preset(name)
    for t, x in [(0.0, -1.0), (0.4, 0.3), (0.9, 2.5), (0.99, 1.0)]:
        m, v = _post(p, p.sde.T - t, x)
        integrand = lambda u: math.exp(-0.5 * (u - m) ** 2 / v + float(p.reward(f64([u]))[0]) / p.beta) / math.sqrt(
            2 * math.pi * v)
        h, err = quad(integrand, m - 12 * math.sqrt(v), m + 12 * math.sqrt(v), epsabs=0, epsrel=1e-12)
        got = float(O.log_doob_h(p, t, f64([x]))[0])
        assert got == pytest.approx(math.log(h), abs=1e-10), (t, x)


def test_linear_value_matches_theory_notes():
    """V* = w m_post + w^2 v/(2 beta) and a* - s_pre = alpha s0^2 w/(beta D) (chapter 5)."""
    p = toy_preset("gauss1d-linear-short")
    x = torch.linspace(-2, 3, 11, dtype=torch.float64)
    for t in [0.0, 0.3, 0.8, 1.0]:
        s = p.sde.T - t
        a, _, D = _scalars(p, s)
        m, v = _post(p, s, x)
        assert torch.allclose(O.optimal_value(p, t, x), m + v / (2 * p.beta), atol=1e-13)
        assert torch.allclose(O.optimal_control(p, t, x), torch.full_like(x, a * 0.64 / (p.beta * D)), atol=1e-13)


def test_quadratic_value_closed_form():
    """V* = -beta/2 log(1 + kappa v) - (lam/2)(m_post - c)^2/(1 + kappa v), kappa = lam/beta (chapter 5)."""
    p = toy_preset("gauss1d-quadratic")
    lam, c, beta = 2.0, 2.0, p.beta
    x = torch.linspace(-2, 3, 11, dtype=torch.float64)
    for t in [0.0, 0.5, 0.95, 1.0]:
        m, v = _post(p, p.sde.T - t, x)
        k = lam / beta
        want = -0.5 * beta * math.log1p(k * v) - 0.5 * lam * (m - c) ** 2 / (1 + k * v)
        assert torch.allclose(O.optimal_value(p, t, x), want, atol=1e-12)


@pytest.mark.parametrize("name", TOY_PRESETS)
def test_terminal_condition_and_grad_identity(name):
    p = toy_preset(name)
    x = torch.randn((50, *p.event_shape), generator=make_gen(1), dtype=torch.float64) * 2
    r = p.reward(x)
    assert (O.optimal_value(p, p.sde.T, x) - r).abs().max() <= 64 * EPS * float(r.abs().max())
    xg = x.clone().requires_grad_(True)
    for t in [0.0, 0.6, 0.97]:
        auto = torch.autograd.grad(O.optimal_value(p, t, xg).sum(), xg)[0]
        assert torch.allclose(auto, O.optimal_value_grad(p, t, x), atol=1e-12, rtol=1e-12)
        a_star = O.optimal_score(p)(torch.full((50,), p.sde.T - t, dtype=torch.float64), x)
        s_pre = p.data.score(p.sde, p.sde.T - t, x)
        assert torch.allclose(a_star, s_pre + auto / p.beta, atol=1e-12)


def test_hjb_residual_is_rounding_and_detects_a_wrong_value(monkeypatch):
    """The HJB residual of V* is at rounding level; the value of the *pretrained* policy (beta -> infinity,
    V = E[r | X_t]) solves the linear PDE, not the HJB, and leaves a residual of the size of the control term."""
    p = toy_preset("gauss1d-quadratic-short")
    x = torch.linspace(-2, 3, 21, dtype=torch.float64).repeat(3)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).repeat_interleave(21)
    terms = O.hjb_residual(p, t, x)
    assert float(terms.residual.abs().max()) <= 2**12 * EPS * float(terms.scale.max())
    pre = ToyPreset("pre", p.sde, p.data, p.reward, 1e6)                     # beta huge: V = E[r | X_t] + O(1/beta)
    monkeypatch.setattr(O, "optimal_value", lambda _, tt, xx: O.log_doob_h(pre, tt, xx) * pre.beta)
    wrong = O.hjb_residual(p, t, x)
    assert float(wrong.residual.abs().max()) > 0.1 * float(wrong.scale.max())


@pytest.mark.parametrize("reward", [LinearReward([0.7, -0.3]), QuadraticReward(1.5, [1.0, 0.5])])
def test_mixture_short_generality(reward):
    """A ring mixture under the short VP (strong memory) with either reward: HJB, terminal condition, quadrature."""
    p = _custom(ring_mixture(), reward)
    g = torch.linspace(-2.5, 2.5, 7, dtype=torch.float64)
    x = torch.cartesian_prod(g, g).repeat(3, 1)
    t = torch.tensor([0.0, 0.5, 0.95], dtype=torch.float64).repeat_interleave(49)
    terms = O.hjb_residual(p, t, x)
    assert float(terms.residual.abs().max()) <= 2**12 * EPS * float(terms.scale.max())
    law = O.optimal_terminal_law(p, n_nodes=40)
    ref = O.optimal_terminal_law(p, n_nodes=80)
    assert law.quad_error < 1e-5
    assert float((law.mean - ref.mean).abs().max()) <= law.quad_error
    assert float((law.weights - ref.weights).abs().max()) <= law.quad_error
    assert float(law.weights.sum()) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# tilted laws, terminal laws and J*
# ------------------------------------------------------------------------------------------------
def test_naive_tilt_closed_forms():
    lin = O.naive_tilt(toy_preset("gauss1d-linear"))
    assert float(lin.means[0, 0]) == pytest.approx(0.5 + 0.64 / 0.5) and float(lin.covs[0, 0, 0]) == pytest.approx(0.64)
    quad_t = O.naive_tilt(toy_preset("gauss1d-quadratic"))
    v = 1 / (1 / 0.64 + 2.0)                                                   # chapter 5
    assert float(quad_t.covs[0, 0, 0]) == pytest.approx(v, rel=1e-13)
    assert float(quad_t.means[0, 0]) == pytest.approx(v * (0.5 / 0.64 + 2.0 * 2.0), rel=1e-13)
    p = toy_preset("mixture2d-linear")
    mix = O.naive_tilt(p)
    logits = 2.0 * torch.cos(2 * math.pi * torch.arange(8, dtype=torch.float64) / 8) / 0.5
    assert torch.allclose(mix.weights, torch.softmax(logits, 0), atol=1e-14)
    assert torch.allclose(mix.means, p.data.means + torch.tensor([0.04 / 0.5, 0.0], dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("name", GAUSS)
def test_log_partition_by_quadrature(name):
    p = toy_preset(name)
    f = lambda u: math.exp(-0.5 * (u - 0.5) ** 2 / 0.64 + float(p.reward(f64([u]))[0]) / p.beta) / math.sqrt(
        2 * math.pi * 0.64)
    Zq, _ = quad(f, -15, 15, epsabs=0, epsrel=1e-13, limit=200)
    assert O.log_partition(p) == pytest.approx(math.log(Zq), abs=1e-11)


@pytest.mark.parametrize("name", GAUSS)
def test_terminal_law_three_routes(name):
    p = toy_preset(name)
    cf, gh = O.optimal_terminal_law(p), O.optimal_terminal_law(p, "quadrature")
    mt, Ct = reverse_sde_terminal_law(O.naive_tilt(p), p.sde)
    for m, C in [(gh.mean, gh.cov), (mt, Ct)]:
        assert torch.allclose(cf.mean, m, atol=1e-13) and torch.allclose(cf.cov, C, atol=1e-13)
    obj, objq = O.optimal_objective(p), O.optimal_objective(p, "quadrature")
    assert obj.J == pytest.approx(objq.J, abs=1e-12) and obj.kl == pytest.approx(objq.kl, abs=1e-12)
    assert obj.kl > 0 and obj.J <= obj.expected_reward


def test_kl_equals_average_conditional_kl():
    """KL = E_y KL(tilt_y || posterior_y): Gaussian KLs averaged over y ~ N(0, 1) by scipy quad (quadratic, short)."""
    p = toy_preset("gauss1d-quadratic-short")
    T = f64(p.sde.T)

    def kl_y(y: float) -> float:
        post = p.data.posterior(p.sde, T, f64([y]))
        tilt = O.conditional_optimal_law(p, f64([y]))
        m0, v0 = float(post.means[0, 0, 0]), float(post.var_eig[0, 0, 0])
        m1, v1 = float(tilt.means[0, 0, 0]), float(tilt.var_eig[0, 0, 0])
        return 0.5 * (v1 / v0 - 1 - math.log(v1 / v0) + (m1 - m0) ** 2 / v0)

    val, _ = quad(lambda y: kl_y(y) * math.exp(-0.5 * y * y) / math.sqrt(2 * math.pi), -12, 12, epsrel=1e-12)
    assert val == pytest.approx(O.optimal_objective(p).kl, rel=1e-10)


def test_memoryless_limit_recovers_naive_tilt():
    """With b_max = 60 (alpha_T^2 = e^{-30.05}) the fixed initial law no longer matters."""
    for reward, beta in [(LinearReward([1.0]), 0.5), (QuadraticReward(2.0, [2.0]), 1.0)]:
        p = _custom(Gaussian.scalar(0.5, 0.8), reward, beta, b_max=60.0)
        law, naive, obj = O.optimal_terminal_law(p), O.naive_tilt_law(p), O.optimal_objective(p)
        assert torch.allclose(law.mean, naive.mean, atol=1e-12) and torch.allclose(law.cov, naive.cov, atol=1e-12)
        assert obj.J == pytest.approx(obj.J_naive, abs=1e-12)
    short = O.optimal_objective(toy_preset("gauss1d-linear-short"))
    assert short.J < short.J_naive - 0.1                      # strong memory: the naive value is out of reach


def test_errors_name_the_problem():
    p = toy_preset("mixture2d-linear")
    with pytest.raises(ValueError, match="quadrature"):
        O.optimal_terminal_law(p, "closed-form")
    with pytest.raises(ValueError, match="method"):
        O.optimal_objective(toy_preset("gauss1d-linear"), "exact")
    with pytest.raises(TypeError, match="LinearReward and QuadraticReward"):
        O.optimal_value(ToyPreset("bad", p.sde, p.data, lambda x: x.sum(1), 0.5), 0.0, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="beta"):
        O.naive_tilt(ToyPreset("bad", p.sde, p.data, p.reward, 0.0))
    with pytest.raises(ValueError, match="Gaussian data"):
        O.discrete_gaussian_objective(p, TimeGrid.uniform(1.0, 10))


# ------------------------------------------------------------------------------------------------
# simulation
# ------------------------------------------------------------------------------------------------
def test_affine_score_fast_path_matches_mixture_score():
    for data in [Gaussian.scalar(0.5, 0.8), Gaussian(f64([0.5, -1.0]), f64([[0.64, 0.3], [0.3, 0.5]]))]:
        sde = VPSDE(0.1, 20.0)
        x = torch.randn((30, *data.event_shape), generator=make_gen(2), dtype=torch.float64)
        s = torch.rand(30, generator=make_gen(3), dtype=torch.float64)
        assert torch.allclose(O._AffineGaussianScore(sde, data)(s, x), data.score(sde, s, x), atol=1e-12)


@pytest.mark.parametrize("name", GAUSS)
def test_discrete_law_matches_propagate_gaussian_and_converges(name):
    p = toy_preset(name)
    grid = TimeGrid.uniform(1.0, 50)
    score = O.optimal_score(p)
    m, C = propagate_gaussian(p.sde, lambda s, y: score(s, y[:, 0])[:, None], grid, f64([0.0]), f64([[1.0]]))
    disc = O.discrete_gaussian_objective(p, grid)
    assert torch.allclose(disc.mean, m, atol=1e-14) and torch.allclose(disc.cov, C, atol=1e-14)
    J = O.optimal_objective(p).J
    e1 = abs(O.discrete_gaussian_objective(p, TimeGrid.uniform(1.0, 100)).objective - J)
    e2 = abs(O.discrete_gaussian_objective(p, TimeGrid.uniform(1.0, 200)).objective - J)
    assert e1 / e2 == pytest.approx(2.0, rel=0.05)                          # Euler-Maruyama: weak order 1


def test_doob_h_is_conditional_expectation_under_pretrained_sampler():
    """Start the pretrained sampler at X_t = x and average e^{r(X_T)/beta}: h(t, x) within Z SE + exact bias."""
    p = toy_preset("gauss1d-linear-short")
    t, x, n, K = 0.3, 0.7, 20_000, 100
    grid = TimeGrid(torch.linspace(p.sde.T - t, 0.0, K + 1, dtype=torch.float64), p.sde.T)
    pre = O.pretrained_score(p)
    xT = reverse_sde_sample(p.sde, pre, torch.full((n,), x, dtype=torch.float64), grid, "em",
                            generator=make_gen(4)).x
    e = torch.exp(p.reward(xT) / p.beta)
    m, C = propagate_gaussian(p.sde, lambda s, y: pre(s, y[:, 0])[:, None], grid, f64([x]), f64([[0.0]]))
    h_disc = math.exp(float(m[0]) / p.beta + float(C[0, 0]) / (2 * p.beta**2))
    h = math.exp(float(O.log_doob_h(p, t, f64([x]))[0]))
    assert abs(float(e.mean()) - h) <= Z * float(e.std()) / math.sqrt(n) + abs(h_disc - h)


def test_pretrained_policy_has_zero_kl_and_mc_matches_optimum():
    p = toy_preset("gauss1d-quadratic-short")
    grid = TimeGrid.uniform(1.0, 100)
    ro_pre = O.sample_optimal(p, 2000, grid, make_gen(5), policy=O.pretrained_score(p))
    assert float(ro_pre.kl.abs().max()) == 0.0
    n = 10_000
    ro = O.sample_optimal(p, n, grid, make_gen(6))
    disc, obj = O.discrete_gaussian_objective(p, grid), O.optimal_objective(p)
    law = O.optimal_terminal_law(p)
    se = lambda v: float(v.std()) / math.sqrt(n)
    assert abs(float(ro.x.mean() - law.mean[0])) <= Z * se(ro.x) + abs(float(disc.mean[0] - law.mean[0]))
    assert abs(float(ro.objective.mean()) - obj.J) <= Z * se(ro.objective) + abs(disc.objective - obj.J)
    assert abs(float(ro.kl.mean()) - obj.kl) <= Z * se(ro.kl) + abs(disc.kl - obj.kl)


def test_coupled_rollouts_share_the_brownian_path():
    p = toy_preset("gauss1d-linear")
    fine, coarse = O.sample_optimal_coupled(p, 4000, 40, make_gen(7))
    d = coarse.x - fine.x
    disc_f = O.discrete_gaussian_objective(p, TimeGrid.uniform(1.0, 40))
    disc_c = O.discrete_gaussian_objective(p, TimeGrid.uniform(1.0, 20))
    # coupling: the difference is far less noisy than either run, and its mean is the exact discrete difference
    assert float(d.std()) < 0.3 * float(fine.x.std())
    assert abs(float(d.mean()) - float(disc_c.mean[0] - disc_f.mean[0])) <= Z * float(d.std()) / math.sqrt(4000)
    with pytest.raises(ValueError, match="even"):
        O.sample_optimal_coupled(p, 10, 41)
