"""The exact optimum of the K-step fine-tuning problem on a time grid (1-D Gaussian presets; chapters 8-10).

A fine-tuning algorithm that samples on a grid of K steps optimises the *discrete* objective

    J_K(pi) = E[ r(x_K) ] - beta sum_k E KL( pi_k(. | x_k) || p_k(. | x_k) ),

where p_k(. | x) = N(A_k x + b_k, c_k^2) is the pretrained sampler's Gaussian step (Euler-Maruyama, DDIM(eta) or a
probability-flow step with exploration noise c_k = sigma_e sqrt(h_k), chapter 10) and the policy's step
pi_k(. | x) = N(m_k(x), c_k^2) has the *same* variance and a free mean (a score correction shifts the mean only).
The KL of two Gaussians with a common variance is (m - m_pre)^2 / (2 c^2), which is what the engine's rollouts record.

On 1-D Gaussian data the pretrained step mean is affine in x, and for a linear or quadratic reward the value
function of the K-step problem is a quadratic V_k(x) = P_k x^2 + Q_k x + R_k (dynamic programming, backwards):

    V_k(x) = max_m  E V_{k+1}(m + c_k z) - beta (m - A_k x - b_k)^2 / (2 c_k^2)
           = max_m  P m^2 + Q m + P c_k^2 + R - kappa_k (m - mu_k(x))^2 / 2,         kappa_k = beta / c_k^2,
    m*_k(x) = (Q + kappa_k mu_k(x)) / (kappa_k - 2 P),  mu_k(x) = A_k x + b_k          (needs kappa_k > 2 P).

So the optimal step mean is affine in x and the optimum J_K* = E V_0(X_0), X_0 ~ N(0, p^2), is exact (no Monte
Carlo, no ODE). It is the number a K-step algorithm converges to, and J_K* -> J* (chapter 5) as K grows. It is an
upper bound for J_K of any policy that keeps the sampler's variances, e.g. the continuous-time optimal control
evaluated on the grid (``sacode.theory.policy_eval.discrete_objective``).

d-dimensional presets whose problem separates by coordinate (one Gaussian with a diagonal covariance and a linear or
quadratic reward, e.g. ``gauss8d-linear``; :func:`~sacode.theory.presets.coordinate_presets`) are solved coordinate by
coordinate: :func:`discrete_optimum` then returns a :class:`SeparableOptimum` whose J, KL and value are the sums over
the coordinates' 1-D optima and whose laws and controls carry a trailing coordinate axis.

``DiscreteOptimum.offsets()`` expresses the per-step optimum as a score correction theta0(t) + theta1(t) x (a
piecewise-constant or piecewise-linear function of RL time), ready for ``AffineScoreFamily.with_offsets``: this is
how a policy optimised on one grid is *transferred* to another grid (chapter 10).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .affine_policy import reward_coefficients
from .presets import ToyPreset, coordinate_presets
from ..dynamics.gaussian_step import gaussian_chain, gaussian_step
from ..dynamics.grid import TimeGrid
from ..dynamics.time import rl_time
from ..dynamics.transition import Transition

__all__ = ["DiscreteOptimum", "SeparableOptimum", "discrete_optimum", "dpok_fixed_point", "pretrained_steps"]


def pretrained_steps(preset: ToyPreset, grid: TimeGrid, method: str = "em", eta: float = 1.0,
                     explore: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A, b, c, kappa) of every pretrained step on ``grid``: mean = A x + b, std = c, d mean / d score = kappa.

    The pretrained step is the :class:`~sacode.dynamics.transition.Transition` of ``method`` (the sampler's own step
    with exploration noise explore * sqrt(h) for deterministic methods, exactly as the engine's rollouts); its mean
    is affine in x because the exact pretrained score is, so A and b are read off at x = 0 and x = 1 for all steps in
    one call. ``kappa`` is the step's B (:func:`~sacode.dynamics.gaussian_step.gaussian_step`); nan for ``pf-heun``
    (its mean depends on the score at two points, so a score correction is not a single mean shift).
    """
    _check_gaussian(preset)
    from .optimal import pretrained_score

    K = grid.K
    tr = Transition(preset.sde, method, eta, explore)
    pts = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(K)
    s_cur, s_next = grid.s[:-1].repeat_interleave(2), grid.s[1:].repeat_interleave(2)
    try:
        mean, std = tr.mean_std(pretrained_score(preset), pts, s_cur, s_next)
    except ValueError as e:
        raise ValueError(f"the pretrained {method!r} steps on this grid have no density ({e}); end the grid at "
                         "s_end > 0") from None
    b = mean[0::2].numpy()
    A = mean[1::2].numpy() - b
    c = std[0::2].numpy()
    kappa = (np.full(K, math.nan) if method == "pf-heun"
             else gaussian_step(preset.sde, grid.s[:-1], grid.s[1:], method, eta).B.numpy())
    return A, b, c, kappa


def _check_gaussian(preset: ToyPreset) -> None:
    if preset.data.K != 1 or preset.data.d != 1:
        raise ValueError(f"{preset.name}: the exact K-step optimum needs 1-D Gaussian data (an affine pretrained "
                         "step), or Gaussian data that separates by coordinate; for mixtures use the continuous "
                         "optimum of sacode.theory.optimal and a Monte-Carlo floor")


@dataclass
class DiscreteOptimum:
    """The optimum of the K-step problem: step means m_k(x) = gain_k x + offset_k, values, laws and J_K*.

    Arrays have length K (steps) or K + 1 (times t_0 = 0, ..., t_K = T). ``value[k] = (P_k, Q_k, R_k)`` with
    V_k(x) = P_k x^2 + Q_k x + R_k the optimal expected return from x at step k (V_K = r).
    """

    grid: TimeGrid
    method: str
    eta: float
    explore: float
    beta: float
    gain: np.ndarray
    offset: np.ndarray
    pre_gain: np.ndarray
    pre_offset: np.ndarray
    std: np.ndarray
    kappa: np.ndarray
    value: np.ndarray
    means: np.ndarray
    vars: np.ndarray
    kl_steps: np.ndarray
    expected_reward: float

    @property
    def K(self) -> int:
        return self.grid.K

    @property
    def kl(self) -> float:
        """Expected path KL sum_k E KL_k of the optimal K-step sampler."""
        return float(self.kl_steps.sum())

    @property
    def J(self) -> float:
        """J_K* = E r(x_K) - beta KL (equals E V_0(X_0) to rounding)."""
        return self.expected_reward - self.beta * self.kl

    @property
    def mean(self) -> float:
        """Mean of the terminal law (Gaussian)."""
        return float(self.means[-1])

    @property
    def var(self) -> float:
        """Variance of the terminal law."""
        return float(self.vars[-1])

    def value_at(self, k: int, x: Tensor) -> Tensor:
        """V_k(x) at RL time t_k (k = 0..K; V_K = r)."""
        P, Q, R = self.value[k]
        return P * x**2 + Q * x + R

    def value_grad(self, k: int, x: Tensor) -> Tensor:
        """d V_k / dx = 2 P_k x + Q_k."""
        P, Q, _ = self.value[k]
        return 2 * P * x + Q

    def control(self) -> tuple[np.ndarray, np.ndarray]:
        """(theta0_k, theta1_k): the optimal step as a score correction u_k(x) = theta0_k + theta1_k x.

        The step mean is affine in the score with slope kappa_k, so m_k - mu_k = kappa_k u_k. Not defined for
        ``pf-heun`` (two score evaluations per step).
        """
        if self.method == "pf-heun":
            raise ValueError("a pf-heun step evaluates the score twice, so its optimal mean shift is not one score "
                             "correction; use pf-euler, em or ddim")
        return (self.offset - self.pre_offset) / self.kappa, (self.gain - self.pre_gain) / self.kappa

    def offsets(self, interp: str = "previous"):
        """(theta0(t), theta1(t)) as functions of RL time for ``AffineScoreFamily.with_offsets``.

        ``previous``: the correction of the step that starts at the last grid time t_k <= t (a lookup table indexed
        by the step, as a discrete-time policy is); ``linear``: linear interpolation between the t_k.
        """
        th0, th1 = self.control()
        tk = self.grid.t.numpy()[:-1]
        if interp == "previous":
            def make(vals):
                def fn(t):
                    idx = np.clip(np.searchsorted(tk, np.asarray(t, dtype=np.float64) + 1e-12, side="right") - 1,
                                  0, len(tk) - 1)
                    return vals[idx]
                return fn
        elif interp == "linear":
            def make(vals):
                return lambda t: np.interp(np.asarray(t, dtype=np.float64), tk, vals)
        else:
            raise ValueError(f"interp must be 'previous' or 'linear'; got {interp!r}")
        return make(th0), make(th1)

    def score_fn(self, preset: ToyPreset, interp: str = "previous"):
        """The optimal K-step policy as a sampler score ``score(s, x)`` (diffusion time): s_pre + theta0 + theta1 x.

        On its own grid it reproduces the optimal step means exactly (any em/ddim/pf-euler step); off the grid it is
        the transferred policy of :meth:`offsets`.
        """
        from .optimal import pretrained_score

        pre, (f0, f1), T = pretrained_score(preset), self.offsets(interp), self.grid.T

        def score(s, x: Tensor) -> Tensor:
            t = rl_time(torch.as_tensor(s, dtype=torch.float64), T).expand(x.shape[0]).cpu().numpy()
            th0 = torch.as_tensor(f0(t), dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
            th1 = torch.as_tensor(f1(t), dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
            return pre(s, x) + th0 + th1 * x

        return score


@dataclass
class SeparableOptimum:
    """The K-step optimum of a d-dimensional preset that separates by coordinate: one :class:`DiscreteOptimum` per
    coordinate (``coordinates``). Objectives add up; laws, values and controls are per coordinate.

    ``means``/``vars`` have shape (K + 1, d), ``mean``/``var`` shape (d,); :meth:`value_at` and :meth:`value_grad`
    take x of shape (n, d).
    """

    coordinates: list

    @property
    def grid(self) -> TimeGrid:
        return self.coordinates[0].grid

    @property
    def K(self) -> int:
        return self.grid.K

    @property
    def d(self) -> int:
        return len(self.coordinates)

    @property
    def beta(self) -> float:
        return self.coordinates[0].beta

    @property
    def method(self) -> str:
        return self.coordinates[0].method

    @property
    def expected_reward(self) -> float:
        return float(sum(c.expected_reward for c in self.coordinates))

    @property
    def kl_steps(self) -> np.ndarray:
        return np.sum([c.kl_steps for c in self.coordinates], axis=0)

    @property
    def kl(self) -> float:
        return float(sum(c.kl for c in self.coordinates))

    @property
    def J(self) -> float:
        return float(sum(c.J for c in self.coordinates))

    @property
    def means(self) -> np.ndarray:
        return np.stack([c.means for c in self.coordinates], axis=-1)

    @property
    def vars(self) -> np.ndarray:
        return np.stack([c.vars for c in self.coordinates], axis=-1)

    @property
    def mean(self) -> np.ndarray:
        """Mean of the terminal law, shape (d,)."""
        return self.means[-1]

    @property
    def var(self) -> np.ndarray:
        """Variances of the terminal law (its covariance is diagonal), shape (d,)."""
        return self.vars[-1]

    def value_at(self, k: int, x: Tensor) -> Tensor:
        """V_k(x) = sum_i V_k^i(x_i), x of shape (n, d)."""
        return sum(c.value_at(k, x[:, i]) for i, c in enumerate(self.coordinates))

    def value_grad(self, k: int, x: Tensor) -> Tensor:
        """grad V_k(x), shape (n, d)."""
        return torch.stack([c.value_grad(k, x[:, i]) for i, c in enumerate(self.coordinates)], dim=1)

    def control(self) -> tuple[np.ndarray, np.ndarray]:
        """(theta0_k, theta1_k) of shape (K, d): the optimal step as a score correction, per coordinate."""
        parts = [c.control() for c in self.coordinates]
        return np.stack([p[0] for p in parts], -1), np.stack([p[1] for p in parts], -1)

    def score_fn(self, preset: ToyPreset, interp: str = "previous"):
        """The optimal K-step policy as a sampler score ``score(s, x)``, x of shape (n, d)."""
        fns = [c.score_fn(cp, interp) for c, cp in zip(self.coordinates, coordinate_presets(preset))]

        def score(s, x: Tensor) -> Tensor:
            return torch.stack([f(s, x[:, i]) for i, f in enumerate(fns)], dim=1)

        return score


def _per_coordinate(preset: ToyPreset, solve) -> SeparableOptimum:
    """Solve each coordinate's 1-D problem once per distinct (data, reward) and collect them."""
    done: dict = {}
    out = []
    for cp in coordinate_presets(preset):
        key = (float(cp.data.means[0, 0]), float(cp.data.covs[0, 0, 0]), reward_coefficients(cp.reward))
        if key not in done:
            done[key] = solve(cp)
        out.append(done[key])
    return SeparableOptimum(out)


def discrete_optimum(preset: ToyPreset, grid: TimeGrid, method: str = "em", eta: float = 1.0,
                     explore: float = 0.0, beta: float | None = None) -> DiscreteOptimum | SeparableOptimum:
    """Solve the K-step problem on ``grid`` exactly by backward dynamic programming (module docstring).

    ``beta`` overrides the preset's KL weight. Raises if some step is not concave (kappa_k <= 2 P_{k+1}: a convex
    reward so strong that the discrete problem has no maximiser). ``value`` holds V_k, the optimal expected return
    *including* the future KL costs. A d-dimensional preset that separates by coordinate gives a
    :class:`SeparableOptimum`.
    """
    if _separable(preset):
        return _per_coordinate(preset, lambda cp: _solve(cp, grid, method, eta, explore, beta, future_kl=True))
    return _solve(preset, grid, method, eta, explore, beta, future_kl=True)


def _separable(preset: ToyPreset) -> bool:
    return preset.data.d > 1 and preset.data.K == 1


def dpok_fixed_point(preset: ToyPreset, grid: TimeGrid, method: str = "em", eta: float = 1.0,
                     explore: float = 0.0, beta: float | None = None) -> DiscreteOptimum | SeparableOptimum:
    """The stationary policy of DPOK's update (chapter 8): per step, grad_m E[R | x_k, m] = beta grad_m KL_k.

    DPOK's critic W_k(x) = E[r(x_K) | x_k = x] ignores the KL costs of later steps, and its KL gradient holds the
    state x_k fixed, so the per-step condition is the same as the optimum's with V_{k+1} replaced by W_{k+1}:
    m_k(x) = (Q^W + kappa_k mu_k(x)) / (kappa_k - 2 P^W). It coincides with the K-step optimum when the optimal
    control does not depend on x (a linear reward on Gaussian data) and differs otherwise. ``value`` holds W_k;
    ``J`` is the true K-step objective of this policy (reward minus beta times its path KL).
    """
    if _separable(preset):
        return _per_coordinate(preset, lambda cp: _solve(cp, grid, method, eta, explore, beta, future_kl=False))
    return _solve(preset, grid, method, eta, explore, beta, future_kl=False)


def _solve(preset, grid, method, eta, explore, beta, future_kl: bool) -> DiscreteOptimum:
    _check_gaussian(preset)
    beta = float(preset.beta if beta is None else beta)
    if not beta > 0:
        raise ValueError(f"the KL weight beta must be positive; got {beta}")
    A, b, c, kappa_sc = pretrained_steps(preset, grid, method, eta, explore)
    r2, r1, r0 = reward_coefficients(preset.reward)
    K = grid.K
    value = np.empty((K + 1, 3))
    value[K] = (r2, r1, r0)
    gain, offset = np.empty(K), np.empty(K)
    P, Q, R = r2, r1, r0
    for k in reversed(range(K)):
        kap = beta / c[k] ** 2
        den = kap - 2 * P
        if not den > 0:
            raise ValueError(f"step {k}: beta / c_k^2 = {kap:.4g} <= 2 P = {2 * P:.4g}, so the K-step problem is "
                             "unbounded; raise beta or refine the grid")
        gain[k] = kap * A[k] / den
        offset[k] = (Q + kap * b[k]) / den
        d1, d0 = gain[k] - A[k], offset[k] - b[k]
        w = 0.5 * kap if future_kl else 0.0          # the KL cost of this step, in the value or not
        P, Q, R = (P * gain[k] ** 2 - w * d1**2,
                   2 * P * gain[k] * offset[k] + Q * gain[k] - 2 * w * d1 * d0,
                   P * offset[k] ** 2 + Q * offset[k] + P * c[k] ** 2 + R - w * d0**2)
        value[k] = (P, Q, R)
    law = gaussian_chain(gain, offset, c, 0.0, preset.sde.prior_std() ** 2, gain - A, offset - b, 1.0 / c**2)
    means, vars_, kls = law.means[:, 0], law.covs[:, 0, 0], law.kl_steps
    m, v = float(means[-1]), float(vars_[-1])
    er = r2 * (v + m * m) + r1 * m + r0
    return DiscreteOptimum(grid, method, float(eta), float(explore), beta, gain, offset, A, b, c, kappa_sc, value,
                           means, vars_, kls, float(er))
