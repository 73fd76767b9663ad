"""Checks of the SDE layer (chapters 1-2): marginals, reverse dynamics, convergence orders, DSM minimum."""
from __future__ import annotations

import math

import numpy as np
import torch
import torchsde

from ..theory.data import Gaussian, ring_mixture
from ..theory.dsm import dsm_loss_per_sample, dsm_minimum_gaussian
from ..theory.exact_laws import pf_ode_terminal_law, reverse_sde_terminal_law
from ..dynamics.grid import TimeGrid
from ..dynamics.samplers import propagate_gaussian, reverse_sde_sample
from ..dynamics.sde import OUSDE, VESDE, VPSDE, LinearSDE
from . import Z, CheckResult, check

DATA_1D = Gaussian.scalar(0.5, 0.8)          # the toy presets' data law N(0.5, 0.8^2)


def _var_se(x: torch.Tensor) -> float:
    """Standard error of the sample variance: sqrt((m4 - v^2) / n)."""
    c = x - x.mean()
    return float(torch.sqrt(((c**4).mean() - (c**2).mean() ** 2) / x.numel()))


def _forward_em_law(sde: LinearSDE, m0: float, v0: float, s_end: float, n_steps: int) -> tuple[float, float]:
    """Exact mean and variance of the forward Euler-Maruyama chain (linear, so a moment recursion)."""
    m, v, h = m0, v0, s_end / n_steps
    for k in range(n_steps):
        s = torch.tensor(k * h, dtype=torch.float64)
        a = 1.0 + float(sde.f_coef(s)) * h
        m, v = a * m, a * a * v + float(sde.g2(s)) * h
    return m, v


@check("forward-marginal")
def forward_marginals():
    """Simulate dX = f X ds + g dW with torchsde (Euler, dt = 1e-3) from N(0.5, 0.8^2); compare to the kernel."""
    n, steps = 40_000, 1000
    out = []
    for name, sde in [("vp", VPSDE(0.1, 20.0)), ("ve", VESDE(0.01, 10.0)), ("ou", OUSDE(1.0, math.sqrt(2.0), 5.0))]:
        gen = torch.Generator().manual_seed(1)
        x0 = DATA_1D.sample(n, gen)[:, None]
        s_end = 0.5 * sde.T
        torch.manual_seed(2)
        ts = torch.tensor([0.0, s_end], dtype=torch.float64)
        xs = torchsde.sdeint(sde.torchsde(), x0, ts, method="euler", dt=s_end / steps)[-1, :, 0]
        st = torch.tensor(s_end, dtype=torch.float64)
        a, sg = float(sde.alpha(st)), float(sde.sigma(st))
        mean_cf, var_cf = a * 0.5, a * a * 0.64 + sg * sg
        m_em, v_em = _forward_em_law(sde, 0.5, 0.64, s_end, steps)     # discretisation bias, exactly
        se_m = float(xs.std()) / math.sqrt(n)
        out.append(CheckResult.compare(f"forward-marginal/{name}/mean", xs.mean(), mean_cf,
                                       Z * se_m + abs(m_em - mean_cf), f"s={s_end:g}, n={n}"))
        out.append(CheckResult.compare(f"forward-marginal/{name}/var", xs.var(), var_cf,
                                       Z * _var_se(xs) + abs(v_em - var_cf), f"s={s_end:g}, n={n}"))
    return out


@check("reverse-gauss")
def reverse_gaussian():
    """Reverse SDE (EM, K=500) and PF-ODE (Heun, K=100) with the exact score reproduce the exact terminal law."""
    sde, n = VPSDE(0.1, 20.0), 40_000
    out = []
    for label, method, K, law in [("sde-em", "em", 500, reverse_sde_terminal_law),
                                  ("pf-heun", "pf-heun", 100, pf_ode_terminal_law)]:
        gen = torch.Generator().manual_seed(3)
        grid = TimeGrid.uniform(sde.T, K)
        x = reverse_sde_sample(sde, DATA_1D.score_fn(sde), sde.prior_sample((n,), gen), grid, method,
                               generator=gen).x
        m_cf, c_cf = law(DATA_1D, sde)
        m_d, c_d = propagate_gaussian(sde, lambda s, y: DATA_1D.score(sde, s, y[:, 0])[:, None], grid,
                                      torch.zeros(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64), method)
        bias_m, bias_v = abs(float(m_d[0] - m_cf[0])), abs(float(c_d[0, 0] - c_cf[0, 0]))
        out.append(CheckResult.compare(f"reverse-gauss/{label}/mean", x.mean(), m_cf[0],
                                       Z * float(x.std()) / math.sqrt(n) + bias_m, f"K={K}, n={n}"))
        out.append(CheckResult.compare(f"reverse-gauss/{label}/var", x.var(), c_cf[0, 0],
                                       Z * _var_se(x) + bias_v, f"K={K}, n={n}"))
    return out


@check("reverse-mixture")
def reverse_mixture():
    """8-mode ring: the exact-score reverse SDE and PF-ODE put 1/8 of the mass on each mode; mean and covariance.

    alpha_T^2 = e^{-10.05} makes the prior N(0, I) equal p_T up to ~4e-5 in every moment, far below the MC error.
    """
    sde, n, data = VPSDE(0.1, 20.0), 40_000, ring_mixture()
    out = []
    for label, method, K in [("sde-em", "em", 500), ("pf-heun", "pf-heun", 200)]:
        gen = torch.Generator().manual_seed(4)
        x = reverse_sde_sample(sde, data.score_fn(sde), sde.prior_sample((n, 2), gen),
                               TimeGrid.uniform(sde.T, K), method, generator=gen).x
        w = torch.bincount(data.nearest_component(x), minlength=data.K).double() / n
        se_w = math.sqrt((1 / 8) * (7 / 8) / n)
        dev = (w - 1 / 8).abs().max()
        out.append(CheckResult.compare(f"reverse-mixture/{label}/max|w_k-1/8|", dev, 0.0,
                                       Z * se_w, f"K={K}, n={n}"))
        cov = torch.cov(x.T)
        cov_cf = data.cov()
        xc = x - x.mean(0)
        se_c = float((xc[:, :, None] * xc[:, None, :]).reshape(n, -1).std(0).max()) / math.sqrt(n)
        out.append(CheckResult.compare(f"reverse-mixture/{label}/|mean|", x.mean(0).norm(), 0.0,
                                       Z * float(x.std(0).max()) / math.sqrt(n) * math.sqrt(2), f"K={K}, n={n}"))
        out.append(CheckResult.compare(f"reverse-mixture/{label}/max|cov-C|", (cov - cov_cf).abs().max(), 0.0,
                                       Z * se_c, f"K={K}, n={n}"))
    return out


def _order(errors: list[float], Ks: list[int]) -> float:
    return float(-np.polyfit(np.log(Ks), np.log(errors), 1)[0])


@check("weak-order")
def weak_order():
    """Weak error of the variance vs K, exactly (propagate_gaussian), on gauss1d with VP(0.1, 2):

    Euler-Maruyama (reverse SDE) slope ~ 1, Heun (PF-ODE) slope ~ 2. Errors are measured against the exact
    continuous-time law from the same prior, so no Monte-Carlo error enters; tolerance 0.1 on the slope.
    """
    sde = VPSDE(0.1, 2.0)
    score = lambda s, y: DATA_1D.score(sde, s, y[:, 0])[:, None]
    Ks = [20, 40, 80, 160, 320]
    out = []
    for label, method, law, p in [("em", "em", reverse_sde_terminal_law, 1.0),
                                  ("pf-heun", "pf-heun", pf_ode_terminal_law, 2.0),
                                  ("pf-euler", "pf-euler", pf_ode_terminal_law, 1.0)]:
        _, c_cf = law(DATA_1D, sde)
        errs = []
        for K in Ks:
            _, c = propagate_gaussian(sde, score, TimeGrid.uniform(sde.T, K), torch.zeros(1, dtype=torch.float64),
                                      torch.eye(1, dtype=torch.float64), method)
            errs.append(abs(float(c[0, 0] - c_cf[0, 0])))
        out.append(CheckResult.compare(f"weak-order/{label}", _order(errs, Ks), p, 0.1,
                                       f"K={Ks[0]}..{Ks[-1]}, err {errs[0]:.2e}->{errs[-1]:.2e}"))
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
        out.append(CheckResult.compare(f"dsm-minimum/s={s:g}", losses.mean(), cf,
                                       Z * float(losses.std()) / math.sqrt(n), f"n={n}"))
    return out
