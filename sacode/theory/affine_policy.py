"""The affine score-action policy family on the 1-D Gaussian toys (chapter 6).

On data N(m0, s0^2) the exact pretrained score is affine in x (chapter 5),

    s_pre(s, x) = -(x - alpha_s m0) / D_s,        D_s = alpha_s^2 s0^2 + sigma_s^2,

so the policy mean (the action = the fine-tuned score, in RL time t = T - s)

    mu_theta(t, x) = s_pre(T - t, x) + theta0(t) + theta1(t) x

keeps every law Gaussian. The time functions are an offset plus a hat-basis expansion,

    theta_i(t) = offset_i(t) + sum_j c_{ij} phi_j(t),      i = 0, 1,

with phi_j the piecewise-linear "hat" functions on increasing knots 0 = t_0 < ... < t_{n-1} = T (phi_j(t_l) =
delta_jl): c_{ij} is the value of the learned part of theta_i at knot j. The parameter vector is
theta = (c_{00}, ..., c_{0,n-1}, c_{10}, ..., c_{1,n-1}) of length 2n. Hats are local (a coefficient moves the
policy only near its knot), well conditioned, and make the ODEs piecewise smooth between knots, which is where
:mod:`sacode.theory.policy_eval` restarts its integrator. The offsets (default 0) let a closed-form policy such as the
optimal control of chapter 5 sit in the family exactly, with the basis as a perturbation around it.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .data import GaussianMixture
from .rewards import LinearReward, QuadraticReward
from ..dynamics.sde import LinearSDE, ScoreFn, VPSDE
from ..dynamics.time import diffusion_time, rl_time

TimeFn = Callable[[float | np.ndarray], float | np.ndarray]
"""A deterministic function of RL time t (float or numpy array in, same shape out), e.g. an offset theta_i(t)."""


# ------------------------------------------------------------------------------------------------
# the time basis
# ------------------------------------------------------------------------------------------------
class HatBasis:
    """Piecewise-linear hat functions on increasing knots t_0 = 0 < ... < t_{n-1} = T (RL time)."""

    def __init__(self, knots):
        k = np.asarray(knots, dtype=np.float64).reshape(-1)
        if k.size < 2 or not np.all(np.diff(k) > 0):
            raise ValueError(f"HatBasis needs at least 2 strictly increasing knots; got {k.tolist()}")
        self.knots = k
        self._list = k.tolist()

    @classmethod
    def uniform(cls, T: float, n: int) -> "HatBasis":
        """n equally spaced knots on [0, T]."""
        if n < 2:
            raise ValueError(f"a hat basis needs n >= 2 knots; got {n}")
        return cls(np.linspace(0.0, T, n))

    @property
    def n(self) -> int:
        return self.knots.size

    def interp(self, t: float, coefs) -> float:
        """sum_j coefs[j] phi_j(t) for a scalar t (fast path used inside the ODE right-hand sides)."""
        k = self._list
        if t <= k[0]:
            return float(coefs[0])
        if t >= k[-1]:
            return float(coefs[-1])
        j = bisect.bisect_right(k, t) - 1
        w = (t - k[j]) / (k[j + 1] - k[j])
        return float((1.0 - w) * coefs[j] + w * coefs[j + 1])

    def vector(self, t: float) -> np.ndarray:
        """(phi_0(t), ..., phi_{n-1}(t)) for a scalar t (at most two non-zero entries)."""
        out = np.zeros(self.n)
        k = self._list
        if t <= k[0]:
            out[0] = 1.0
        elif t >= k[-1]:
            out[-1] = 1.0
        else:
            j = bisect.bisect_right(k, t) - 1
            w = (t - k[j]) / (k[j + 1] - k[j])
            out[j], out[j + 1] = 1.0 - w, w
        return out

    def __call__(self, t) -> Tensor | np.ndarray:
        """phi_j(t) for every j: t of shape (m,) -> (m, n); torch in -> torch out (float64), numpy otherwise."""
        as_torch = isinstance(t, Tensor)
        tt = (t.detach().cpu().numpy() if as_torch else np.asarray(t, dtype=np.float64)).reshape(-1)
        eye = np.eye(self.n)
        phi = np.stack([np.interp(tt, self.knots, eye[j]) for j in range(self.n)], axis=1)
        return torch.as_tensor(phi, dtype=t.dtype if t.is_floating_point() else torch.float64,
                               device=t.device) if as_torch else phi

    def __repr__(self):
        return f"HatBasis(knots={np.round(self.knots, 4).tolist()})"


# ------------------------------------------------------------------------------------------------
# fast scalar coefficients of the SDE, in RL time
# ------------------------------------------------------------------------------------------------
class ScalarSchedule:
    """Python-float coefficients of a :class:`LinearSDE` at RL time t (s = T - t), for ODE right-hand sides.

    VPSDE uses closed forms (b, B, alpha = e^{-B/2}, sigma^2 = 1 - e^{-B}); any other LinearSDE falls back to
    evaluating the torch methods on a 0-d float64 tensor (correct, slower).
    """

    def __init__(self, sde: LinearSDE):
        self.sde, self.T = sde, float(sde.T)
        self._vp = type(sde) is VPSDE

    def _s(self, t: float) -> float:
        return float(diffusion_time(t, self.T))

    def coefs(self, t: float) -> tuple[float, float, float, float]:
        """(f(s), g(s)^2, alpha(s), sigma(s)^2) at s = T - t."""
        s = self._s(t)
        if self._vp:
            sde = self.sde
            b = sde.b_min + (sde.b_max - sde.b_min) * s / sde.T
            B = sde.b_min * s + 0.5 * (sde.b_max - sde.b_min) * s * s / sde.T
            return -0.5 * b, b, math.exp(-0.5 * B), -math.expm1(-B)
        st = torch.tensor(s, dtype=torch.float64)
        return (float(self.sde.f_coef(st)), float(self.sde.g2(st)), float(self.sde.alpha(st)),
                float(self.sde.sigma(st)) ** 2)


# ------------------------------------------------------------------------------------------------
# rewards as quadratic polynomials
# ------------------------------------------------------------------------------------------------
def reward_coefficients(reward) -> tuple[float, float, float]:
    """(r2, r1, r0) with r(x) = r2 x^2 + r1 x + r0 for a 1-D LinearReward or QuadraticReward."""
    if isinstance(reward, LinearReward):
        if reward.w.numel() != 1:
            raise ValueError(f"the affine toy is 1-D; got a LinearReward with {reward.w.numel()} weights")
        return 0.0, float(reward.w[0]), 0.0
    if isinstance(reward, QuadraticReward):
        if reward.center.numel() != 1:
            raise ValueError(f"the affine toy is 1-D; got a QuadraticReward centred in {reward.center.numel()}-D")
        lam, c = reward.lam, float(reward.center[0])
        return -0.5 * lam, lam * c, -0.5 * lam * c * c
    raise TypeError(f"closed forms need a LinearReward or QuadraticReward (a quadratic polynomial); got "
                    f"{type(reward).__name__}")


# ------------------------------------------------------------------------------------------------
# the family
# ------------------------------------------------------------------------------------------------
class AffineScoreFamily:
    """mu_theta(t, x) = s_pre(T - t, x) + theta0(t) + theta1(t) x on 1-D Gaussian data N(m0, s0^2).

    Args:
        sde: the forward SDE (any :class:`LinearSDE`; VPSDE has a fast path).
        m0, s0: mean and std of the data law (the pretrained score is its exact noised score).
        basis: the time basis of the learned part (default: 5 uniform hat knots on [0, T]).
        offset0, offset1: fixed functions of RL time added to theta0, theta1 (default 0), e.g. the optimum.

    ``theta`` is a vector of length ``n_params = 2 * basis.n`` (torch or numpy). x has shape (n,) or (n, 1).
    """

    def __init__(self, sde: LinearSDE, m0: float, s0: float, basis: HatBasis | None = None,
                 offset0: TimeFn | None = None, offset1: TimeFn | None = None):
        if s0 <= 0:
            raise ValueError(f"the data std s0 must be positive; got {s0}")
        self.sde, self.m0, self.s0 = sde, float(m0), float(s0)
        self.T = float(sde.T)
        self.basis = basis if basis is not None else HatBasis.uniform(self.T, 5)
        if abs(self.basis.knots[0]) > 1e-12 or abs(self.basis.knots[-1] - self.T) > 1e-12:
            raise ValueError(f"the basis knots must span [0, T={self.T}]; got {self.basis}")
        self.offset0, self.offset1 = offset0, offset1
        self.schedule = ScalarSchedule(sde)

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_data(cls, sde: LinearSDE, data: GaussianMixture, **kw) -> "AffineScoreFamily":
        """The family on a 1-D Gaussian ``data`` (``Gaussian.scalar``)."""
        if data.K != 1 or data.d != 1:
            raise ValueError(f"the affine family needs 1-D Gaussian data (one component, d = 1); got {data}")
        return cls(sde, float(data.means[0, 0]), math.sqrt(float(data.covs[0, 0, 0])), **kw)

    @classmethod
    def from_preset(cls, preset, n_knots: int = 5, **kw) -> "AffineScoreFamily":
        """The family on a gauss1d toy preset (a :class:`~sacode.theory.presets.ToyPreset` or its name)."""
        if isinstance(preset, str):
            from .presets import toy_preset
            preset = toy_preset(preset)
        basis = kw.pop("basis", None) or HatBasis.uniform(preset.sde.T, n_knots)
        return cls.from_data(preset.sde, preset.data, basis=basis, **kw)

    def with_offsets(self, offset0: TimeFn | None, offset1: TimeFn | None) -> "AffineScoreFamily":
        """The same family around other fixed offsets (e.g. the optimal control, chapter 5)."""
        return AffineScoreFamily(self.sde, self.m0, self.s0, self.basis, offset0, offset1)

    # --- parameters -----------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return 2 * self.basis.n

    def zeros(self) -> Tensor:
        """theta = 0: the offsets alone (the pretrained policy when the offsets are 0)."""
        return torch.zeros(self.n_params, dtype=torch.float64)

    def _check(self, theta) -> None:
        if tuple(np.shape(theta)) != (self.n_params,):
            raise ValueError(f"theta must be a vector of length {self.n_params} (2 x {self.basis.n} hat "
                             f"coefficients); got shape {tuple(np.shape(theta))}")

    def as_numpy(self, theta) -> np.ndarray:
        self._check(theta)
        if isinstance(theta, Tensor):
            theta = theta.detach().cpu().numpy()
        return np.asarray(theta, dtype=np.float64)

    def param_from_functions(self, theta0: TimeFn, theta1: TimeFn) -> np.ndarray:
        """The hat coefficients that interpolate theta0, theta1 at the knots (the family's best local fit)."""
        k = self.basis.knots
        return np.concatenate([np.broadcast_to(theta0(k), k.shape), np.broadcast_to(theta1(k), k.shape)])

    # --- coefficients as python floats (for ODEs) --------------------------------------------------
    def pretrained_coefficients(self, t: float) -> tuple[float, float]:
        """(k1, k0) with s_pre(T - t, x) = k1 x + k0: k1 = -1/D, k0 = alpha m0 / D."""
        _, _, a, sg2 = self.schedule.coefs(t)
        D = a * a * self.s0**2 + sg2
        return -1.0 / D, a * self.m0 / D

    def theta_at(self, t: float, theta_np: np.ndarray) -> tuple[float, float]:
        """(theta0(t), theta1(t)) for a scalar t, offsets included; theta_np from :meth:`as_numpy`."""
        n = self.basis.n
        th0 = self.basis.interp(t, theta_np[:n])
        th1 = self.basis.interp(t, theta_np[n:])
        if self.offset0 is not None:
            th0 += float(self.offset0(t))
        if self.offset1 is not None:
            th1 += float(self.offset1(t))
        return th0, th1

    def drift_coefficients(self, t: float, theta_np: np.ndarray, eta: float = 1.0):
        """Coefficients of the exploratory SDE at RL time t: drift A x + c, noise eta^2 g^2, and the policy.

        dX = [-f X + (1 + eta^2)/2 g^2 mu_theta] dt + eta g dB with mu_theta = (k1 + theta1) x + (k0 + theta0),
        so A = -f + h g^2 (k1 + theta1), c = h g^2 (k0 + theta0), h = (1 + eta^2)/2 (chapter 6 at eta = 1).
        Returns (A, c, g2, theta0, theta1).
        """
        f, g2, _, _ = self.schedule.coefs(t)
        k1, k0 = self.pretrained_coefficients(t)
        th0, th1 = self.theta_at(t, theta_np)
        h = 0.5 * (1.0 + eta * eta)
        return -f + h * g2 * (k1 + th1), h * g2 * (k0 + th0), g2, th0, th1

    def breakpoints(self) -> np.ndarray:
        """Times where theta(t) may have a kink (the knots): ODE solvers restart there."""
        return self.basis.knots

    # --- torch (differentiable in theta) --------------------------------------------------------
    def theta_functions(self, t: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(theta0(t), theta1(t)) for RL times t of shape (m,), differentiable in theta."""
        self._check(theta)
        theta = torch.as_tensor(theta, dtype=t.dtype, device=t.device)
        phi = self.basis(t)                                            # (m, n)
        n = self.basis.n
        th0, th1 = phi @ theta[:n], phi @ theta[n:]
        tn = t.detach().cpu().numpy()
        if self.offset0 is not None:
            th0 = th0 + torch.as_tensor(np.array(np.broadcast_to(self.offset0(tn), tn.shape)), dtype=t.dtype, device=t.device)
        if self.offset1 is not None:
            th1 = th1 + torch.as_tensor(np.array(np.broadcast_to(self.offset1(tn), tn.shape)), dtype=t.dtype, device=t.device)
        return th0, th1

    def pretrained_score(self, s, x: Tensor) -> Tensor:
        """s_pre(s, x) = -(x - alpha_s m0)/D_s, the exact score of the noised data (diffusion time s)."""
        xf, shape = _flat(x)
        s = _times(s, xf)
        a, sg = self.sde.alpha(s), self.sde.sigma(s)
        D = a**2 * self.s0**2 + sg**2
        return (-(xf - a * self.m0) / D).reshape(shape)

    def action_mean(self, t, x: Tensor, theta: Tensor) -> Tensor:
        """mu_theta(t, x) at RL time t (scalar or shape (n,))."""
        xf, shape = _flat(x)
        t = _times(t, xf)
        th0, th1 = self.theta_functions(t, theta)
        return (self.pretrained_score(diffusion_time(t, self.T), xf) + th0 + th1 * xf).reshape(shape)

    def control(self, t, x: Tensor, theta: Tensor) -> Tensor:
        """mu_theta - s_pre = theta0(t) + theta1(t) x (the part the KL penalises)."""
        xf, shape = _flat(x)
        t = _times(t, xf)
        th0, th1 = self.theta_functions(t, theta)
        return (th0 + th1 * xf).reshape(shape)

    def score_fn(self, theta) -> ScoreFn:
        """mu_theta as a score function ``score(s, x)`` in diffusion time, ready for :mod:`sacode.dynamics.samplers`."""
        theta = torch.as_tensor(theta, dtype=torch.float64) if not isinstance(theta, Tensor) else theta
        self._check(theta)
        return lambda s, x: self.action_mean(rl_time(_times(s, _flat(x)[0]), self.T), x, theta)

    def __repr__(self):
        off = "" if self.offset0 is None and self.offset1 is None else ", with offsets"
        return f"AffineScoreFamily({self.sde}, m0={self.m0}, s0={self.s0}, {self.basis}{off})"


def _flat(x: Tensor) -> tuple[Tensor, torch.Size]:
    """(n,) or (n, 1) -> (n,), remembering the shape."""
    if x.ndim == 2 and x.shape[1] == 1:
        return x[:, 0], x.shape
    if x.ndim != 1:
        raise ValueError(f"the affine toy is 1-D: x must have shape (n,) or (n, 1); got {tuple(x.shape)}")
    return x, x.shape


def _times(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"time must be a scalar or have shape ({x.shape[0]},); got {tuple(t.shape)}")
    return t
