"""Checks of the SDE layer (chapters 1-2): marginals, reverse dynamics, convergence orders, DSM minimum.

Monte-Carlo rows compare a simulation with the exact law of the *same* discrete chain (Euler-Maruyama moment
recursion, :func:`propagate_gaussian`) at Z standard errors; whether that chain discretises the right closed form
is checked separately, without Monte Carlo, by Richardson extrapolation of the exact chain laws
(:mod:`sacode.verify.convergence`) and by the fitted weak orders.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torchsde

from ..theory.data import Gaussian, ring_mixture
from ..theory.dsm import dsm_loss_per_sample, dsm_minimum_gaussian
from ..theory.exact_laws import pf_ode_terminal_law, reverse_sde_terminal_law
from ..dynamics.grid import TimeGrid
from ..dynamics.samplers import STOCHASTIC, get_step, propagate_gaussian, reverse_sde_sample
from ..dynamics.sde import OUSDE, VESDE, VPSDE, LinearSDE
from . import Z, CheckResult, check
from .convergence import fitted_order, richardson_check

DATA_1D = Gaussian.scalar(0.5, 0.8)          # the toy presets' data law N(0.5, 0.8^2)
_F64 = torch.float64

FORWARD_SDES = {"vp": (VPSDE, (0.1, 20.0)), "ve": (VESDE, (0.01, 10.0)), "ou": (OUSDE, (1.0, math.sqrt(2.0), 5.0))}
N_FORWARD, K_FORWARD = 40_000, 1000           # torchsde Euler: samples and steps on [0, T/2]
N_REVERSE = 40_000
REVERSE_CASES = [("sde-em", "em", 500, 1.0), ("pf-heun", "pf-heun", 100, 2.0)]   # label, method, K, weak order
MIXTURE_CASES = [("sde-em", "em", 500), ("pf-heun", "pf-heun", 200)]


def _var_se(x: torch.Tensor) -> float:
    """Standard error of the sample variance: sqrt((m4 - v^2) / n)."""
    c = x - x.mean()
    return float(torch.sqrt(((c**4).mean() - (c**2).mean() ** 2) / x.numel()))


def _se(x: torch.Tensor) -> float:
    return float(x.std()) / math.sqrt(x.numel())


def forward_em_law(sde: LinearSDE, m0: float, v0: float, s_end: float, n_steps: int) -> tuple[float, float]:
    """Exact mean and variance of the forward Euler-Maruyama chain x' = (1 + f h) x + g sqrt(h) z on [0, s_end]
    from N(m0, v0) (linear, so a moment recursion)."""
    h = s_end / n_steps
    s = torch.arange(n_steps, dtype=_F64) * h
    a, q = (1.0 + sde.f_coef(s) * h).tolist(), (sde.g2(s) * h).tolist()
    m, v = m0, v0
    for ak, qk in zip(a, q):
        m, v = ak * m, ak * ak * v + qk
    return m, v


@lru_cache(maxsize=None)
def _forward_samples(name: str) -> torch.Tensor:
    """torchsde Euler samples of X_{T/2} from N(0.5, 0.8^2) (seeded data and Brownian motion)."""
    cls, args = FORWARD_SDES[name]
    sde = cls(*args)
    x0 = DATA_1D.sample(N_FORWARD, torch.Generator().manual_seed(1))[:, None]
    s_end = 0.5 * sde.T
    bm = torchsde.BrownianInterval(0.0, s_end, size=(N_FORWARD, 1), dtype=_F64, entropy=2)
    ts = torch.tensor([0.0, s_end], dtype=_F64)
    return torchsde.sdeint(sde.torchsde(), x0, ts, method="euler", dt=s_end / K_FORWARD, bm=bm)[-1, :, 0]


@check("forward-marginal")
def forward_marginals():
    """dX = f X ds + g dW from N(0.5, 0.8^2) to s = T/2 for the VP, VE and OU SDEs.

    Monte Carlo: torchsde's Euler scheme (dt = T/2000, seeded Brownian interval) against the exact law of the same
    Euler chain. Order: Richardson extrapolation of the exact chain laws (K = 1000, 2000, 4000) must land on the
    transition kernel alpha m0, alpha^2 s0^2 + sigma^2.
    """
    out = []
    for name, (cls, args) in FORWARD_SDES.items():
        sde = cls(*args)
        s_end = 0.5 * sde.T
        xs = _forward_samples(name)
        st = torch.tensor(s_end, dtype=_F64)
        a, sg = float(sde.alpha(st)), float(sde.sigma(st))
        mean_cf, var_cf = a * 0.5, a * a * 0.64 + sg * sg
        m_em, v_em = forward_em_law(sde, 0.5, 0.64, s_end, K_FORWARD)
        note = f"s={s_end:g}, n={N_FORWARD}, K={K_FORWARD}: torchsde vs the exact Euler chain"
        out.append(CheckResult.monte_carlo(f"forward-marginal/{name}/mean", xs.mean(), m_em, _se(xs), note))
        out.append(CheckResult.monte_carlo(f"forward-marginal/{name}/var", xs.var(), v_em, _var_se(xs), note))
        Ks = [K_FORWARD, 2 * K_FORWARD, 4 * K_FORWARD]
        laws = [forward_em_law(sde, 0.5, 0.64, s_end, K) for K in Ks]
        out.append(richardson_check(f"forward-marginal/{name}/mean/richardson", Ks, [m for m, _ in laws], mean_cf, 1.0,
                                    "kernel mean alpha(s) m0"))
        out.append(richardson_check(f"forward-marginal/{name}/var/richardson", Ks, [v for _, v in laws], var_cf, 1.0,
                                    "kernel variance alpha^2 s0^2 + sigma^2"))
    return out


def _gauss_score(sde: LinearSDE):
    return lambda s, y: DATA_1D.score(sde, s, y[:, 0])[:, None]


@lru_cache(maxsize=None)
def _exact_discrete_law(b_max: float, method: str, K: int) -> tuple[float, float]:
    """Mean and variance of the discrete sampler's exact terminal law (VP(0.1, b_max), exact score of N(0.5, 0.8^2),
    from N(0, 1))."""
    sde = VPSDE(0.1, b_max)
    m, C = propagate_gaussian(sde, _gauss_score(sde), TimeGrid.uniform(sde.T, K), torch.zeros(1, dtype=_F64),
                              torch.eye(1, dtype=_F64), method)
    return float(m[0]), float(C[0, 0])


@lru_cache(maxsize=None)
def _reverse_samples(method: str, K: int) -> torch.Tensor:
    sde = VPSDE(0.1, 20.0)
    gen = torch.Generator().manual_seed(3)
    return reverse_sde_sample(sde, DATA_1D.score_fn(sde), sde.prior_sample((N_REVERSE,), gen),
                              TimeGrid.uniform(sde.T, K), method, generator=gen).x


@check("reverse-gauss")
def reverse_gaussian():
    """Reverse SDE (EM, K=500) and PF-ODE (Heun, K=100) with the exact score of N(0.5, 0.8^2), from N(0, 1).

    Monte Carlo against the exact law of the same discrete sampler (propagate_gaussian); Richardson extrapolation of
    the exact discrete laws (K, 2K, 4K; order 1 for EM, 2 for Heun) against the continuous terminal laws of
    ``exact_laws`` (reverse SDE and PF-ODE started from N(0, 1)).
    """
    sde = VPSDE(0.1, 20.0)
    out = []
    laws = {"em": reverse_sde_terminal_law, "pf-heun": pf_ode_terminal_law}
    for label, method, K, order in REVERSE_CASES:
        x = _reverse_samples(method, K)
        m_d, v_d = _exact_discrete_law(sde.b_max, method, K)
        note = f"K={K}, n={N_REVERSE}: sampler vs the exact law of the same discrete chain"
        out.append(CheckResult.monte_carlo(f"reverse-gauss/{label}/mean", x.mean(), m_d, _se(x), note))
        out.append(CheckResult.monte_carlo(f"reverse-gauss/{label}/var", x.var(), v_d, _var_se(x), note))
        m_cf, c_cf = laws[method](DATA_1D, sde)
        Ks = [K, 2 * K, 4 * K]
        disc = [_exact_discrete_law(sde.b_max, method, k) for k in Ks]
        out.append(richardson_check(f"reverse-gauss/{label}/mean/richardson", Ks, [m for m, _ in disc],
                                    float(m_cf[0]), order, "continuous terminal mean from N(0, 1)"))
        out.append(richardson_check(f"reverse-gauss/{label}/var/richardson", Ks, [v for _, v in disc],
                                    float(c_cf[0, 0]), order, "continuous terminal variance from N(0, 1)"))
    return out


@lru_cache(maxsize=None)
def _mixture_pair(method: str, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Terminal samples with K and K/2 steps from the same prior draw and the same Brownian path (coupled: each
    coarse step takes the sum of the two fine steps' noises, (z1 + z2)/sqrt(2))."""
    sde, data = VPSDE(0.1, 20.0), ring_mixture()
    score, step = data.score_fn(sde), get_step(method)
    gen = torch.Generator().manual_seed(4)
    fine = sde.prior_sample((N_REVERSE, 2), gen)
    coarse = fine.clone()
    s = TimeGrid.uniform(sde.T, K).s
    noisy = STOCHASTIC[method]
    for j in range(K // 2):
        z = [torch.randn(fine.shape, generator=gen, dtype=_F64) if noisy else None for _ in range(2)]
        fine = step(sde, score, fine, s[2 * j], s[2 * j + 1], z[0]).x_next
        fine = step(sde, score, fine, s[2 * j + 1], s[2 * j + 2], z[1]).x_next
        zc = (z[0] + z[1]) / math.sqrt(2.0) if noisy else None
        coarse = step(sde, score, coarse, s[2 * j], s[2 * j + 2], zc).x_next
    return fine, coarse


def _mixture_statistics(x: torch.Tensor, data) -> torch.Tensor:
    """Per-sample statistics (n, 8 + 2 + 4): mode indicators, coordinates, centred products."""
    oh = torch.nn.functional.one_hot(data.nearest_component(x), data.K).double()
    xc = x - x.mean(0)
    return torch.cat([oh, x, (xc[:, :, None] * xc[:, None, :]).reshape(x.shape[0], -1)], 1)


@check("reverse-mixture")
def reverse_mixture():
    """8-mode ring: the exact-score reverse SDE and PF-ODE reproduce the data law: the mode weights (1/8 each,
    nearest mode), the mean and the covariance; each row reports the component furthest from its closed form in
    units of its SE, so it passes exactly when every component is within Z SE.

    No exact discrete law exists here, so the sampler runs at a K where the discretisation bias is below one
    standard error, and a row says so: a K/2-step run on the same Brownian path (coupled) bounds the bias of each
    statistic by |mean(coarse - fine)| + Z SE(coarse - fine) (weak order >= 1), and that bound must stay below one
    SE of the statistic. The prior N(0, I) equals p_T up to alpha_T^2 = e^{-10.05} ~ 4e-5 in every moment.
    """
    data = ring_mixture()
    n = N_REVERSE
    out = []
    for label, method, K in MIXTURE_CASES:
        x, xc = _mixture_pair(method, K)
        note = f"K={K}, n={n}"
        w = torch.bincount(data.nearest_component(x), minlength=data.K).double() / n
        se_w = torch.sqrt(data.weights * (1 - data.weights) / n)
        k = int(torch.argmax((w - data.weights).abs() / se_w))
        out.append(CheckResult.monte_carlo(f"reverse-mixture/{label}/w", w[k], data.weights[k], float(se_w[k]),
                                           note + f"; mode {k}, the weight furthest from its closed form in SE units"))
        se_m = x.std(0) / math.sqrt(n)
        i = int(torch.argmax((x.mean(0) - data.mean()).abs() / se_m))
        out.append(CheckResult.monte_carlo(f"reverse-mixture/{label}/mean", x.mean(0)[i], data.mean()[i],
                                           float(se_m[i]), note + f"; coordinate {i}, the one furthest in SE units"))
        cov, cov_cf = torch.cov(x.T).reshape(-1), data.cov().reshape(-1)
        xm = x - x.mean(0)
        se_c = (xm[:, :, None] * xm[:, None, :]).reshape(n, -1).std(0) / math.sqrt(n)
        j = int(torch.argmax((cov - cov_cf).abs() / se_c))
        out.append(CheckResult.monte_carlo(f"reverse-mixture/{label}/cov", cov[j], cov_cf[j], float(se_c[j]),
                                           note + f"; entry {divmod(j, 2)}, the one furthest in SE units"))
        sf, sc = _mixture_statistics(x, data), _mixture_statistics(xc, data)
        d = sc - sf
        bound = d.mean(0).abs() + Z * d.std(0) / math.sqrt(n)
        ratio = float((bound / (sf.std(0) / math.sqrt(n))).max())
        out.append(CheckResult.compare(f"reverse-mixture/{label}/bias-bound/SE", ratio, 0.0, 1.0,
                                       f"{note}: max over weights, mean, cov entries of (|coupled K/2 - K| + Z SE) / "
                                       f"SE of the statistic", kind="order"))
    return out


@check("weak-order")
def weak_order():
    """Weak error of the variance vs K, exactly (propagate_gaussian), on gauss1d with VP(0.1, 2):

    Euler-Maruyama (reverse SDE) slope ~ 1, Heun (PF-ODE) slope ~ 2. Errors are measured against the exact
    continuous-time law from the same prior, so no Monte-Carlo error enters; tolerance 0.1 on the slope.
    """
    sde = VPSDE(0.1, 2.0)
    Ks = [20, 40, 80, 160, 320]
    out = []
    for label, method, law, p in [("em", "em", reverse_sde_terminal_law, 1.0),
                                  ("pf-heun", "pf-heun", pf_ode_terminal_law, 2.0),
                                  ("pf-euler", "pf-euler", pf_ode_terminal_law, 1.0)]:
        _, c_cf = law(DATA_1D, sde)
        errs = [_exact_discrete_law(sde.b_max, method, K)[1] - float(c_cf[0, 0]) for K in Ks]
        out.append(CheckResult.compare(f"weak-order/{label}", fitted_order(Ks, errs), p, 0.1,
                                       f"K={Ks[0]}..{Ks[-1]}, err {abs(errs[0]):.2e}->{abs(errs[-1]):.2e}",
                                       kind="order"))
    return out


@check("dsm-minimum")
def dsm_minimum():
    """The DSM loss of the exact score equals d - sigma^2 tr Sigma_s^{-1} at each noise level (2-D Gaussian)."""
    sde = VPSDE(0.1, 20.0)
    data = Gaussian(torch.tensor([0.5, -1.0]), torch.tensor([[0.64, 0.3], [0.3, 0.5]]))
    n = 100_000
    out = []
    for s in [0.02, 0.1, 0.3, 1.0]:
        gen = torch.Generator().manual_seed(5)
        x0 = data.sample(n, gen)
        z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        losses = dsm_loss_per_sample(data.score_fn(sde), sde, x0, torch.tensor(s, dtype=torch.float64), z)
        cf = float(dsm_minimum_gaussian(data, sde, torch.tensor(s, dtype=torch.float64)))
        out.append(CheckResult.monte_carlo(f"dsm-minimum/s={s:g}", losses.mean(), cf,
                                           float(losses.std()) / math.sqrt(n), f"n={n}, exact score"))
    return out
