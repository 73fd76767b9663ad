"""Network parameterisations of the score, and the Tweedie denoiser: the one place they are converted.

For a linear SDE with X_s | X_0 ~ N(alpha(s) X_0, sigma(s)^2 I) (chapter 1):

* eps-prediction (Ho et al. 2020):  score(s, x) = -eps(s, x) / sigma(s);
* v-prediction (Salimans & Ho 2022): eps = alpha(s) v + sigma(s) x;
* Tweedie (Efron 2011, chapter 2):   E[X_0 | X_s = x] = (x + sigma(s)^2 score(s, x)) / alpha(s).

Times are diffusion times s (a scalar or shape (n,)); x, eps, v have shape (n, *event). The eps and v conversions
evaluate alpha(s) and sigma(s) in float64 (near the data end sigma(s) is small, and eps / sigma would amplify float32
rounding); Tweedie evaluates them in x's dtype.
"""
from __future__ import annotations

from torch import Tensor

from .sde import LinearSDE
from .shapes import as_time, expand_time


def _coef(fn, s, like: Tensor, float64: bool = False) -> Tensor:
    s = as_time(s, like)
    return expand_time(fn(s.double() if float64 else s).to(device=like.device, dtype=like.dtype), like)


def eps_to_score(sde: LinearSDE, s: float | Tensor, eps: Tensor) -> Tensor:
    """score = -eps / sigma(s)."""
    return -eps / _coef(sde.sigma, s, eps, float64=True)


def score_to_eps(sde: LinearSDE, s: float | Tensor, score: Tensor) -> Tensor:
    """eps = -sigma(s) score (the inverse of :func:`eps_to_score`)."""
    return -_coef(sde.sigma, s, score, float64=True) * score


def v_to_eps(sde: LinearSDE, s: float | Tensor, x: Tensor, v: Tensor) -> Tensor:
    """eps = alpha(s) v + sigma(s) x for a v-prediction model."""
    return _coef(sde.alpha, s, x, float64=True) * v + _coef(sde.sigma, s, x, float64=True) * x


def tweedie(sde: LinearSDE, s: float | Tensor, x: Tensor, score: Tensor) -> Tensor:
    """Tweedie denoiser x0_hat = (x + sigma(s)^2 score) / alpha(s) (any score, any environment)."""
    return (x + _coef(sde.sigma, s, x) ** 2 * score) / _coef(sde.alpha, s, x)
