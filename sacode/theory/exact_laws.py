"""Exact terminal laws of the *continuous-time* reverse dynamics started from the sampler's prior.

Samplers start from N(0, p^2 I) with p = ``sde.prior_std()``, not from p_T. For Gaussian data
N(m, C) under a linear SDE with Sigma_T = alpha_T^2 C + sigma_T^2 I:

* Reverse SDE with the exact score. Given X^rev_0 = y the reversal is the forward bridge, so X^rev_T | y
  is the posterior X_0 | X_T = y. Averaging over y ~ N(0, p^2 I) (law of total variance):
      mean = m - alpha_T C Sigma_T^{-1} alpha_T m,
      cov  = C - alpha_T^2 C Sigma_T^{-1} C + p^2 alpha_T^2 C Sigma_T^{-2} C.
* Probability-flow ODE with the exact score. The flow is the linear map
      x_0 = m + Sigma_0^{1/2} Sigma_T^{-1/2} (y - alpha_T m)   (Sigma_0 = C),
  so mean = m - C^{1/2} Sigma_T^{-1/2} alpha_T m and cov = p^2 C Sigma_T^{-1}.

Both equal N(m, C) when the prior is p_T; the gap is the "fixed initial law" effect of chapter 5.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .data import Gaussian
from ..dynamics.sde import LinearSDE


def _noised_eig(data: Gaussian, sde: LinearSDE):
    T = torch.tensor(sde.T, dtype=torch.float64)
    a, sg = float(sde.alpha(T)), float(sde.sigma(T))
    lam, U = data.lam[0], data.U[0]
    return a, lam, U, a**2 * lam + sg**2


def reverse_sde_terminal_law(data: Gaussian, sde: LinearSDE) -> tuple[Tensor, Tensor]:
    """Mean (d,) and covariance (d, d) of X^rev_T for the exact-score reverse SDE from N(0, p^2 I)."""
    a, lam, U, v = _noised_eig(data, sde)
    p2 = sde.prior_std() ** 2
    m = data.means[0]
    mean = m - U @ (a**2 * lam / v * (U.T @ m))
    var_eig = lam - a**2 * lam**2 / v + p2 * a**2 * lam**2 / v**2
    return mean, U @ torch.diag(var_eig) @ U.T


def pf_ode_terminal_law(data: Gaussian, sde: LinearSDE) -> tuple[Tensor, Tensor]:
    """Mean (d,) and covariance (d, d) of the exact probability-flow ODE started from N(0, p^2 I)."""
    a, lam, U, v = _noised_eig(data, sde)
    p2 = sde.prior_std() ** 2
    m = data.means[0]
    mean = m - U @ (torch.sqrt(lam / v) * a * (U.T @ m))
    return mean, U @ torch.diag(p2 * lam / v) @ U.T
