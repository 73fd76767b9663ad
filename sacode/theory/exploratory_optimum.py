"""Closed-form optimum of fine-tuning through the probability-flow ODE with explicit exploration (chapter 10).

A deterministic sampler has no transition density, so its path KL is infinite. Add Gaussian exploration to the
state, dX = b(t, X, a) dt + sigma_e dB with the PF-ODE drift b = -f + g^2 a / 2: the "pretrained" process is then
dX = (A(t) X + c(t)) dt + sigma_e dB on 1-D Gaussian data (the exact score is affine), a score correction u shifts
the drift by v = g^2 u / 2, and Girsanov gives the regulariser E int v^2 / (2 sigma_e^2) dt. For r(x) = w x,

    X_T | X_t = x ~ N(Phi(T, t) x + psi(t), Sigma(t)),  Phi(T, t) = exp int_t^T A,
    psi(t) = int_t^T Phi(T, u) c(u) du,  Sigma(t) = sigma_e^2 int_t^T Phi(T, u)^2 du,
    V*(t, x) = w (Phi x + psi) + w^2 Sigma(t) / (2 beta),   v* = sigma_e^2 w Phi(T, t) / beta,

so from X_0 ~ N(0, p^2): optimal terminal mean psi(0) + w Sigma(0)/beta, variance p^2 Phi(T,0)^2 + Sigma(0)
(unchanged by the control), and J* = w psi(0) + w^2 Sigma(0) / (2 beta).
"""
from __future__ import annotations

import math

from scipy.integrate import quad

from .affine_policy import AffineScoreFamily
from .rewards import LinearReward


def exploratory_optimum(preset, sigma_e: float) -> dict:
    """Closed-form optimum of the exploratory PF-ODE problem (module docstring): terminal mean and variance, J*, the
    path KL and the pretrained terminal mean, for 1-D Gaussian data with a linear reward."""
    if not isinstance(preset.reward, LinearReward) or preset.data.d != 1 or preset.data.K != 1:
        raise ValueError("the exploratory PF-ODE optimum is implemented for 1-D Gaussian data with a linear reward")
    sde, T, beta = preset.sde, preset.sde.T, preset.beta
    w = float(preset.reward.w[0])
    family = AffineScoreFamily.from_preset(preset)
    zero = family.as_numpy(family.zeros())

    def coeffs(t):
        """A(t), c(t): the pretrained PF-ODE drift A x + c (the eta = 0 member of the affine family, chapter 6)."""
        A, c, *_ = family.drift_coefficients(t, zero, eta=0.0)
        return A, c

    opts = dict(epsabs=1e-12, epsrel=1e-12, limit=200)
    intA = lambda t0, t1: quad(lambda u: coeffs(u)[0], t0, t1, **opts)[0]
    Phi = lambda t: math.exp(intA(t, T))
    psi0 = quad(lambda u: Phi(u) * coeffs(u)[1], 0, T, **opts)[0]
    Sig0 = sigma_e**2 * quad(lambda u: Phi(u) ** 2, 0, T, **opts)[0]
    p2 = sde.prior_std() ** 2
    return {"mean": [psi0 + w * Sig0 / beta], "var": [p2 * Phi(0.0) ** 2 + Sig0],
            "J": w * psi0 + w * w * Sig0 / (2 * beta), "kl": w * w * Sig0 / (2 * beta**2),
            "pretrained_mean": psi0, "sigma_e": sigma_e}
