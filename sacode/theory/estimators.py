"""Policy-gradient estimators on the affine family, exactly: per-step quantities, their exact means and variances,
and vectorised Monte-Carlo samples in d dimensions (chapter 7).

Setting. The affine family of chapter 6 (:class:`~sacode.theory.affine_policy.AffineScoreFamily`) on a K-step
Euler-Maruyama grid (eta = 1): x_{k+1} = g_k x_k + o_k + c_k z_k with g_k = A_k + B_k (k1 + theta1(t_k)),
o_k = B_k (k0 + theta0(t_k)), c_k = g(s_k) sqrt(h_k). A d-dimensional Gaussian preset that separates by coordinate
(:func:`~sacode.theory.presets.coordinate_presets`) runs one such chain per coordinate, with its own theta. Write
kappa_k = B_k / c_k, u_k(x) = theta0 + theta1 x (the KL-penalised correction) and psi_k(x) = (phi(t_k), phi(t_k) x),
so that d m_k / d theta = B_k psi_k(x) and, per coordinate,

    score       S_k      = grad_theta log p_theta(x_{k+1} | x_k) = kappa_k z_k psi_k(x_k),
    KL          KL_k(x)  = kappa_k^2 u_k(x)^2 / 2,                grad_theta KL_k = kappa_k^2 u_k psi_k,
    log-ratio   l_k      = log(p_theta / p_pre)(x_{k+1} | x_k) = kappa_k^2 u_k^2 / 2 + kappa_k u_k z_k.

The estimators are the per-trajectory gradients of the engine algorithms' surrogates at ratio 1
(:mod:`sacode.engine.algos`), written on the gradient's own scale (a batch-level positive factor such as DDPO's
division by the reward std changes neither the direction nor the relative variance):

=====================  ===========================================================================================
``ddpo``               (sum_k S_k) (R - b),  R = r(x_K) - beta sum_k l_k,  b = E R (Monte Carlo: leave-one-out mean)
``ctpo``               sum_k [S_k (V_{k+1}(x_{k+1}) - V_k(x_k) - tau_k) - beta grad KL_k],  tau_k = E of the TD term
``ctpo-pathwise``      sum_k [B_k psi_k(x_k) grad V_{k+1}(x_{k+1}) - beta grad KL_k]  (V_K = r: exact terminal)
``dpok``               sum_k [S_k (r(x_K) - W_k(x_k) - omega_k) - beta grad KL_k],  W_k = E[r(x_K) | x_k]
``backprop``           grad_theta [r(x_K) - beta sum_k KL_k(x_k)] along the reparameterised path
=====================  ===========================================================================================

V is the value of the *current* policy: ``"exact-K"`` its K-step value V_k = E[r(x_K) - beta sum_{j>=k} KL_j | x_k]
(:func:`discrete_value`, a backward recursion like the dynamic programme of
:mod:`sacode.theory.discrete_optimum` without the maximisation), or ``"exact-continuous"`` the continuous-time
V^theta of chapter 6 (:class:`~sacode.theory.policy_eval.PolicyValue`) read at the grid times. With exact-K values
ctpo, ctpo-pathwise, ddpo and backprop are unbiased for grad J_K (:func:`discrete_gradient`); the continuous V is
biased on a grid, and dpok is biased by construction (its critic leaves out the future KL costs).

Exact moments. Every estimator is a polynomial in the Gaussian variables of the chain. :func:`estimator_moments`
propagates conditional moments backwards, M_k^{ij}(x) = E[A_{>=k}^i B_{>=k}^j | x_k = x] for additive functionals
A = sum_k a_k(x_k, z_k) (+ a terminal term) and B likewise: each M_k^{ij} is a polynomial in x of bounded degree,
evaluated at Chebyshev nodes and moved from step k + 1 to k by Lagrange interpolation and Gauss-Hermite quadrature
in z_k -- exact up to rounding. backprop is a quadratic form in the Gaussian vector (x_0, z_0, ..., z_{K-1}), whose
variance is 2 ||M||_F^2 + ||m||^2.

d dimensions. With the same theta in every coordinate the coordinates are independent copies, and the estimate for
coordinate i's parameters is its own 1-D estimate plus the other coordinates' noise carried by the shared scalar
advantage. For the likelihood-ratio estimators with per-step centred advantages the cross terms vanish except

    Var_d = d [ Var_1 + (d - 1) X ],    X = sum_k E||S_k||^2 Var(Y_k),

with Y_k the per-step advantage of one coordinate (ctpo: its TD term; dpok: r(x_K) - W_k(x_k)); for ddpo
X = E||sum_k S_k||^2 Var(R_1). The pathwise and backprop estimates of coordinate i depend on coordinate i alone
(X = 0). Since ||grad J_K||^2 grows like d as well, the relative variance per trajectory is Var_1/|g_1|^2 + (d - 1)
X/|g_1|^2 (:meth:`EstimatorMoments.rel_var`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .affine_policy import AffineScoreFamily, reward_coefficients
from .policy_eval import PolicyValue, discrete_objective, optimal_affine_control
from ..dynamics.gaussian_step import gaussian_step
from ..dynamics.grid import TimeGrid

ESTIMATOR_ALGOS = ("ddpo", "ctpo", "ctpo-pathwise", "dpok", "backprop")
"""The estimators of this module, named after the engine algorithms whose surrogate gradients they are."""

VALUE_KINDS = ("exact-K", "exact-continuous")
"""Exact values this module computes: the K-step value of the policy, and the continuous-time V^theta on the grid."""

__all__ = ["ESTIMATOR_ALGOS", "VALUE_KINDS", "GridSteps", "grid_steps", "discrete_value", "continuous_value",
           "discrete_gradient", "optimal_theta", "Paths", "paths_from_states", "sample_paths", "quadratic_values", "estimator_samples",
           "relative_variance", "EstimatorMoments", "estimator_moments"]


# ------------------------------------------------------------------------------------------------
# per-step coefficients of the chain, for one or several coordinates
# ------------------------------------------------------------------------------------------------
@dataclass
class GridSteps:
    """Step coefficients of d coordinate chains on one grid. Arrays (K, d) unless noted.

    ``gain``, ``offset``, ``std``: the step x' = gain x + offset + std z; ``B`` the score's coefficient in the mean
    (K,), ``th0``/``th1`` the correction u = th0 + th1 x at t_k, ``phi`` (K, nb) the basis at t_k, ``means``/``vars``
    (K + 1, d) the exact laws of x_k, ``reward`` (d, 3) the coefficients (r2, r1, r0) of each coordinate's reward.
    """

    grid: TimeGrid
    beta: float
    gain: np.ndarray
    offset: np.ndarray
    std: np.ndarray
    B: np.ndarray
    th0: np.ndarray
    th1: np.ndarray
    phi: np.ndarray
    means: np.ndarray
    vars: np.ndarray
    reward: np.ndarray
    prior_var: float

    @property
    def K(self) -> int:
        return self.grid.K

    @property
    def d(self) -> int:
        return self.gain.shape[1]

    @property
    def nb(self) -> int:
        return self.phi.shape[1]

    @property
    def P(self) -> int:
        """Parameters per coordinate (2 nb)."""
        return 2 * self.nb

    @property
    def kappa(self) -> np.ndarray:
        """B_k / c_k, (K, d): the score of a step is kappa z psi(x)."""
        return self.B[:, None] / self.std

    def coordinate(self, i: int) -> "GridSteps":
        """The steps of coordinate i alone (d = 1)."""
        sl = slice(i, i + 1)
        return GridSteps(self.grid, self.beta, self.gain[:, sl], self.offset[:, sl], self.std[:, sl], self.B,
                         self.th0[:, sl], self.th1[:, sl], self.phi, self.means[:, sl], self.vars[:, sl],
                         self.reward[sl], self.prior_var)


def grid_steps(family: AffineScoreFamily, thetas, rewards, beta: float, grid: TimeGrid) -> GridSteps:
    """The Euler-Maruyama (eta = 1) steps of the affine policies ``thetas`` (d, P) or (P,) on ``grid``.

    ``rewards``: one 1-D reward, or one per coordinate (e.g. of :func:`~sacode.theory.presets.coordinate_presets`).
    The laws are those of :func:`~sacode.theory.policy_eval.discrete_objective` (the same exact recursion).
    """
    th = np.atleast_2d(np.asarray(thetas.detach().cpu().numpy() if isinstance(thetas, Tensor) else thetas,
                                  dtype=np.float64))
    d = th.shape[0]
    rewards = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards] * d
    if len(rewards) != d:
        raise ValueError(f"{len(rewards)} rewards for {d} coordinates")
    K = grid.K
    st = gaussian_step(family.sde, grid.s[:-1], grid.s[1:], "em", 1.0)
    B, std = st.B.numpy(), st.std.numpy()
    if not np.all(std > 0):
        raise ValueError("the estimators need Euler-Maruyama steps with positive noise on every step")
    ts = grid.t.numpy()
    out = {k: np.empty((K, d)) for k in ("gain", "offset", "th0", "th1")}
    means, vars_ = np.empty((K + 1, d)), np.empty((K + 1, d))
    for i in range(d):
        obj = discrete_objective(family, th[i], rewards[i], beta, grid)
        out["gain"][:, i], out["offset"][:, i] = obj.A, obj.b
        means[:, i], vars_[:, i] = obj.means, obj.vars
        for k in range(K):
            out["th0"][k, i], out["th1"][k, i] = family.theta_at(float(ts[k]), th[i])
    phi = np.stack([family.basis.vector(float(ts[k])) for k in range(K)])
    return GridSteps(grid, float(beta), out["gain"], out["offset"], np.repeat(std[:, None], d, 1), B, out["th0"],
                     out["th1"], phi, means, vars_, np.array([reward_coefficients(r) for r in rewards]),
                     float(family.sde.prior_std() ** 2))


# ------------------------------------------------------------------------------------------------
# exact values and the exact gradient of J_K
# ------------------------------------------------------------------------------------------------
def discrete_value(steps: GridSteps, with_kl: bool = True) -> np.ndarray:
    """The K-step value of the policy, V_k(x) = P_k x^2 + Q_k x + R_k: array (K + 1, d, 3) ("exact-K").

    V_K = r and V_k(x) = -beta KL_k(x) + E V_{k+1}(gain x + offset + c z), i.e. E[r(x_K) - beta sum_{j>=k} KL_j |
    x_k = x], the regression target of the engine's value network (``returns_to_go``). ``with_kl=False`` gives DPOK's
    critic W_k = E[r(x_K) | x_k] (its targets leave out the KL).
    """
    K, d = steps.K, steps.d
    val = np.empty((K + 1, d, 3))
    val[K] = steps.reward
    w = 0.5 * steps.beta * steps.kappa**2 if with_kl else np.zeros((K, d))
    for k in reversed(range(K)):
        P, Q, R = val[k + 1, :, 0], val[k + 1, :, 1], val[k + 1, :, 2]
        g, o, c = steps.gain[k], steps.offset[k], steps.std[k]
        a0, a1 = steps.th0[k], steps.th1[k]
        val[k, :, 0] = P * g * g - w[k] * a1 * a1
        val[k, :, 1] = 2 * P * g * o + Q * g - 2 * w[k] * a0 * a1
        val[k, :, 2] = P * (o * o + c * c) + Q * o + R - w[k] * a0 * a0
    return val


def continuous_value(family: AffineScoreFamily, thetas, rewards, beta: float, grid: TimeGrid) -> np.ndarray:
    """The continuous-time value V^theta (Feynman-Kac, chapter 6) at the grid times: array (K + 1, d, 3)
    ("exact-continuous"); the terminal entry is r exactly. Coordinates with equal (theta, reward) share one solve."""
    th = np.atleast_2d(np.asarray(thetas.detach().cpu().numpy() if isinstance(thetas, Tensor) else thetas,
                                  dtype=np.float64))
    d = th.shape[0]
    rewards = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards] * d
    ts = grid.t.numpy()
    out = np.empty((grid.K + 1, d, 3))
    done: dict = {}
    for i in range(d):
        key = (th[i].tobytes(), reward_coefficients(rewards[i]))
        if key not in done:
            V = PolicyValue(family, th[i], rewards[i], beta)
            p2, p1, p0 = V.coefficients(ts)
            col = np.stack([p2, p1, p0], 1)
            col[-1] = reward_coefficients(rewards[i])
            done[key] = col
        out[:, i] = done[key]
    return out


def discrete_gradient(steps: GridSteps) -> np.ndarray:
    """grad_theta J_K exactly, shape (d, P): sum_k E[psi_k(x_k) h_k(x_k)] with the affine
    h_k(x) = B_k E[grad V_{k+1}(x_{k+1}) | x_k = x] - beta kappa_k^2 u_k(x) (the pathwise form on the grid, with the
    exact K-step value; the chain rule through J_K = E V_0(x_0))."""
    V = discrete_value(steps)
    K, d, nb = steps.K, steps.d, steps.nb
    out = np.zeros((d, 2 * nb))
    for k in range(K):
        P, Q = V[k + 1, :, 0], V[k + 1, :, 1]
        g, o = steps.gain[k], steps.offset[k]
        kap2 = steps.kappa[k] ** 2
        slope = steps.B[k] * 2 * P * g - steps.beta * kap2 * steps.th1[k]
        icpt = steps.B[k] * (2 * P * o + Q) - steps.beta * kap2 * steps.th0[k]
        m, v = steps.means[k], steps.vars[k]
        out[:, :nb] += (slope * m + icpt)[:, None] * steps.phi[k][None]
        out[:, nb:] += (slope * (v + m * m) + icpt * m)[:, None] * steps.phi[k][None]
    return out


def optimal_theta(family: AffineScoreFamily, reward, beta: float) -> np.ndarray:
    """theta*: the optimal control of chapter 5 (grad V*/beta = theta0* + theta1* x) at the family's knots."""
    th0, th1 = optimal_affine_control(family, reward, beta)
    return family.param_from_functions(th0, th1)


# ------------------------------------------------------------------------------------------------
# Monte Carlo in d dimensions
# ------------------------------------------------------------------------------------------------
@dataclass
class Paths:
    """n sampled trajectories of the d coordinate chains: states xs (K + 1, n, d) and noises zs (K, n, d)."""

    xs: Tensor
    zs: Tensor

    @property
    def n(self) -> int:
        return self.xs.shape[1]


def paths_from_states(steps: GridSteps, xs: Tensor) -> Paths:
    """The paths of recorded states xs (K + 1, n, d) or (K + 1, n) (e.g. an engine rollout of the same policies),
    with the noises z_k = (x_{k+1} - gain_k x_k - offset_k) / c_k read off the steps."""
    xs = xs.reshape(xs.shape[0], xs.shape[1], steps.d).double()
    g, o, c = (torch.as_tensor(a)[:, None, :] for a in (steps.gain, steps.offset, steps.std))
    return Paths(xs, (xs[1:] - g * xs[:-1] - o) / c)


def sample_paths(steps: GridSteps, n: int, generator: torch.Generator) -> Paths:
    """n trajectories from the prior N(0, p^2 I) through the exact steps (float64)."""
    K, d = steps.K, steps.d
    x = math.sqrt(steps.prior_var) * torch.randn(n, d, generator=generator, dtype=torch.float64)
    zs = torch.randn(K, n, d, generator=generator, dtype=torch.float64)
    g, o, c = (torch.as_tensor(a) for a in (steps.gain, steps.offset, steps.std))
    xs = [x]
    for k in range(K):
        x = g[k] * x + o[k] + c[k] * zs[k]
        xs.append(x)
    return Paths(torch.stack(xs), zs)


def quadratic_values(coefs: np.ndarray, paths: Paths) -> tuple[Tensor, Tensor]:
    """Values V(t_k, x_k) summed over coordinates (K + 1, n) and gradients (K + 1, n, d) of separable quadratic values
    ``coefs`` (K + 1, d, 3) (:func:`discrete_value` or :func:`continuous_value`) along ``paths``."""
    c = torch.as_tensor(coefs)
    x = paths.xs
    P, Q, R = c[:, None, :, 0], c[:, None, :, 1], c[:, None, :, 2]
    return (P * x * x + Q * x + R).sum(-1), 2 * P * x + Q


def _loo(v: Tensor) -> Tensor:
    """Leave-one-out means along the last axis (the batch): an unbiased per-trajectory baseline."""
    n = v.shape[-1]
    return (v.sum(-1, keepdim=True) - v) / (n - 1)


def _aggregate(steps: GridSteps, w: Tensor, xs: Tensor) -> Tensor:
    """sum_k w_k psi_k(x_k) per trajectory: w, xs (K, n, d) -> (n, d, P)."""
    phi = torch.as_tensor(steps.phi)
    return torch.cat([torch.einsum("knd,kb->ndb", w, phi), torch.einsum("knd,kb->ndb", w * xs, phi)], -1)


def estimator_samples(steps: GridSteps, paths: Paths, algo: str, values: Tensor | None = None,
                      grads: Tensor | None = None) -> Tensor:
    """Per-trajectory gradient estimates (n, d, P) of ``algo`` (module docstring) along ``paths``.

    ``values`` (K + 1, n): V(t_k, x_k) of the whole state (ctpo; dpok's critic W for dpok); ``grads`` (K + 1, n, d):
    grad_x V(t_k, x_k) (ctpo-pathwise). Any value works (exact, fitted, a network during training); the terminal
    entries are replaced by the reward and its gradient, as the engine does. Baselines are leave-one-out means.
    """
    if algo not in ESTIMATOR_ALGOS:
        raise ValueError(f"unknown estimator {algo!r}; choose one of {', '.join(ESTIMATOR_ALGOS)}")
    K = steps.K
    xs, zs = paths.xs, paths.zs
    x, xK = xs[:-1], xs[-1]
    r2, r1, r0 = (torch.as_tensor(steps.reward[:, j]) for j in range(3))
    reward = (r2 * xK * xK + r1 * xK + r0).sum(-1)
    kap = torch.as_tensor(steps.kappa)[:, None, :]                                # (K, 1, d)
    u = torch.as_tensor(steps.th0)[:, None, :] + torch.as_tensor(steps.th1)[:, None, :] * x
    kl_grad_w = -steps.beta * kap**2 * u                                          # weight of -beta grad KL_k
    score_w = kap * zs                                                            # S_k = score_w psi_k
    if algo == "ddpo":
        log_ratio = (0.5 * kap**2 * u * u + kap * u * zs).sum((0, 2))
        ret = reward - steps.beta * log_ratio
        adv = (ret - _loo(ret))[None, :, None]
        return _aggregate(steps, score_w * adv, x)
    if algo == "backprop":
        return _backprop(steps, xs)
    if algo in ("ctpo", "dpok"):
        if values is None:
            raise ValueError(f"{algo} needs values (K + 1, n) along the paths")
        v = torch.cat([values[:-1], reward[None]], 0)
        adv = v[1:] - v[:-1] if algo == "ctpo" else reward[None] - v[:-1]         # (K, n)
        adv = (adv - _loo(adv))[:, :, None]
        return _aggregate(steps, score_w * adv + kl_grad_w, x)
    if grads is None:
        raise ValueError("ctpo-pathwise needs value gradients (K + 1, n, d) along the paths")
    gK = 2 * r2 * xK + r1
    gnext = torch.cat([grads[1:-1], gK[None]], 0)                                 # grad V(t_{k+1}, x_{k+1})
    B = torch.as_tensor(steps.B)[:, None, None]
    return _aggregate(steps, B * gnext + kl_grad_w, x)


def _backprop(steps: GridSteps, xs: Tensor) -> Tensor:
    """grad_theta [r(x_K) - beta sum_k KL_k(x_k)] with dx_{k+1}/dtheta = gain_k dx_k/dtheta + B_k psi_k(x_k)."""
    K, nb = steps.K, steps.nb
    n, d = xs.shape[1], xs.shape[2]
    y = torch.zeros(n, d, 2 * nb, dtype=xs.dtype)
    out = torch.zeros_like(y)
    phi = torch.as_tensor(steps.phi)
    for k in range(K):
        x = xs[k]
        th0, th1 = torch.as_tensor(steps.th0[k]), torch.as_tensor(steps.th1[k])
        kap2 = torch.as_tensor(steps.kappa[k]) ** 2
        u = th0 + th1 * x
        psi = torch.cat([phi[k].expand(n, d, nb), phi[k] * x[..., None]], -1)    # (n, d, P)
        out -= steps.beta * (kap2 * u)[..., None] * (psi + th1[:, None] * y)      # d KL_k / d theta (total)
        y = torch.as_tensor(steps.gain[k])[:, None] * y + float(steps.B[k]) * psi
    r2, r1 = torch.as_tensor(steps.reward[:, 0]), torch.as_tensor(steps.reward[:, 1])
    return out + (2 * r2 * xs[-1] + r1)[..., None] * y


def relative_variance(samples: Tensor, grad: np.ndarray) -> dict:
    """Relative variance per trajectory E||g_i - E g||^2 / ||grad J_K||^2 (with its standard error), the cosine of
    the mean estimate with grad J_K and the relative bias ||mean - grad J_K|| / ||grad J_K||; ``samples`` (n, ...)."""
    s = samples.reshape(samples.shape[0], -1).double()
    n = s.shape[0]
    gt = torch.as_tensor(grad, dtype=torch.float64).reshape(-1)
    mean = s.mean(0)
    sq = ((s - mean) ** 2).sum(1) * n / (n - 1)
    norm2 = float(gt @ gt)
    cos = float(mean @ gt / (mean.norm() * gt.norm()))
    return {"rel_var": float(sq.mean()) / norm2, "rel_var_se": float(sq.std() / math.sqrt(n)) / norm2,
            "cos": cos, "bias": float((mean - gt).norm() / gt.norm()), "n": n}


# ------------------------------------------------------------------------------------------------
# exact moments (one coordinate; d dimensions by the independence of the coordinates)
# ------------------------------------------------------------------------------------------------
@dataclass
class EstimatorMoments:
    """Exact mean (P,) and per-component variance (P,) of one coordinate's estimator, and the variance ``cross``
    that each other coordinate adds to it through a shared scalar advantage (module docstring)."""

    algo: str
    mean: np.ndarray
    var: np.ndarray
    cross: float
    extra: dict = field(default_factory=dict)

    def rel_var(self, grad: np.ndarray, d: int = 1) -> float:
        """E||g - E g||^2 / ||grad J_K||^2 per trajectory for d identical coordinates (``grad``: one coordinate's)."""
        return float((self.var.sum() + (d - 1) * self.cross) / (grad @ grad))

    def cos(self, grad: np.ndarray) -> float:
        """Cosine of the exact mean with grad J_K (the same for every d)."""
        return float(self.mean @ grad / (np.linalg.norm(self.mean) * np.linalg.norm(grad)))

    def bias(self, grad: np.ndarray) -> float:
        """||E g - grad J_K|| / ||grad J_K||."""
        return float(np.linalg.norm(self.mean - grad) / np.linalg.norm(grad))


N_NODES = 13
"""Chebyshev nodes per step: exact for conditional-moment polynomials of degree <= 12 in x (the estimators' fourth
moments have degree <= 10)."""
N_GH = 12
"""Gauss-Hermite nodes in z_k: exact for polynomials of degree <= 23 in z."""


def _gh(n: int) -> tuple[np.ndarray, np.ndarray]:
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / math.sqrt(2 * math.pi)


def _cheb_nodes(m: float, v: float) -> np.ndarray:
    j = np.arange(N_NODES)
    return m + 6.0 * math.sqrt(max(v, 1e-300)) * np.cos(np.pi * j / (N_NODES - 1))


def _lagrange(nodes: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Matrix L with f(pts) = L @ f(nodes) for every polynomial f of degree < len(nodes); pts of any shape."""
    p = pts.reshape(-1, 1)
    diff = p - nodes[None]                                    # (m, N)
    N = nodes.size
    L = np.ones((p.shape[0], N))
    for j in range(N):
        for i in range(N):
            if i != j:
                L[:, j] *= diff[:, i] / (nodes[j] - nodes[i])
    return L.reshape(*pts.shape, N)


def _joint_moments(steps: GridSteps, a_step, b_step, a_end, b_end, orders: list[tuple[int, int]]) -> dict:
    """E[A^i B^j] for the additive functionals A = sum_k a_k(x_k, z_k) + a_end(x_K) (vector over the last axis)
    and B likewise (module docstring), for each (i, j) in ``orders`` (closed downwards); one coordinate.

    ``a_step(k, x, z)`` gets x (N, 1), z (1, Q) and returns (N, Q, P); ``b_step`` returns (N, Q, 1) or (N, Q, P);
    ``a_end(x)``, ``b_end(x)`` get x (N,) and return (N, P) / (N, 1).
    """
    K = steps.K
    zq, wq = _gh(N_GH)
    g, o, c = steps.gain[:, 0], steps.offset[:, 0], steps.std[:, 0]
    nodes = _cheb_nodes(steps.means[K, 0], steps.vars[K, 0])
    aK, bK = a_end(nodes), b_end(nodes)
    M = {(i, j): aK**i * bK**j for i, j in orders}
    for k in reversed(range(K)):
        new = _cheb_nodes(steps.means[k, 0], steps.vars[k, 0])
        xn = g[k] * new[:, None] + o[k] + c[k] * zq[None, :]                    # (N, Q)
        L = _lagrange(nodes, xn)                                                # (N, Q, N)
        Mn = {key: np.einsum("nqm,mp->nqp", L, val) for key, val in M.items()}
        a = a_step(k, new[:, None], zq[None, :])
        b = b_step(k, new[:, None], zq[None, :])
        out = {}
        for i, j in orders:
            acc = 0.0
            for i2 in range(i + 1):
                for j2 in range(j + 1):
                    acc = acc + math.comb(i, i2) * math.comb(j, j2) * a ** (i - i2) * b ** (j - j2) * Mn[(i2, j2)]
            out[(i, j)] = np.einsum("nqp,q->np", acc, wq)
        M, nodes = out, new
    x0 = math.sqrt(steps.prior_var) * zq
    L0 = _lagrange(nodes, x0)                                                   # (Q, N)
    return {key: wq @ (L0 @ val) for key, val in M.items()}


def _no_step(k: int, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A functional without per-step terms (the second functional of a one-functional recursion)."""
    return np.zeros((*np.broadcast_shapes(x.shape, z.shape), 1))


def _quad_moment(fn, m: float, v: float) -> float:
    """E fn(x, z) for x ~ N(m, v) independent of z ~ N(0, 1) (fn polynomial; 2-D Gauss-Hermite)."""
    zq, wq = _gh(N_GH)
    x = m + math.sqrt(v) * zq
    return float(np.einsum("i,j,ij->", wq, wq, fn(x[:, None], zq[None, :])))


def estimator_moments(steps: GridSteps, algo: str, value: np.ndarray | None = None) -> EstimatorMoments:
    """Exact mean and variance of ``algo``'s estimate for one coordinate (``steps`` with d = 1).

    ``value`` (K + 1, 1, 3): the quadratic value the estimator uses (:func:`discrete_value` or
    :func:`continuous_value`) for ctpo and ctpo-pathwise; dpok uses its exact critic ``discrete_value(...,
    with_kl=False)``; ddpo and backprop use none. Baselines are the exact means (b = E R, tau_k = E TD_k).
    """
    if steps.d != 1:
        raise ValueError("estimator_moments takes one coordinate (steps.coordinate(i))")
    if algo == "backprop":
        return _backprop_moments(steps)
    K, nb, beta = steps.K, steps.nb, steps.beta
    g, o, c, kap = steps.gain[:, 0], steps.offset[:, 0], steps.std[:, 0], steps.kappa[:, 0]
    th0, th1, phi = steps.th0[:, 0], steps.th1[:, 0], steps.phi
    r2, r1, r0 = steps.reward[0]
    P = 2 * nb

    def psi(k, x):                                                    # (N, 1) -> (N, 1, P)
        return np.concatenate([np.broadcast_to(phi[k], (*x.shape, nb)), phi[k] * x[..., None]], -1)

    def kl_term(k, x):
        return -beta * kap[k] ** 2 * (th0[k] + th1[k] * x)[..., None] * psi(k, x)

    def reward(x):
        return r2 * x * x + r1 * x + r0

    zeros_end = lambda x: np.zeros((x.shape[0], P))
    ones_end = lambda x: np.ones((x.shape[0], 1))
    extra: dict = {}
    if algo in ("ctpo", "dpok"):
        V = value if algo == "ctpo" else discrete_value(steps, with_kl=False)
        if V is None:
            raise ValueError("ctpo needs the value it uses (discrete_value or continuous_value)")
        Vc = V[:, 0]

        def val(k, x):
            return Vc[k, 0] * x * x + Vc[k, 1] * x + Vc[k, 2]

        if algo == "ctpo":
            def y_raw(k, x, z):
                return val(k + 1, g[k] * x + o[k] + c[k] * z) - val(k, x)
            centre = np.array([_quad_moment(lambda x, z: y_raw(k, x, z), steps.means[k, 0], steps.vars[k, 0])
                               for k in range(K)])
            var_y = np.array([_quad_moment(lambda x, z: (y_raw(k, x, z) - centre[k]) ** 2, steps.means[k, 0],
                                           steps.vars[k, 0]) for k in range(K)])

            def a_step(k, x, z):
                return kap[k] * z[..., None] * psi(k, x) * (y_raw(k, x, z) - centre[k])[..., None] + kl_term(k, x)
            moments = _joint_moments(steps, a_step, _no_step, zeros_end, ones_end, [(0, 0), (1, 0), (2, 0)])
        else:
            mK, vK = steps.means[K, 0], steps.vars[K, 0]
            e1, e2, e3, e4 = mK, mK**2 + vK, mK**3 + 3 * mK * vK, mK**4 + 6 * mK**2 * vK + 3 * vK**2
            Er2 = r2 * r2 * e4 + 2 * r2 * r1 * e3 + (r1 * r1 + 2 * r2 * r0) * e2 + 2 * r1 * r0 * e1 + r0 * r0
            var_y = np.array([Er2 - _quad_moment(lambda x, z: val(k, x) ** 2 + 0 * z, steps.means[k, 0],
                                                 steps.vars[k, 0]) for k in range(K)])
            moments = _dpok_direct(steps, psi, kl_term, val, reward)
        E_psi2 = np.array([np.sum(phi[k] ** 2) * (1 + steps.vars[k, 0] + steps.means[k, 0] ** 2) for k in range(K)])
        cross = float(np.sum(kap**2 * E_psi2 * var_y))
        mean, second = moments[(1, 0)], moments[(2, 0)]
        extra["var_adv_steps"] = var_y
    elif algo == "ctpo-pathwise":
        if value is None:
            raise ValueError("ctpo-pathwise needs the value it uses (discrete_value or continuous_value)")
        Vc = value[:, 0]

        def a_step(k, x, z):
            xn = g[k] * x + o[k] + c[k] * z
            gV = 2 * Vc[k + 1, 0] * xn + Vc[k + 1, 1] if k + 1 < K else 2 * r2 * xn + r1
            return steps.B[k] * gV[..., None] * psi(k, x) + kl_term(k, x)
        moments = _joint_moments(steps, a_step, _no_step, zeros_end, ones_end, [(0, 0), (1, 0), (2, 0)])
        mean, second, cross = moments[(1, 0)], moments[(2, 0)], 0.0
    elif algo == "ddpo":
        def a_step(k, x, z):
            return kap[k] * z[..., None] * psi(k, x)

        def b_step(k, x, z):
            u = th0[k] + th1[k] * x
            return (-beta * (0.5 * kap[k] ** 2 * u * u + kap[k] * u * z))[..., None]
        orders = [(i, j) for i in range(3) for j in range(3)]
        mo = _joint_moments(steps, a_step, b_step, zeros_end, lambda x: reward(x)[:, None], orders)
        b = mo[(0, 1)][0]
        mean = mo[(1, 1)] - b * mo[(1, 0)]
        second = mo[(2, 2)] - 2 * b * mo[(2, 1)] + b * b * mo[(2, 0)]
        var_R = float(mo[(0, 2)][0] - b * b)
        cross = float(mo[(2, 0)].sum() * var_R)
        extra |= {"var_return": var_R, "E_score2": float(mo[(2, 0)].sum())}
    else:
        raise ValueError(f"unknown estimator {algo!r}; choose one of {', '.join(ESTIMATOR_ALGOS)}")
    return EstimatorMoments(algo, mean, second - mean**2, cross, extra)


def _dpok_direct(steps: GridSteps, psi, kl_term, val, reward) -> dict:
    """E[G] and E[G^2] of dpok's G = A r(x_K) + C, A = sum_k S_k, C = sum_k [-S_k W_k(x_k) - beta grad KL_k]
    (G is not additive in the steps), from the conditional moments N_k^{ijm}(x) = E[A_{>=k}^i C_{>=k}^j r(x_K)^m |
    x_k = x], propagated backwards like :func:`_joint_moments`."""
    K, P = steps.K, steps.P
    zq, wq = _gh(N_GH)
    g, o, c, kap = steps.gain[:, 0], steps.offset[:, 0], steps.std[:, 0], steps.kappa[:, 0]
    keys = [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 0, 1), (0, 1, 0), (2, 0, 2), (1, 1, 1), (0, 2, 0), (1, 0, 0),
            (2, 0, 0), (1, 1, 0), (2, 0, 1), (1, 0, 2), (0, 1, 1)]
    nodes = _cheb_nodes(steps.means[K, 0], steps.vars[K, 0])
    rK = reward(nodes)[:, None]
    M = {(i, j, m): (np.ones((N_NODES, P)) * rK**m) if (i, j) == (0, 0) else np.zeros((N_NODES, P))
         for i, j, m in keys}
    for k in reversed(range(K)):
        new = _cheb_nodes(steps.means[k, 0], steps.vars[k, 0])
        xn = g[k] * new[:, None] + o[k] + c[k] * zq[None, :]
        L = _lagrange(nodes, xn)
        Mn = {key: np.einsum("nqm,mp->nqp", L, v) for key, v in M.items()}
        x, z = new[:, None], zq[None, :]
        a = kap[k] * z[..., None] * psi(k, x)
        cc = -a * val(k, x)[..., None] + kl_term(k, x)
        out = {}
        for i, j, m in keys:
            acc = 0.0
            for i2 in range(i + 1):
                for j2 in range(j + 1):
                    acc = acc + math.comb(i, i2) * math.comb(j, j2) * a ** (i - i2) * cc ** (j - j2) * Mn[(i2, j2, m)]
            out[(i, j, m)] = np.einsum("nqp,q->np", acc, wq)
        M, nodes = out, new
    L0 = _lagrange(nodes, math.sqrt(steps.prior_var) * zq)
    E = {key: wq @ (L0 @ v) for key, v in M.items()}
    # G = A r + C:  E G = E[A r] + E C;  E G^2 = E[A^2 r^2] + 2 E[A C r] + E[C^2]
    return {(1, 0): E[(1, 0, 1)] + E[(0, 1, 0)], (2, 0): E[(2, 0, 2)] + 2 * E[(1, 1, 1)] + E[(0, 2, 0)]}


def _backprop_moments(steps: GridSteps) -> EstimatorMoments:
    """backprop's estimate is a quadratic form xi^T M xi + m^T xi + m0 in xi = (x_0/p, z_0, ..., z_{K-1}) ~ N(0, I):
    mean tr M + m0, variance 2 ||(M + M^T)/2||_F^2 + ||m||^2 (per component)."""
    K, nb, beta = steps.K, steps.nb, steps.beta
    P = 2 * nb
    n = K + 1
    g, o, c, kap = steps.gain[:, 0], steps.offset[:, 0], steps.std[:, 0], steps.kappa[:, 0]
    th0, th1, phi = steps.th0[:, 0], steps.th1[:, 0], steps.phi
    # x_k = X[k] . xi + X0[k]; y_{k,p} = Y[k, p] . xi + Y0[k, p]
    X, X0 = np.zeros((K + 1, n)), np.zeros(K + 1)
    X[0, 0] = math.sqrt(steps.prior_var)
    Y, Y0 = np.zeros((K + 1, P, n)), np.zeros((K + 1, P))
    quad = np.zeros((P, n, n))
    lin, const = np.zeros((P, n)), np.zeros(P)

    def add(p, a_vec, a0, b_vec, b0, w):        # accumulate w (a . xi + a0)(b . xi + b0) into component p
        quad[p] += w * np.outer(a_vec, b_vec)
        lin[p] += w * (a0 * b_vec + b0 * a_vec)
        const[p] += w * a0 * b0

    for k in range(K):
        for p in range(P):
            j = p % nb
            if phi[k, j] == 0:
                psi_v, psi_0 = np.zeros(n), 0.0
            elif p < nb:
                psi_v, psi_0 = np.zeros(n), phi[k, j]
            else:
                psi_v, psi_0 = phi[k, j] * X[k], phi[k, j] * X0[k]
            w = -beta * kap[k] ** 2
            # -beta kappa^2 u (psi_p + th1 y_p),  u = th0 + th1 x
            add(p, th1[k] * X[k], th0[k] + th1[k] * X0[k], psi_v + th1[k] * Y[k, p], psi_0 + th1[k] * Y0[k, p], w)
            Y[k + 1, p] = g[k] * Y[k, p] + steps.B[k] * psi_v
            Y0[k + 1, p] = g[k] * Y0[k, p] + steps.B[k] * psi_0
        X[k + 1] = g[k] * X[k]
        X[k + 1, k + 1] += c[k]
        X0[k + 1] = g[k] * X0[k] + o[k]
    r2, r1, _ = steps.reward[0]
    for p in range(P):
        add(p, 2 * r2 * X[K], 2 * r2 * X0[K] + r1, Y[K, p], Y0[K, p], 1.0)
    sym = 0.5 * (quad + quad.transpose(0, 2, 1))
    mean = np.trace(quad, axis1=1, axis2=2) + const
    var = 2 * (sym**2).sum((1, 2)) + (lin**2).sum(1)
    return EstimatorMoments("backprop", mean, var, 0.0)
