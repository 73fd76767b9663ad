"""Exact policy evaluation, q-function, policy gradients and performance difference for affine policies.

Everything here is exact on the 1-D Gaussian toys, because the policy mean of
:class:`~sacode.theory.affine_policy.AffineScoreFamily` is affine in x and the rewards are quadratic polynomials
(chapter 6). RL time t in [0, T]; the exploratory SDE (eta = 1, chapter 3) is

    dX = [A(t) X + c(t)] dt + g dB,    A = -f + g^2 (k1 + theta1),  c = g^2 (k0 + theta0),   X_0 ~ N(0, p^2),

with s_pre = k1 x + k0. Its law is Gaussian with dm/dt = A m + c and dv/dt = 2 A v + g^2, and the objective is

    J(theta) = E r(X_T) - beta KL(P^theta || P^pre),   KL = E int_0^T (1/2) g^2 (theta0 + theta1 X_t)^2 dt.

The exploration covariance Sigma_t adds -(beta/2) int g^2 tr Sigma_t dt to the action-level running reward. It does
not depend on theta (for the DDPM step Sigma = 1/(g^2 dt) it equals -beta K d / 2, diverging with K), so J leaves it
out; only the q-function keeps tr Sigma, which makes int q dpi = 0.

Contents:
  * moments / objective / discrete_objective  -- J by the moment ODEs (solve_ivp, rtol 1e-10) and J_K of a
    sampler on a grid by the exact moment recursion with per-step transition KLs;
  * value_function                              -- V^theta = p2 x^2 + p1 x + p0 from the Feynman-Kac PDE;
  * q_rate / advantage_rate                     -- closed-form q-function and A^theta(t, x; theta');
  * exact_gradient / finite_difference_gradient -- grad J by the pathwise formula under exact moments;
  * likelihood_ratio_gradient / pathwise_gradient / expected_estimate -- Monte-Carlo estimators and their exact mean;
  * performance_difference                      -- J(theta') - J(theta), L_theta(theta') and the corrected bounds;
  * optimal_* / affine_optimal_objective          -- the optimal control a* = s_pre + grad V*/beta inside the family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .affine_policy import AffineScoreFamily, reward_coefficients
from .rewards import LinearReward
from ..dynamics.gaussian_step import gaussian_chain, gaussian_step
from ..dynamics.grid import TimeGrid
from ..dynamics.samplers import Trajectory, get_step, reverse_sde_sample
from ..dynamics.time import diffusion_time

RTOL, ATOL = 1e-10, 1e-12
"""Tolerances of every ODE solve here (DOP853); exact checks use tolerances derived from them."""


# ------------------------------------------------------------------------------------------------
# ODE plumbing: integrate piecewise between the basis knots (theta(t) has kinks there)
# ------------------------------------------------------------------------------------------------
class _PiecewiseDense:
    """Dense output of a solve split at breakpoints: evaluate y(t) for scalar or array t."""

    def __init__(self, segments: list[tuple[float, float, Callable]]):
        self.segments = segments
        self.lo = np.array([min(a, b) for a, b, _ in segments])
        self.hi = np.array([max(a, b) for a, b, _ in segments])

    def __call__(self, t):
        shape = np.shape(t)
        t_arr = np.asarray(t, dtype=np.float64).reshape(-1)
        idx = np.clip(np.searchsorted(self.hi, t_arr, side="left"), 0, len(self.segments) - 1)
        out = None
        for j in np.unique(idx):
            mask = idx == j
            yj = self.segments[j][2](t_arr[mask])
            if out is None:
                out = np.empty((yj.shape[0], t_arr.size))
            out[:, mask] = yj
        return out[:, 0] if not shape else out.reshape(out.shape[0], *shape)


def _integrate(rhs, y0, t0: float, t1: float, breaks, dense: bool = False, rtol: float = RTOL, atol: float = ATOL):
    """Integrate y' = rhs(t, y) from t0 to t1 (either direction), restarting at each breakpoint in between."""
    lo, hi = min(t0, t1), max(t0, t1)
    inner = sorted(b for b in breaks if lo + 1e-14 < b < hi - 1e-14)
    pts = [t0] + (inner if t1 > t0 else inner[::-1]) + [t1]
    y = np.asarray(y0, dtype=np.float64)
    segments = []
    for a, b in zip(pts[:-1], pts[1:]):
        sol = solve_ivp(rhs, (a, b), y, method="DOP853", rtol=rtol, atol=atol, dense_output=dense)
        if not sol.success:
            raise RuntimeError(f"ODE solve failed on [{a:.4g}, {b:.4g}]: {sol.message}")
        y = sol.y[:, -1]
        if dense:
            segments.append((a, b, sol.sol))
    if dense:
        segments.sort(key=lambda s: min(s[0], s[1]))
    return y, (_PiecewiseDense(segments) if dense else None)


def _prior(family: AffineScoreFamily, mean0: float, var0: float | None) -> tuple[float, float]:
    return float(mean0), float(family.sde.prior_std() ** 2 if var0 is None else var0)


def _kl_factor(eta: float) -> float:
    """Girsanov weight of the eta-family: (1/2) ((1 + eta^2)/(2 eta))^2 (chapter 4)."""
    if eta <= 0:
        raise ValueError("the path KL of a deterministic sampler (eta = 0) is infinite; use eta > 0")
    return 0.5 * ((1.0 + eta * eta) / (2.0 * eta)) ** 2


# ------------------------------------------------------------------------------------------------
# the objective: continuous time (moment ODEs) and a sampler on a grid (moment recursion)
# ------------------------------------------------------------------------------------------------
@dataclass
class PolicyObjective:
    """J = reward_mean - beta * kl, with the terminal law N(mean_T, var_T).

    Continuous time: ``moments`` is the dense solution (m(t), v(t), kl(t)). Grid: ``t`` (K+1,), ``means`` and
    ``vars`` (K+1,) the exact laws of x_k, ``kl_steps`` (K,) the expected per-step transition KLs, and
    ``A``, ``b``, ``step_var`` (K,) the affine steps x_{k+1} = A_k x_k + b_k + sqrt(step_var_k) z.
    """

    objective: float
    reward_mean: float
    kl: float
    mean_T: float
    var_T: float
    eta: float = 1.0
    moments: Callable | None = None
    t: np.ndarray | None = None
    means: np.ndarray | None = None
    vars: np.ndarray | None = None
    kl_steps: np.ndarray | None = None
    A: np.ndarray | None = None
    b: np.ndarray | None = None
    step_var: np.ndarray | None = None


def _terminal_reward_mean(reward, m: float, v: float) -> float:
    r2, r1, r0 = reward_coefficients(reward)
    return r2 * (v + m * m) + r1 * m + r0


def moments(family: AffineScoreFamily, theta, eta: float = 1.0, mean0: float = 0.0, var0: float | None = None,
            t0: float = 0.0, t_end: float | None = None, rtol: float = RTOL) -> tuple[np.ndarray, Callable]:
    """Solve dm = (A m + c) dt, dv = (2 A v + eta^2 g^2) dt and the KL rate from (t0, N(mean0, var0)) to t_end (T).

    Returns the final state (m, v, KL) and the dense solution t -> (m, v, KL accumulated since t0).
    """
    th = family.as_numpy(theta)
    w = _kl_factor(eta)

    def rhs(t, y):
        A, c, g2, th0, th1 = family.drift_coefficients(t, th, eta)
        m, v = y[0], y[1]
        u = th0 + th1 * m
        return [A * m + c, 2.0 * A * v + eta * eta * g2, w * g2 * (u * u + th1 * th1 * v)]

    m0, v0 = _prior(family, mean0, var0)
    return _integrate(rhs, [m0, v0, 0.0], t0, family.T if t_end is None else float(t_end), family.breakpoints(),
                      dense=True, rtol=rtol, atol=ATOL * rtol / RTOL)


def objective(family: AffineScoreFamily, theta, reward, beta: float, eta: float = 1.0, mean0: float = 0.0,
              var0: float | None = None, t_end: float | None = None, rtol: float = RTOL) -> PolicyObjective:
    """Exact continuous-time J(theta) = E r(X_T) - beta E int (1/2)((1+eta^2)/(2 eta))^2 g^2 ||mu - s_pre||^2 dt.

    ``t_end`` < T stops the sampler early (the reward is taken at X_{t_end}), to compare with grids ending at s_end > 0.
    ``rtol`` is the integrator's relative tolerance (absolute tolerance scaled alike).
    """
    y, dense = moments(family, theta, eta, mean0, var0, t_end=t_end, rtol=rtol)
    m, v, kl = y
    er = _terminal_reward_mean(reward, m, v)
    return PolicyObjective(er - beta * kl, er, kl, m, v, eta, moments=dense)


def discrete_objective(family: AffineScoreFamily, theta, reward, beta: float, grid: TimeGrid, method: str = "em",
                       eta: float = 1.0, mean0: float = 0.0, var0: float | None = None) -> PolicyObjective:
    """Exact J_K(theta) of the sampler ``method`` on ``grid``: E r(x_K) - beta sum_k E KL(step_k^theta || step_k^pre).

    Each em/ddim step is the sampler's Gaussian step x' = M_k x + B_k score + std_k z
    (:func:`~sacode.dynamics.gaussian_step.gaussian_step`); with the affine score mu_theta the chain is Gaussian and
    :func:`~sacode.dynamics.gaussian_step.gaussian_chain` propagates it exactly (no Monte-Carlo error). The per-step
    KL between the fine-tuned and pretrained transitions at x is (B_k (mu_theta - s_pre))^2 / (2 std_k^2) (chapter 4);
    its expectation uses the exact law N(m_k, v_k) of x_k. For em at eta = 1 it is (1/2) g^2 dt (mu - s_pre)^2, and
    J_K -> J as the grid is refined.
    """
    if method not in ("em", "ddim"):
        raise ValueError(f"discrete_objective needs a stochastic sampler ('em' or 'ddim'); got {method!r}")
    if eta <= 0:
        raise ValueError("the per-step KL of a deterministic step (eta = 0) is infinite; use eta > 0")
    th = family.as_numpy(theta)
    st = gaussian_step(family.sde, grid.s[:-1], grid.s[1:], method, eta)
    A, B, std = st.A.numpy(), st.B.numpy(), st.std.numpy()
    ts = grid.t.numpy()
    k1, k0, th0, th1 = (np.empty(grid.K) for _ in range(4))
    for k in range(grid.K):
        k1[k], k0[k] = family.pretrained_coefficients(float(ts[k]))
        th0[k], th1[k] = family.theta_at(float(ts[k]), th)
    for k in np.flatnonzero(std <= 0):
        if B[k] != 0 and (th0[k] != 0 or th1[k] != 0):
            raise ValueError(
                f"step {k} of the {method!r} sampler (s = {float(grid.s[k]):.4g} -> {float(grid.s[k + 1]):.4g}) is "
                "deterministic, so its KL is infinite for a policy that differs from s_pre there; for ddim use a "
                "grid that stops at s_end > 0 (TimeGrid.uniform(T, K, s_end=...)) or the 'em' sampler")
    weight = np.where(std > 0, B**2 / np.where(std > 0, std, 1.0) ** 2, 0.0)
    gain, offset = A + B * (k1 + th1), B * (k0 + th0)          # the step x' = gain x + offset + std z
    law = gaussian_chain(gain, offset, std, mean0, _prior(family, mean0, var0)[1], th1, th0, weight)
    means, vars_ = law.means[:, 0], law.covs[:, 0, 0]
    m, v = float(means[-1]), float(vars_[-1])
    er = _terminal_reward_mean(reward, m, v)
    return PolicyObjective(er - beta * law.kl, er, law.kl, m, v, eta, t=ts, means=means, vars=vars_,
                           kl_steps=law.kl_steps, A=gain, b=offset, step_var=std**2)


# ------------------------------------------------------------------------------------------------
# the value function of a policy (Feynman-Kac) and the q-function
# ------------------------------------------------------------------------------------------------
class PolicyValue:
    """V^theta(t, x) = p2(t) x^2 + p1(t) x + p0(t), the expected return from (t, x) under mu_theta (chapter 6).

    It solves d_t V + (A x + c) d_x V + (1/2) g^2 d_xx V - (beta/2) g^2 (theta0 + theta1 x)^2 = 0, V(T, x) = r(x);
    matching powers of x gives the backward linear ODEs

        p2' = -2 A p2 + (beta/2) g^2 theta1^2,
        p1' = -A p1 - 2 c p2 + beta g^2 theta0 theta1,
        p0' = -c p1 - g^2 p2 + (beta/2) g^2 theta0^2,     (p2, p1, p0)(T) = (r2, r1, r0).
    """

    def __init__(self, family: AffineScoreFamily, theta, reward, beta: float):
        self.family, self.beta = family, float(beta)
        self.theta = family.as_numpy(theta)
        th, b = self.theta, self.beta

        def rhs(t, y):
            A, c, g2, th0, th1 = family.drift_coefficients(t, th)
            p2, p1 = y[0], y[1]
            return [-2.0 * A * p2 + 0.5 * b * g2 * th1 * th1,
                    -A * p1 - 2.0 * c * p2 + b * g2 * th0 * th1,
                    -c * p1 - g2 * p2 + 0.5 * b * g2 * th0 * th0]

        self.terminal = reward_coefficients(reward)
        _, self._dense = _integrate(rhs, list(self.terminal), family.T, 0.0, family.breakpoints(), dense=True)

    def coefficients(self, t):
        """(p2, p1, p0) at RL time t (scalar -> floats, array -> arrays)."""
        y = self._dense(t)
        return y[0], y[1], y[2]

    def _coef_t(self, t, x: Tensor):
        tn = torch.as_tensor(t, dtype=torch.float64).detach().cpu().numpy()
        p2, p1, p0 = self.coefficients(tn)
        conv = lambda p: torch.as_tensor(p, dtype=x.dtype, device=x.device)
        return conv(p2), conv(p1), conv(p0)

    def __call__(self, t, x: Tensor) -> Tensor:
        """V^theta(t, x); t a scalar or a tensor broadcastable against x."""
        p2, p1, p0 = self._coef_t(t, x)
        return p2 * x * x + p1 * x + p0

    def grad(self, t, x: Tensor) -> Tensor:
        """grad_x V^theta(t, x) = 2 p2 x + p1."""
        p2, p1, _ = self._coef_t(t, x)
        return 2.0 * p2 * x + p1

    def mean(self, t: float, m: float, v: float) -> float:
        """E V^theta(t, X) for X ~ N(m, v); at t = 0 under the prior it equals J(theta)."""
        p2, p1, p0 = self.coefficients(float(t))
        return float(p2 * (v + m * m) + p1 * m + p0)


def value_function(family: AffineScoreFamily, theta, reward, beta: float) -> PolicyValue:
    """The value function V^theta of the affine policy (see :class:`PolicyValue`)."""
    return PolicyValue(family, theta, reward, beta)


def _g2(family: AffineScoreFamily, t) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    return family.sde.g2(diffusion_time(t, family.T))


def q_rate(family: AffineScoreFamily, theta, value: PolicyValue, beta: float, t, x: Tensor, a: Tensor,
           tr_sigma) -> Tensor:
    """The q-function (advantage rate), chapter 6:

        q(t, x, a) = g^2 [ grad V . (a - mu) - (beta/2)(||a - s_pre||^2 - ||mu - s_pre||^2 - tr Sigma_t) ],

    from q = d_t V + b(t, x, a) . grad V + (1/2) g^2 Lap V + r(t, x, a) with the Feynman-Kac PDE. ``tr_sigma`` is
    tr Sigma_t of the Gaussian exploration policy (for the DDPM step, 1/(g^2 dt)); it makes int q dpi = 0.
    x and a have shape (n,); t is a scalar or has shape (n,).
    """
    t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
    mu = family.action_mean(t, x, theta)
    sp = family.pretrained_score(diffusion_time(t, family.T), x)
    g2 = _g2(family, t).to(x)
    return g2 * (value.grad(t, x) * (a - mu) - 0.5 * beta * ((a - sp) ** 2 - (mu - sp) ** 2 - tr_sigma))


def advantage_rate(family: AffineScoreFamily, theta, theta_new, value: PolicyValue, beta: float, t,
                   x: Tensor) -> Tensor:
    """A^theta(t, x; theta') = int q^theta(t, x, a) pi_theta'(da) for a common Sigma (chapter 6):

        g^2 [ grad V^theta . (mu' - mu) - (beta/2)(||mu' - s_pre||^2 - ||mu - s_pre||^2) ].
    x has shape (n,); t is a scalar or has shape (n,).
    """
    t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
    u = family.control(t, x, theta)
    u_new = family.control(t, x, theta_new)
    g2 = _g2(family, t).to(x)
    return g2 * (value.grad(t, x) * (u_new - u) - 0.5 * beta * (u_new**2 - u**2))


# ------------------------------------------------------------------------------------------------
# exact and finite-difference gradients
# ------------------------------------------------------------------------------------------------
def exact_gradient(family: AffineScoreFamily, theta, reward, beta: float, value: PolicyValue | None = None
                   ) -> np.ndarray:
    """grad_theta J by the pathwise policy-gradient theorem evaluated exactly (chapter 6):

        grad J = E int_0^T g^2 (d mu / d theta)^T (grad V^theta - beta (mu - s_pre)) dt,

    with d mu / d c_{0j} = phi_j(t), d mu / d c_{1j} = phi_j(t) x and G(x) = grad V - beta(mu - s_pre) =
    (2 p2 - beta theta1) x + (p1 - beta theta0); the Gaussian moments give E G and E[x G] in closed form.
    """
    th = family.as_numpy(theta)
    V = value if value is not None else PolicyValue(family, th, reward, beta)
    n = family.basis.n

    def rhs(t, y):
        A, c, g2, th0, th1 = family.drift_coefficients(t, th)
        m, v = y[0], y[1]
        p2, p1, _ = V.coefficients(t)
        u, w = 2.0 * p2 - beta * th1, p1 - beta * th0
        phi = family.basis.vector(t)
        out = np.empty(2 + 2 * n)
        out[0], out[1] = A * m + c, 2.0 * A * v + g2
        out[2:2 + n] = g2 * phi * (u * m + w)
        out[2 + n:] = g2 * phi * (u * (v + m * m) + w * m)
        return out

    m0, v0 = _prior(family, 0.0, None)
    y, _ = _integrate(rhs, np.concatenate([[m0, v0], np.zeros(2 * n)]), 0.0, family.T, family.breakpoints())
    return y[2:]


def finite_difference_gradient(fun: Callable[[np.ndarray], float], theta, h: float = 1e-3,
                               index=None, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Central differences of ``fun`` at ``theta`` with steps h and h/2 (components ``index``, default all).

    Returns the h/2 estimate and an error estimate |D_h - D_{h/2}| + 2 noise / h: the first term is three times
    the O(h^2) truncation error of D_{h/2}, the second bounds the effect of an absolute error ``noise`` in each
    evaluation of ``fun`` (e.g. the ODE tolerance, see :func:`objective_noise`).
    """
    th = np.asarray(theta.detach().cpu().numpy() if isinstance(theta, Tensor) else theta, dtype=np.float64)
    idx = range(th.size) if index is None else np.atleast_1d(index)
    grads, errs = [], []
    for i in idx:
        d = []
        for hh in (h, 0.5 * h):
            e = np.zeros_like(th)
            e[i] = hh
            d.append((fun(th + e) - fun(th - e)) / (2.0 * hh))
        grads.append(d[1])
        errs.append(abs(d[0] - d[1]) + 2.0 * noise / h)
    return np.array(grads), np.array(errs)


def objective_noise(value: float) -> float:
    """A bound on the integration error of an exact objective of size ``value``: 10 RTOL (1 + |value|).

    DOP853's global error stays within a few times its relative tolerance on these smooth, non-stiff
    moment ODEs (checked against rtol = 1e-13 solves in the tests); the factor 10 covers the accumulation.
    """
    return 10.0 * RTOL * (1.0 + abs(value))


# ------------------------------------------------------------------------------------------------
# Monte-Carlo policy-gradient estimators on Euler-Maruyama (DDPM-type) trajectories
# ------------------------------------------------------------------------------------------------
@dataclass
class GradientEstimate:
    """A Monte-Carlo gradient: ``mean`` (P,), ``se`` (P,) its standard error, ``samples`` (n, P) per trajectory."""

    mean: np.ndarray
    se: np.ndarray
    samples: np.ndarray = field(repr=False)

    @classmethod
    def from_samples(cls, samples: Tensor) -> "GradientEstimate":
        s = samples.detach().cpu().numpy()
        return cls(s.mean(0), s.std(0, ddof=1) / math.sqrt(s.shape[0]), s)


def sample_trajectories(family: AffineScoreFamily, theta, n: int, grid: TimeGrid,
                        generator: torch.Generator | None = None, x_init: Tensor | None = None) -> Trajectory:
    """n recorded Euler-Maruyama (eta = 1) trajectories of mu_theta from the prior (or ``x_init``), x of shape (n,)."""
    x0 = family.sde.prior_sample((n,), generator) if x_init is None else x_init
    return reverse_sde_sample(family.sde, family.score_fn(theta), x0, grid, "em", 1.0, generator, record=True)


@dataclass
class _StepQuantities:
    t: Tensor          # (K,) RL times t_k
    dt: Tensor         # (K,)
    g2: Tensor         # (K, 1)
    x: Tensor          # (K, n) states x_k
    x_next: Tensor     # (K, n)
    a: Tensor          # (K, n) actions recovered from the transitions
    mu: Tensor         # (K, n) policy means
    sp: Tensor         # (K, n) pretrained scores
    u: Tensor          # (K, n) mu - s_pre
    phi: Tensor        # (K, nb) basis values


def _step_quantities(family: AffineScoreFamily, theta, traj: Trajectory) -> _StepQuantities:
    if traj.method != "em" or abs(traj.eta - 1.0) > 0 or traj.xs is None:
        raise ValueError("the estimators need recorded Euler-Maruyama trajectories at eta = 1 (the DDPM-type step "
                         "whose transition is the Gaussian score-action policy); sample with "
                         "policy_eval.sample_trajectories or reverse_sde_sample(..., 'em', 1.0, record=True)")
    if traj.xs.ndim != 2:
        raise ValueError(f"the affine toy is 1-D: trajectories must have states of shape (K+1, n); got "
                         f"{tuple(traj.xs.shape)}")
    grid, sde = traj.grid, family.sde
    theta = torch.as_tensor(family.as_numpy(theta))
    s = grid.s[:-1]
    t, dt = grid.t[:-1], grid.dt
    x, x_next = traj.xs[:-1], traj.xs[1:]
    g2 = sde.g2(s)[:, None]
    f = sde.f_coef(s)[:, None]
    # x_{k+1} = x_k + (-f x_k + g^2 a_k) dt  =>  a_k = (x_{k+1} - x_k + f x_k dt) / (g^2 dt)   (chapter 3)
    a = (x_next - x + f * x * dt[:, None]) / (g2 * dt[:, None])
    th0, th1 = family.theta_functions(t, theta)
    a_s, sg = sde.alpha(s)[:, None], sde.sigma(s)[:, None]
    D = a_s**2 * family.s0**2 + sg**2
    sp = -(x - a_s * family.m0) / D
    u = th0[:, None] + th1[:, None] * x
    return _StepQuantities(t, dt, g2, x, x_next, a, sp + u, sp, u, family.basis(t))


def _aggregate(family: AffineScoreFamily, qs: _StepQuantities, W: Tensor) -> GradientEstimate:
    """Per-trajectory sum_k (d mu/d theta)(t_k, x_k) W_k: (phi^T W, phi^T (x W)) -> (n, P)."""
    g0 = qs.phi.T @ W                          # (nb, n)
    g1 = qs.phi.T @ (W * qs.x)
    return GradientEstimate.from_samples(torch.cat([g0, g1], dim=0).T)


def likelihood_ratio_gradient(family: AffineScoreFamily, theta, traj: Trajectory, value: PolicyValue, beta: float,
                              q: str = "exact", reward=None) -> GradientEstimate:
    """Likelihood-ratio estimator sum_k grad_theta log pi(a_k | t_k, x_k) (q dt)_k, averaged over trajectories.

    The Euler-Maruyama step is the score-action policy pi = N(mu_theta, Sigma_k), Sigma_k = 1/(g^2 dt_k), with no
    extra noise (chapter 3): a_k is recovered from (x_k, x_{k+1}) and
    grad log pi = Sigma^{-1}(a - mu) d mu/d theta = g^2 dt (a - mu) d mu/d theta. The running reward is centred,
    r_k dt = -(beta/2) g^2 dt (||a_k - s_pre||^2 - Sigma_k) (its mean over a is -beta KL_k). Choices of (q dt)_k:

    * ``"exact"``:  q(t_k, x_k, a_k) dt with the closed-form q of :func:`q_rate` (needs only grad V);
    * ``"td"``:     V(t_{k+1}, x_{k+1}) - V(t_k, x_k) + r_k dt (the TD form, chapter 6);
    * ``"return"``: reward-to-go minus the baseline V(t_k, x_k) (REINFORCE; needs ``reward``).

    All three have the same limit as the grid is refined; their exact means on a grid are in
    :func:`expected_estimate`.
    """
    qs = _step_quantities(family, theta, traj)
    dt = qs.dt[:, None]
    sigma = 1.0 / (qs.g2 * dt)
    score_w = qs.g2 * dt * (qs.a - qs.mu)                       # Sigma^{-1}(a - mu)
    r_dt = -0.5 * beta * qs.g2 * dt * ((qs.a - qs.sp) ** 2 - sigma)
    if q == "exact":
        gV = value.grad(qs.t[:, None], qs.x)
        q_dt = qs.g2 * dt * (gV * (qs.a - qs.mu)
                             - 0.5 * beta * ((qs.a - qs.sp) ** 2 - (qs.mu - qs.sp) ** 2 - sigma))
    elif q == "td":
        tn = traj.grid.t
        q_dt = value(tn[1:, None], qs.x_next) - value(tn[:-1, None], qs.x) + r_dt
    elif q == "return":
        if reward is None:
            raise ValueError("q='return' needs the terminal reward (reward=...)")
        r_T = reward(traj.xs[-1])                               # (n,)
        to_go = torch.flip(torch.cumsum(torch.flip(r_dt, [0]), 0), [0]) + r_T[None]
        q_dt = to_go - value(traj.grid.t[:-1, None], qs.x)
    else:
        raise ValueError(f"unknown q estimator {q!r}; choose 'exact', 'td' or 'return'")
    return _aggregate(family, qs, score_w * q_dt)


def pathwise_gradient(family: AffineScoreFamily, theta, traj: Trajectory, value: PolicyValue,
                      beta: float) -> GradientEstimate:
    """Pathwise estimator sum_k g^2 dt_k (d mu/d theta)^T (grad V^theta - beta (mu - s_pre)) at (t_k, x_k)."""
    qs = _step_quantities(family, theta, traj)
    gV = value.grad(qs.t[:, None], qs.x)
    return _aggregate(family, qs, qs.g2 * qs.dt[:, None] * (gV - beta * qs.u))


def expected_estimate(family: AffineScoreFamily, theta, value: PolicyValue, beta: float, grid: TimeGrid,
                      form: str, reward=None) -> np.ndarray:
    """The exact mean of an estimator on ``grid`` (its discretisation bias is this minus grad J).

    With x_k ~ N(m_k, v_k) the exact law of the Euler-Maruyama chain and z_k independent of x_k:
    ``"pathwise"`` and ``"lr-exact"`` both have mean sum_k g^2 dt E[(d mu/d theta)(x_k) G_k(x_k)] with
    G_k = grad V(t_k, .) - beta (mu - s_pre); ``"lr-td"`` has the same with grad V(t_{k+1}, A_k x + b_k) (Stein's
    lemma on the quadratic V); ``"lr-return"`` is unbiased for the grid objective, so its mean is grad J_K
    (finite differences of :func:`discrete_objective`, needs ``reward``).
    """
    th = family.as_numpy(theta)
    if form == "lr-return":
        if reward is None:
            raise ValueError("form='lr-return' needs reward=...")
        g, _ = finite_difference_gradient(lambda p: discrete_objective(family, p, reward, beta, grid).objective, th)
        return g
    if form not in ("pathwise", "lr-exact", "lr-td"):
        raise ValueError(f"unknown form {form!r}; choose 'pathwise', 'lr-exact', 'lr-td' or 'lr-return'")
    d = discrete_objective(family, th, reward if reward is not None else LinearReward([0.0]), beta, grid)
    n = family.basis.n
    out = np.zeros(2 * n)
    ts = grid.t.numpy()
    dts = grid.dt.numpy()
    g2s = family.sde.g2(grid.s[:-1]).numpy()
    for k in range(grid.K):
        m, v = d.means[k], d.vars[k]
        th0, th1 = family.theta_at(float(ts[k]), th)
        if form == "lr-td":
            p2, p1, _ = value.coefficients(float(ts[k + 1]))
            slope, icpt = 2.0 * p2 * d.A[k] - beta * th1, 2.0 * p2 * d.b[k] + p1 - beta * th0
        else:
            p2, p1, _ = value.coefficients(float(ts[k]))
            slope, icpt = 2.0 * p2 - beta * th1, p1 - beta * th0
        phi = family.basis.vector(float(ts[k]))
        w = g2s[k] * dts[k]
        out[:n] += w * phi * (slope * m + icpt)
        out[n:] += w * phi * (slope * (v + m * m) + icpt * m)
    return out


# ------------------------------------------------------------------------------------------------
# Monte-Carlo returns (for checking V^theta)
# ------------------------------------------------------------------------------------------------
def sample_returns(family: AffineScoreFamily, theta, reward, beta: float, grid: TimeGrid, x_init: Tensor,
                   generator: torch.Generator | None = None, method: str = "em", eta: float = 1.0) -> Tensor:
    """Returns r(x_K) - beta sum_k KL(step_k^theta(x_k) || step_k^pre(x_k)) of sampled trajectories, shape (n,).

    The per-step KL compares the recorded transition mean with the pretrained step's mean at the same state
    (common std), so its expectation is exactly the grid objective of :func:`discrete_objective`.
    """
    step = get_step(method)
    traj = reverse_sde_sample(family.sde, family.score_fn(theta), x_init, grid, method, eta, generator, record=True)
    kl = torch.zeros_like(x_init)
    for k in range(grid.K):
        pre = step(family.sde, family.pretrained_score, traj.xs[k], grid.s[k], grid.s[k + 1], None, eta=eta).mean
        kl = kl + (traj.means[k] - pre) ** 2 / (2.0 * traj.stds[k] ** 2)
    return reward(traj.x) - beta * kl


# ------------------------------------------------------------------------------------------------
# performance difference, local approximation and the corrected trust-region bounds
# ------------------------------------------------------------------------------------------------
@dataclass
class PerformanceDifference:
    """Exact performance-difference quantities for theta -> theta' (chapter 6, with corrected bounds).

    difference      J(theta') - J(theta) from two objective solves
    pdl             E^{theta'} int A^theta(t, X_t; theta') dt (the performance-difference formula)
    local           L_theta(theta') - J(theta) = E^theta int A^theta dt (the local approximation)
    kl_path         KL(P^theta' || P^theta) = E^theta' int (1/2) g^2 (mu' - mu)^2 dt
    bound_marginal  int sqrt(2 (E' A_t^2 + E A_t^2) KL(p'_t || p_t)) dt      (marginal laws p_t, p'_t at time t)
    bound_path      sqrt(2 KL_path) int sqrt(E' A_t^2 + E A_t^2) dt          (>= bound_marginal)
    bound_sup       T sup_{t, x} |A| sqrt(2 KL_path): the sup-norm bound, +inf unless A is constant in x
    """

    j_old: float
    j_new: float
    difference: float
    pdl: float
    local: float
    kl_path: float
    bound_marginal: float
    bound_path: float
    bound_sup: float

    @property
    def local_error(self) -> float:
        """|J(theta') - L_theta(theta')|."""
        return abs(self.difference - self.local)


def _gauss_moments4(m: float, v: float) -> tuple[float, float, float, float]:
    return m, m * m + v, m**3 + 3 * m * v, m**4 + 6 * m * m * v + 3 * v * v


def _quad_moments(c2: float, c1: float, c0: float, m: float, v: float) -> tuple[float, float]:
    """E[P] and E[P^2] for P(x) = c2 x^2 + c1 x + c0, x ~ N(m, v)."""
    e1, e2, e3, e4 = _gauss_moments4(m, v)
    ep = c2 * e2 + c1 * e1 + c0
    ep2 = c2 * c2 * e4 + 2 * c2 * c1 * e3 + (c1 * c1 + 2 * c2 * c0) * e2 + 2 * c1 * c0 * e1 + c0 * c0
    return ep, ep2


def _advantage_coefficients(family, V, th, thn, beta, t):
    """A^theta(t, x; theta') = a2 x^2 + a1 x + a0, and the control difference (d0, d1), at scalar t."""
    _, _, g2, th0, th1 = family.drift_coefficients(t, th)
    n0, n1 = family.theta_at(t, thn)
    p2, p1, _ = V.coefficients(t)
    d0, d1 = n0 - th0, n1 - th1
    a2 = g2 * (2 * p2 * d1 - 0.5 * beta * (n1 * n1 - th1 * th1))
    a1 = g2 * (2 * p2 * d0 + p1 * d1 - beta * (n0 * n1 - th0 * th1))
    a0 = g2 * (p1 * d0 - 0.5 * beta * (n0 * n0 - th0 * th0))
    return a2, a1, a0, d0, d1, g2


def performance_difference(family: AffineScoreFamily, theta, theta_new, reward, beta: float,
                           n_sup: int = 2001) -> PerformanceDifference:
    """J(theta') - J(theta), the performance-difference formula, L_theta(theta') and the bounds, all exact.

    The laws of X under theta and theta' are Gaussian (two moment ODEs, integrated jointly with the integrals
    below), and A^theta is a quadratic polynomial in x, so E A and E A^2 are closed-form moments. The bound: since
    A_t depends on X_t only, J(theta') - L_theta(theta') = int_0^T (E^{theta'} - E^theta)[A_t(X_t)] dt, and for any F,
    |E_P F - E_Q F| <= sqrt(2 (E_P F^2 + E_Q F^2)) sqrt(KL(P || Q)) (Cauchy-Schwarz after writing p - q =
    (sqrt p - sqrt q)(sqrt p + sqrt q), and int (sqrt p - sqrt q)^2 <= KL). Data processing bounds the marginal KL
    by the path KL. ``bound_sup`` is evaluated on ``n_sup`` times.
    """
    th, thn = family.as_numpy(theta), family.as_numpy(theta_new)
    V = PolicyValue(family, th, reward, beta)

    def rhs(t, y):
        A, c, g2, _, _ = family.drift_coefficients(t, th)
        An, cn, _, _, _ = family.drift_coefficients(t, thn)
        m, v, mn, vn = y[0], y[1], y[2], y[3]
        a2, a1, a0, d0, d1, _ = _advantage_coefficients(family, V, th, thn, beta, t)
        eA, eA2 = _quad_moments(a2, a1, a0, m, v)
        eAn, eA2n = _quad_moments(a2, a1, a0, mn, vn)
        kl_t = 0.5 * (vn / v + (mn - m) ** 2 / v - 1.0 + math.log(v / vn))
        s2 = max(eA2 + eA2n, 0.0)
        return [A * m + c, 2 * A * v + g2, An * mn + cn, 2 * An * vn + g2,
                eAn, eA, 0.5 * g2 * ((d0 + d1 * mn) ** 2 + d1 * d1 * vn),
                math.sqrt(2.0 * s2 * max(kl_t, 0.0)), math.sqrt(s2)]

    m0, v0 = _prior(family, 0.0, None)
    y, _ = _integrate(rhs, [m0, v0, m0, v0, 0, 0, 0, 0, 0], 0.0, family.T, family.breakpoints())
    pdl, local, kl, b_marg, s_path = y[4:]
    j_old = objective(family, th, reward, beta).objective
    j_new = objective(family, thn, reward, beta).objective
    sup = 0.0
    for t in np.linspace(0.0, family.T, n_sup):
        a2, a1, a0, *_ = _advantage_coefficients(family, V, th, thn, beta, float(t))
        if abs(a2) > 1e-14 or abs(a1) > 1e-14:
            sup = math.inf
            break
        sup = max(sup, abs(a0))
    bound_sup = family.T * sup * math.sqrt(2 * kl) if sup < math.inf else math.inf
    return PerformanceDifference(j_old, j_new, j_new - j_old, pdl, local, kl, b_marg,
                                 math.sqrt(2 * kl) * s_path, bound_sup)


@dataclass
class ScalarEstimate:
    """A Monte-Carlo mean with its standard error and the per-trajectory samples."""

    mean: float
    se: float
    samples: np.ndarray = field(repr=False)

    @classmethod
    def from_samples(cls, samples: Tensor) -> "ScalarEstimate":
        s = samples.detach().cpu().numpy()
        return cls(float(s.mean()), float(s.std(ddof=1) / math.sqrt(s.size)), s)


def importance_weighted_surrogate(family: AffineScoreFamily, theta, theta_new, traj: Trajectory, value: PolicyValue,
                                  beta: float, clip: float | None = None, kl: str = "exact") -> ScalarEstimate:
    """The sample estimate of L_theta(theta') - J(theta) that TRPO/PPO maximise, from theta's own trajectories.

    Per-step ratios rho_k = pi_theta'(a_k | t_k, x_k) / pi_theta(a_k | t_k, x_k) of the Euler-Maruyama step's
    Gaussian policies N(mu, 1/(g^2 dt)), log rho_k = g^2 dt [(a - mu)^2 - (a - mu')^2] / 2, weight the exact q:

    * ``kl="sampled"``: sum_k rho_k (q dt)_k with the closed-form q of :func:`q_rate`. Its q contains the
      action-level KL noise -(beta/2)(z_k^2 - 1) of every step, so its variance grows like K (for beta > 0).
    * ``kl="exact"`` (default): only the grad V part is importance-weighted,
      sum_k [rho_k g^2 dt grad V (a_k - mu) - (beta/2) g^2 dt (||mu' - s_pre||^2 - ||mu - s_pre||^2)], since the KL part
      of A^theta is a known function of the state. Same mean, variance bounded in K.

    Both have mean sum_k dt E^theta A^theta(t_k, x_k; theta') (:func:`expected_surrogate`), because
    E_{a ~ pi_theta}[rho h(a)] = E_{a ~ pi_theta'}[h(a)]. ``clip`` = epsilon applies PPO's pessimistic
    min(rho w, clip(rho, 1 - eps, 1 + eps) w) to the importance-weighted term w of each step.
    """
    if kl not in ("exact", "sampled"):
        raise ValueError(f"kl must be 'exact' or 'sampled'; got {kl!r}")
    qs = _step_quantities(family, theta, traj)
    dt = qs.dt[:, None]
    gV = value.grad(qs.t[:, None], qs.x)
    th0n, th1n = family.theta_functions(qs.t, torch.as_tensor(family.as_numpy(theta_new)))
    u_new = th0n[:, None] + th1n[:, None] * qs.x
    mu_new = qs.sp + u_new
    rho = torch.exp(0.5 * qs.g2 * dt * ((qs.a - qs.mu) ** 2 - (qs.a - mu_new) ** 2))
    if kl == "sampled":
        sigma = 1.0 / (qs.g2 * dt)
        w = qs.g2 * dt * (gV * (qs.a - qs.mu) - 0.5 * beta * ((qs.a - qs.sp) ** 2 - qs.u**2 - sigma))
        c = torch.zeros_like(w)
    else:
        w = qs.g2 * dt * gV * (qs.a - qs.mu)
        c = -0.5 * beta * qs.g2 * dt * (u_new**2 - qs.u**2)
    terms = rho * w
    if clip is not None:
        terms = torch.minimum(terms, torch.clamp(rho, 1.0 - clip, 1.0 + clip) * w)
    return ScalarEstimate.from_samples((terms + c).sum(0))


def expected_surrogate(family: AffineScoreFamily, theta, theta_new, value: PolicyValue, beta: float,
                       grid: TimeGrid) -> float:
    """Exact mean of the unclipped :func:`importance_weighted_surrogate` on ``grid``: sum_k dt E A^theta(t_k, x_k)."""
    th, thn = family.as_numpy(theta), family.as_numpy(theta_new)
    d = discrete_objective(family, th, LinearReward([0.0]), beta, grid)
    ts, dts = grid.t.numpy(), grid.dt.numpy()
    total = 0.0
    for k in range(grid.K):
        a2, a1, a0, *_ = _advantage_coefficients(family, value, th, thn, beta, float(ts[k]))
        total += dts[k] * _quad_moments(a2, a1, a0, d.means[k], d.vars[k])[0]
    return float(total)


def path_kl(family: AffineScoreFamily, theta_p, theta_q) -> float:
    """KL(P^{theta_p} || P^{theta_q}) = E^{theta_p} int (1/2) g^2 (mu_p - mu_q)^2 dt (Girsanov; common prior)."""
    tp, tq = family.as_numpy(theta_p), family.as_numpy(theta_q)

    def rhs(t, y):
        A, c, g2, p0, p1 = family.drift_coefficients(t, tp)
        q0, q1 = family.theta_at(t, tq)
        d0, d1 = p0 - q0, p1 - q1
        m, v = y[0], y[1]
        return [A * m + c, 2 * A * v + g2, 0.5 * g2 * ((d0 + d1 * m) ** 2 + d1 * d1 * v)]

    m0, v0 = _prior(family, 0.0, None)
    y, _ = _integrate(rhs, [m0, v0, 0.0], 0.0, family.T, family.breakpoints())
    return float(y[2])


# ------------------------------------------------------------------------------------------------
# the optimal control inside the affine family (Doob h-transform, chapter 5)
# ------------------------------------------------------------------------------------------------
def _posterior_gain(family: AffineScoreFamily, t):
    """(alpha, G, v_post) at RL time t: E[Y_0 | Y_s = x] = m0 + G (x - alpha m0), Var = v_post (s = T - t)."""
    t = np.asarray(t, dtype=np.float64)
    s = torch.as_tensor(diffusion_time(t, family.T), dtype=torch.float64)
    a, sg2 = family.sde.alpha(s).numpy(), family.sde.sigma(s).numpy() ** 2
    D = a * a * family.s0**2 + sg2
    return a, a * family.s0**2 / D, family.s0**2 * sg2 / D


def optimal_value_coefficients(family: AffineScoreFamily, reward, beta: float, t):
    """(q2, q1, q0) with V*(t, x) = q2 x^2 + q1 x + q0 = beta log E[exp(r(Y_0)/beta) | Y_{T-t} = x].

    With r/beta = rho2 y^2 + rho1 y + rho0 and Y_0 | Y_s = x ~ N(M(x), v), M(x) = G x + e, e = m0 (1 - G alpha),
    E exp(rho2 Y^2 + rho1 Y) = (1 - 2 rho2 v)^{-1/2} exp((rho2 M^2 + rho1 M + rho1^2 v / 2)/(1 - 2 rho2 v)).
    The pretrained reverse SDE with the exact score has the forward bridge as its transition law, whatever the
    initial law, so this is exact also with the fixed N(0, p^2) start.
    """
    r2, r1, r0 = reward_coefficients(reward)
    rho2, rho1, rho0 = r2 / beta, r1 / beta, r0 / beta
    a, G, v = _posterior_gain(family, t)
    den = 1.0 - 2.0 * rho2 * v
    e = family.m0 * (1.0 - G * a)
    q2 = beta * rho2 * G * G / den
    q1 = beta * (2 * rho2 * G * e + rho1 * G) / den
    q0 = beta * (-0.5 * np.log(den) + (rho2 * e * e + rho1 * e + 0.5 * rho1 * rho1 * v) / den + rho0)
    return q2, q1, q0


def optimal_affine_control(family: AffineScoreFamily, reward, beta: float):
    """(theta0*, theta1*) as functions of RL time: a* - s_pre = grad V*/beta = theta1* x + theta0*.

    Linear reward: theta0* = alpha s0^2 w / (beta D), theta1* = 0 (chapter 5). Quadratic reward: both nonzero;
    a* equals the noised tilted score exactly (Z p~_s / p_s is the h-function), for every t.
    """
    def th0(t):
        _, q1, _ = optimal_value_coefficients(family, reward, beta, t)
        return q1 / beta

    def th1(t):
        q2, _, _ = optimal_value_coefficients(family, reward, beta, t)
        return 2.0 * q2 / beta

    return th0, th1


def optimal_family(family: AffineScoreFamily, reward, beta: float) -> AffineScoreFamily:
    """The family re-centred on the optimal control: theta = 0 is a*, the basis perturbs around it."""
    th0, th1 = optimal_affine_control(family, reward, beta)
    return family.with_offsets(th0, th1)


def affine_optimal_objective(family: AffineScoreFamily, reward, beta: float) -> float:
    """J* = E V*(0, X_0) with X_0 ~ N(0, p^2) the fixed sampler prior (closed form)."""
    q2, _, q0 = optimal_value_coefficients(family, reward, beta, 0.0)
    return float(q2 * family.sde.prior_std() ** 2 + q0)
