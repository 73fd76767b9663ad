"""Forward SDEs in diffusion time s, their Gaussian marginals, and the reverse-time dynamics.

All three SDEs here are *linear*: dX_s = f(s) X_s ds + g(s) dW_s with a scalar drift
coefficient f(s). Their transition from the data is Gaussian,

    X_s | X_0 = x0  ~  N(alpha(s) x0, sigma(s)^2 I),      alpha(s) = exp(int_0^s f),
                                                          sigma(s)^2 = int_0^s alpha(s)^2/alpha(u)^2 g(u)^2 du,

which is all the closed forms of :mod:`sacode.theory.data` need.

The reverse-time dynamics in RL time t = T - s (Anderson 1982; Song et al. 2021, eq. 6 and 13) is

    dX_t = [-f(s, X_t) + (1 + eta^2)/2 g(s)^2 score(s, X_t)] dt + eta g(s) dB_t,   s = T - t,

eta = 1 the reverse SDE, eta = 0 the probability-flow ODE; chapter 1.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from .shapes import as_time, expand_time
from .time import diffusion_time

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""A score function ``score(s, x)``: s of shape (n,), x of shape (n, *event) -> like x."""


class LinearSDE(ABC):
    """dX = f(s) X ds + g(s) dW on s in [0, T], with a Gaussian transition kernel."""

    T: float = 1.0

    # --- coefficients -------------------------------------------------------------------------
    @abstractmethod
    def f_coef(self, s: Tensor) -> Tensor:
        """Drift coefficient f(s) with drift(s, x) = f(s) x."""

    @abstractmethod
    def g(self, s: Tensor) -> Tensor:
        """Diffusion coefficient g(s)."""

    @abstractmethod
    def alpha(self, s: Tensor) -> Tensor:
        """Mean coefficient alpha(s) = exp(int_0^s f) of X_s | X_0."""

    @abstractmethod
    def sigma(self, s: Tensor) -> Tensor:
        """Standard deviation sigma(s) of X_s | X_0."""

    @abstractmethod
    def int_g2(self, s0: Tensor, s1: Tensor) -> Tensor:
        """int_{s0}^{s1} g(u)^2 du (the Girsanov weight of a step, chapter 4)."""

    def g2(self, s: Tensor) -> Tensor:
        return self.g(s) ** 2

    # --- shape-agnostic drift and marginals -----------------------------------------------------
    def drift(self, s: float | Tensor, x: Tensor) -> Tensor:
        """f(s, x) = f(s) x."""
        return expand_time(self.f_coef(as_time(s, x)), x) * x

    def diffusion(self, s: float | Tensor, x: Tensor) -> Tensor:
        """g(s) broadcast against x (diagonal noise)."""
        return expand_time(self.g(as_time(s, x)), x).expand_as(x)

    def marginal_params(self, s: float | Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Mean alpha(s) x0 and std sigma(s) of X_s | X_0 = x0, broadcast against x0."""
        s = as_time(s, x0)
        return expand_time(self.alpha(s), x0) * x0, expand_time(self.sigma(s), x0)

    def marginal_sample(self, s: float | Tensor, x0: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw X_s = alpha(s) x0 + sigma(s) z."""
        mean, std = self.marginal_params(s, x0)
        z = torch.randn_like(x0) if noise is None else noise
        return mean + std * z

    def prior_std(self) -> float:
        """Std of the sampler's initial law N(0, prior_std^2 I) at s = T."""
        return float(self.sigma(torch.tensor(self.T, dtype=torch.float64)))

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Tensor:
        return self.prior_std() * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    # --- reverse-time dynamics (RL time drift, evaluated at diffusion time s) ------------------
    def reverse_drift(self, s: float | Tensor, x: Tensor, score: Tensor, eta: float = 1.0) -> Tensor:
        """-f(s, x) + (1 + eta^2)/2 g(s)^2 score: the drift in RL time of the eta-family."""
        s = as_time(s, x)
        return -self.drift(s, x) + 0.5 * (1.0 + eta**2) * expand_time(self.g2(s), x) * score

    def pf_ode_drift(self, s: float | Tensor, x: Tensor, score: Tensor) -> Tensor:
        """Probability-flow ODE drift in RL time, -f + g^2 score / 2 (eta = 0)."""
        return self.reverse_drift(s, x, score, eta=0.0)

    def reverse(self, score_fn: ScoreFn, eta: float = 1.0) -> "ReverseSDE":
        """The reverse-time SDE (eta = 1) or the probability-flow ODE (eta = 0) built from a score."""
        return ReverseSDE(self, score_fn, eta)

    def torchsde(self) -> "TorchsdeForward":
        """This forward SDE in torchsde's f/g protocol (time = diffusion time s)."""
        return TorchsdeForward(self)

    def _t(self, s: float | Tensor) -> Tensor:
        return torch.as_tensor(s, dtype=torch.float64)


class VPSDE(LinearSDE):
    """Variance preserving SDE: dX = -b(s)/2 X ds + sqrt(b(s)) dW with linear b(s).

    b(s) = b_min + (b_max - b_min) s / T; alpha(s) = exp(-B(s)/2), B(s) = int_0^s b;
    sigma(s)^2 = 1 - alpha(s)^2 (Song et al. 2021, eq. 29 and 33).
    """

    def __init__(self, b_min: float = 0.1, b_max: float = 20.0, T: float = 1.0):
        if not (b_min > 0 and b_max >= b_min and T > 0):
            raise ValueError(f"VPSDE needs 0 < b_min <= b_max and T > 0; got b_min={b_min}, b_max={b_max}, T={T}")
        self.b_min, self.b_max, self.T = float(b_min), float(b_max), float(T)

    def b(self, s: Tensor) -> Tensor:
        """Noise rate b(s) (the paper's beta(s), renamed here so as not to clash with the KL weight)."""
        return self.b_min + (self.b_max - self.b_min) * s / self.T

    def B(self, s: Tensor) -> Tensor:
        """Integrated noise rate B(s) = int_0^s b."""
        return self.b_min * s + 0.5 * (self.b_max - self.b_min) * s**2 / self.T

    def f_coef(self, s):
        return -0.5 * self.b(s)

    def g(self, s):
        return torch.sqrt(self.b(s))

    def g2(self, s):
        return self.b(s)

    def alpha(self, s):
        return torch.exp(-0.5 * self.B(s))

    def sigma(self, s):
        return torch.sqrt(-torch.expm1(-self.B(s)))

    def alpha_bar(self, s: Tensor) -> Tensor:
        """alpha_bar(s) = alpha(s)^2, the DDPM cumulative product in continuous time."""
        return torch.exp(-self.B(s))

    def int_g2(self, s0, s1):
        return self.B(s1) - self.B(s0)

    def prior_std(self) -> float:
        return 1.0

    def __repr__(self):
        return f"VPSDE(b_min={self.b_min}, b_max={self.b_max}, T={self.T})"


class VESDE(LinearSDE):
    """Variance exploding SDE with geometric noise level sigma_n(s) = sigma_min (sigma_max/sigma_min)^(s/T).

    dX = sqrt(d sigma_n^2/ds) dW, so g(s)^2 = 2 sigma_n(s)^2 log(sigma_max/sigma_min) / T, alpha = 1 and the
    exact transition variance is sigma(s)^2 = sigma_n(s)^2 - sigma_min^2 (Song et al. 2021, eq. 30).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0, T: float = 1.0):
        if not (0 < sigma_min < sigma_max and T > 0):
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max and T > 0; got {sigma_min}, {sigma_max}, {T}")
        self.sigma_min, self.sigma_max, self.T = float(sigma_min), float(sigma_max), float(T)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def noise_level(self, s: Tensor) -> Tensor:
        """sigma_n(s) = sigma_min (sigma_max / sigma_min)^(s/T)."""
        return self.sigma_min * torch.exp(self._log_ratio * s / self.T)

    def f_coef(self, s):
        return torch.zeros_like(s)

    def g2(self, s):
        return 2.0 * self.noise_level(s) ** 2 * self._log_ratio / self.T

    def g(self, s):
        return torch.sqrt(self.g2(s))

    def alpha(self, s):
        return torch.ones_like(s)

    def sigma(self, s):
        return torch.sqrt(self.noise_level(s) ** 2 - self.sigma_min**2)

    def int_g2(self, s0, s1):
        return self.noise_level(s1) ** 2 - self.noise_level(s0) ** 2

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T})"


class OUSDE(LinearSDE):
    """Ornstein-Uhlenbeck SDE with constant coefficients: dX = -theta X ds + sigma0 dW.

    alpha(s) = exp(-theta s), sigma(s)^2 = sigma0^2 (1 - exp(-2 theta s)) / (2 theta); the stationary law
    N(0, sigma0^2 / (2 theta)) is the sampler's prior.
    """

    def __init__(self, theta: float = 1.0, sigma0: float = math.sqrt(2.0), T: float = 5.0):
        if not (theta > 0 and sigma0 > 0 and T > 0):
            raise ValueError(f"OUSDE needs theta, sigma0, T > 0; got {theta}, {sigma0}, {T}")
        self.theta, self.sigma0, self.T = float(theta), float(sigma0), float(T)

    def f_coef(self, s):
        return torch.full_like(s, -self.theta)

    def g(self, s):
        return torch.full_like(s, self.sigma0)

    def alpha(self, s):
        return torch.exp(-self.theta * s)

    def sigma(self, s):
        return self.sigma0 * torch.sqrt(-torch.expm1(-2.0 * self.theta * s) / (2.0 * self.theta))

    def int_g2(self, s0, s1):
        return self.sigma0**2 * (s1 - s0)

    def prior_std(self) -> float:
        return self.sigma0 / math.sqrt(2.0 * self.theta)

    def __repr__(self):
        return f"OUSDE(theta={self.theta}, sigma0={self.sigma0}, T={self.T})"


class ReverseSDE:
    """The reverse-time dynamics of ``sde`` driven by ``score_fn``, in RL time t = T - s.

    eta = 1 gives the reverse SDE, eta = 0 the probability-flow ODE, 0 < eta < 1 the generalised DDIM family
    dX = [-f + (1 + eta^2)/2 g^2 score] dt + eta g dB (chapter 1). ``f(t, y)`` and ``g(t, y)``
    follow torchsde's protocol (diagonal Ito noise, y of shape (n, d)), so ``torchsde.sdeint`` integrates it.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: LinearSDE, score_fn: ScoreFn, eta: float = 1.0):
        self.sde, self.score_fn, self.eta = sde, score_fn, float(eta)

    def drift(self, t: float | Tensor, x: Tensor) -> Tensor:
        s = as_time(diffusion_time(torch.as_tensor(t, dtype=x.dtype), self.sde.T), x)
        return self.sde.reverse_drift(s, x, self.score_fn(s, x), self.eta)

    def diffusion(self, t: float | Tensor, x: Tensor) -> Tensor:
        s = as_time(diffusion_time(torch.as_tensor(t, dtype=x.dtype), self.sde.T), x)
        return self.eta * self.sde.diffusion(s, x)

    # torchsde protocol
    def f(self, t: Tensor, y: Tensor) -> Tensor:
        return self.drift(t, y)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        return self.diffusion(t, y)


class TorchsdeForward:
    """A forward :class:`LinearSDE` in torchsde's f/g protocol; torchsde's time is diffusion time s."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: LinearSDE):
        self.sde = sde

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        return self.sde.drift(t.to(y.dtype), y)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        return self.sde.diffusion(t.to(y.dtype), y)
