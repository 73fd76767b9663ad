"""The reverse sampler as a controlled SDE: the score is the action (theory-notes sections 1.3-1.4; chapter 3).

In RL time t = T - s (t = 0 noise, t = T data; conversions through :mod:`sacode.time`) the pretrained sampler
is the controlled state equation dX_t = b(t, X_t, a_t) dt + sigma(t) dB_t with

    b(t, x, a) = -f(T - t, x) + g(T - t)^2 a,          sigma(t) = g(T - t),

and the action a in R^d is the value of the score (Zhao et al. 2024, 2025). The action enters the drift only,
and affinely. Fine-tuning maximises E[h(X_T)] - beta KL(P^theta || P^pre); by Girsanov (chapter 4) the KL
is the integral of the running reward

    r(t, x, a) = -(beta / 2) g(T - t)^2 || a - s_pre(T - t, x) ||^2.

A Gaussian score-action policy pi(a | t, x) = N(mu(t, x), std(t)^2 I) explores around its mean. Because b is
affine in a and sigma does not depend on a, the exploratory (relaxed) SDE of Wang, Zariphopoulou and Zhou
(2020) averages the drift over pi: dX = b(t, X, mu(t, X)) dt + sigma(t) dB. The exploration covariance does
not change the continuous-time state law.

Discretisation identity (theory-notes 1.4, generalised). Every Gaussian step of :mod:`sacode.samplers`
(``em`` and ``ddim`` with any eta > 0) has a mean affine in the score,

    x_{k+1} = A_k x_k + B_k score(s_k, x_k) + std_k z,

so it *is* the deterministic map x_{k+1} = A_k x_k + B_k a_k with a score-action a_k ~ N(score, (std_k/B_k)^2 I).
For Euler-Maruyama (eta = 1), B_k = g^2 dt and std_k = g sqrt(dt), so the policy covariance is I / (g^2 dt);
for DDIM, B_k = alpha_n sigma_c^2 / alpha_c - sigma_c sqrt(sigma_n^2 - c^2). By the change of variables,
log p(x_{k+1} | x_k) = log pi(a_k | t_k, x_k) - d log |B_k|.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ._shapes import as_time, event_dim, expand_time, sum_event
from .samplers import TimeGrid, Trajectory, gaussian_log_prob
from .sde import LinearSDE, ScoreFn
from .time import diffusion_time

StdFn = Callable[[Tensor], Tensor]
"""An exploration std ``std(t)``: RL time t of shape (n,) -> std of shape (n,)."""


def _rl_time(t: float | Tensor, x: Tensor) -> Tensor:
    return as_time(t, x)


# ------------------------------------------------------------------------------------------------
# the control problem
# ------------------------------------------------------------------------------------------------
class ScoreControlProblem:
    """The fine-tuning problem as a stochastic control problem in RL time (theory-notes 1.3 and 2.1).

    Args:
        sde: the forward SDE (diffusion time s).
        s_pre: the pretrained score ``s_pre(s, x)`` in diffusion time.
        reward: terminal reward h(x) (x of shape (n, *event) -> (n,)), or None when only the dynamics are used.
        beta: KL weight beta >= 0.
    """

    def __init__(self, sde: LinearSDE, s_pre: ScoreFn, reward: Callable[[Tensor], Tensor] | None = None,
                 beta: float = 1.0):
        if beta < 0:
            raise ValueError(f"the KL weight beta must be >= 0; got {beta}")
        self.sde, self.s_pre, self.reward, self.beta = sde, s_pre, reward, float(beta)

    @property
    def T(self) -> float:
        return self.sde.T

    def _s(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Diffusion time s = T - t of RL time t, shape (n,)."""
        return diffusion_time(_rl_time(t, x), self.T)

    # --- dynamics ---------------------------------------------------------------------------------
    def b(self, t: float | Tensor, x: Tensor, a: Tensor) -> Tensor:
        """State drift b(t, x, a) = -f(T - t, x) + g(T - t)^2 a (theory-notes 1.3)."""
        if a.shape != x.shape:
            raise ValueError(f"the action must have the shape of the state {tuple(x.shape)}; got {tuple(a.shape)}")
        s = self._s(t, x)
        return -self.sde.drift(s, x) + expand_time(self.sde.g2(s), x) * a

    def sigma(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Diffusion coefficient sigma(t) = g(T - t), per sample, shape (n,) (it depends on t only)."""
        return self.sde.g(self._s(t, x))

    def pretrained_action(self, t: float | Tensor, x: Tensor) -> Tensor:
        """The pretrained score as an action: s_pre(T - t, x)."""
        return self.s_pre(self._s(t, x), x)

    # --- rewards ----------------------------------------------------------------------------------
    def running_reward(self, t: float | Tensor, x: Tensor, a: Tensor) -> Tensor:
        """r(t, x, a) = -(beta/2) g(T - t)^2 ||a - s_pre(T - t, x)||^2, shape (n,) (theory-notes 2.1)."""
        s = self._s(t, x)
        return -0.5 * self.beta * self.sde.g2(s) * sum_event((a - self.s_pre(s, x)) ** 2)

    def mean_running_reward(self, t: float | Tensor, x: Tensor, policy: "ScoreActionPolicy") -> Tensor:
        """E_{a ~ pi}[r(t, x, a)] = -(beta/2) g^2 (||mu - s_pre||^2 + tr Sigma_t) (theory-notes 2.2)."""
        s = self._s(t, x)
        tr = event_dim(x) * policy.std(t, x) ** 2
        return -0.5 * self.beta * self.sde.g2(s) * (sum_event((policy.mean(t, x) - self.s_pre(s, x)) ** 2) + tr)

    def terminal_reward(self, x: Tensor) -> Tensor:
        """h(x), the reward of the generated sample X_T."""
        if self.reward is None:
            raise ValueError("this ScoreControlProblem has no terminal reward; pass reward=... when building it")
        return self.reward(x)

    def exploratory_sde(self, policy: "ScoreActionPolicy", event_shape: tuple[int, ...] | None = None
                        ) -> "ExploratorySDE":
        """The relaxed SDE dX = b(t, X, mu(t, X)) dt + sigma(t) dB (torchsde protocol, with the prior drift h)."""
        return ExploratorySDE(self, policy, event_shape)

    def __repr__(self):
        return f"ScoreControlProblem(sde={self.sde!r}, beta={self.beta}, reward={self.reward!r})"


# ------------------------------------------------------------------------------------------------
# the Gaussian score-action policy
# ------------------------------------------------------------------------------------------------
class ScoreActionPolicy:
    """pi(a | t, x) = N(mu(t, x), std(t)^2 I) with mean mu(t, x) = score_fn(T - t, x) (theory-notes 1.4).

    Args:
        score_fn: the mean as a score ``score(s, x)`` in diffusion time (pretrained or fine-tuned).
        std: the exploration std, a float or a callable ``std(t)`` of RL time (shape (n,) -> (n,)).
        T: horizon (``sde.T``).
    """

    def __init__(self, score_fn: ScoreFn, std: float | StdFn, T: float):
        if not callable(std):
            if not (float(std) >= 0 and math.isfinite(float(std))):
                raise ValueError(f"the exploration std must be a finite number >= 0; got {std}")
        self.score_fn, self._std, self.T = score_fn, std, float(T)

    def mean(self, t: float | Tensor, x: Tensor) -> Tensor:
        """mu(t, x) = score_fn(T - t, x)."""
        return self.score_fn(diffusion_time(_rl_time(t, x), self.T), x)

    def std(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Exploration std at RL time t, shape (n,)."""
        tt = _rl_time(t, x)
        if callable(self._std):
            out = torch.as_tensor(self._std(tt), dtype=x.dtype, device=x.device)
            return out.expand(x.shape[0]) if out.ndim == 0 else out
        return torch.full_like(tt, float(self._std))

    def log_prob(self, t: float | Tensor, x: Tensor, a: Tensor) -> Tensor:
        """log pi(a | t, x), summed over the event dimensions (DESIGN.md decision 6); shape (n,)."""
        std = self.std(t, x)
        if not bool((std > 0).all()):
            raise ValueError("log_prob needs a positive exploration std; a deterministic policy has no density")
        return gaussian_log_prob(a, self.mean(t, x), std)

    def sample(self, t: float | Tensor, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a ~ pi(. | t, x)."""
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.mean(t, x) + expand_time(self.std(t, x), x) * z

    def entropy(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Differential entropy d/2 log(2 pi e std^2), shape (n,)."""
        return 0.5 * event_dim(x) * torch.log(2 * math.pi * math.e * self.std(t, x) ** 2)

    @classmethod
    def of_sampler(cls, sde: LinearSDE, score_fn: ScoreFn, grid: TimeGrid, method: str = "em",
                   eta: float = 1.0) -> "ScoreActionPolicy":
        """The score-action policy that a Gaussian sampler step *is*: std(t_k) = std_k / |B_k| on ``grid``.

        The policy is defined at the grid's step-start times t_0, ..., t_{K-1} only (a different step size is a
        different policy); other times raise an error.
        """
        coef = step_coefficients(sde, grid.s[:-1], grid.s[1:], method, eta)
        pstd = coef.policy_std
        tk = grid.t[:-1]

        def std(t: Tensor) -> Tensor:
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
            k = torch.argmin((t[:, None] - tk[None, :]).abs(), dim=1)
            if not bool(((t - tk[k]).abs() <= 1e-12 * max(1.0, grid.T)).all()):
                raise ValueError("this policy comes from a sampler step and is defined only at the step-start "
                                 "RL times grid.t[:-1]; evaluate it there")
            return pstd[k]

        return cls(score_fn, std, grid.T)


class ExploratorySDE:
    """The exploratory (relaxed) SDE dX = b(t, X, mu(t, X)) dt + sigma(t) dB in RL time (theory-notes 1.4).

    torchsde protocol (diagonal Ito noise, y of shape (n, d)); ``h`` is the pretrained drift b(t, x, s_pre), so
    ``torchsde.sdeint(sde, y0, ts, logqp=True)`` returns the Girsanov log-ratio increments of chapter 4.
    ``event_shape`` reshapes torchsde's (n, d) states for the score functions ((), for a 1-D law on x of shape (n,)).
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, problem: ScoreControlProblem, policy: ScoreActionPolicy,
                 event_shape: tuple[int, ...] | None = None):
        if abs(policy.T - problem.T) > 1e-12:
            raise ValueError(f"policy horizon T={policy.T} differs from the problem's T={problem.T}")
        self.problem, self.policy, self.event_shape = problem, policy, event_shape

    def _x(self, y: Tensor) -> Tensor:
        return y if self.event_shape is None else y.reshape(y.shape[0], *self.event_shape)

    def _y(self, x: Tensor, y: Tensor) -> Tensor:
        return x.reshape(y.shape)

    def drift(self, t: float | Tensor, x: Tensor) -> Tensor:
        return self.problem.b(t, x, self.policy.mean(t, x))

    def prior_drift(self, t: float | Tensor, x: Tensor) -> Tensor:
        return self.problem.b(t, x, self.problem.pretrained_action(t, x))

    def diffusion(self, t: float | Tensor, x: Tensor) -> Tensor:
        return expand_time(self.problem.sigma(t, x), x).expand_as(x)

    # torchsde protocol
    def f(self, t: Tensor, y: Tensor) -> Tensor:
        x = self._x(y)
        return self._y(self.drift(t.to(y.dtype), x), y)

    def h(self, t: Tensor, y: Tensor) -> Tensor:
        x = self._x(y)
        return self._y(self.prior_drift(t.to(y.dtype), x), y)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        x = self._x(y)
        return self._y(self.diffusion(t.to(y.dtype), x), y)


# ------------------------------------------------------------------------------------------------
# sampler steps as score-action policies
# ------------------------------------------------------------------------------------------------
class StepAsPolicy(NamedTuple):
    """x_{k+1} = A x_k + B score + std z: the coefficients of one Gaussian sampler step."""

    A: Tensor
    B: Tensor
    std: Tensor

    @property
    def policy_std(self) -> Tensor:
        """Std of the equivalent score-action policy, std / |B| (covariance (std / B)^2 I)."""
        return self.std / self.B.abs()


def step_coefficients(sde: LinearSDE, s_cur: float | Tensor, s_next: float | Tensor, method: str = "em",
                      eta: float = 1.0) -> StepAsPolicy:
    """A, B and std of the ``em`` or ``ddim`` step from s_cur to s_next < s_cur (any shape of times).

    em   (eta-family Euler-Maruyama, step h = s_cur - s_next, f(s, x) = f(s) x):
         A = 1 - f(s_cur) h,  B = (1 + eta^2)/2 g(s_cur)^2 h,  std = eta g(s_cur) sqrt(h).
    ddim (Song, Meng, Ermon 2021, eq. 12, in alpha/sigma form; c as in :func:`sacode.samplers.ddim_step`):
         A = alpha_n / alpha_c,  B = alpha_n sigma_c^2 / alpha_c - sigma_c sqrt(sigma_n^2 - c^2),  std = c.
    With eta = 1 the em policy covariance (std/B)^2 is 1 / (g^2 h), theory-notes 1.4.
    """
    sc = torch.as_tensor(s_cur, dtype=torch.float64)
    sn = torch.as_tensor(s_next, dtype=torch.float64)
    if not bool((sn < sc).all()):
        raise ValueError("a sampler step goes from s_cur to a smaller diffusion time s_next < s_cur")
    if method == "em":
        h = sc - sn
        A = 1.0 - sde.f_coef(sc) * h
        B = 0.5 * (1.0 + eta**2) * sde.g2(sc) * h
        std = eta * sde.g(sc) * torch.sqrt(h)
    elif method == "ddim":
        a_c, a_n, g_c, g_n = sde.alpha(sc), sde.alpha(sn), sde.sigma(sc), sde.sigma(sn)
        c2 = ((eta**2) * g_n**2 * (1.0 - (a_c * g_n) ** 2 / (a_n * g_c) ** 2)).clamp_min(0.0)
        A = a_n / a_c
        B = a_n * g_c**2 / a_c - g_c * torch.sqrt((g_n**2 - c2).clamp_min(0.0))
        std = torch.sqrt(c2)
    else:
        raise ValueError(f"step_coefficients covers the Gaussian steps 'em' and 'ddim'; got method {method!r}")
    return StepAsPolicy(A, B, std)


def action_of_transition(x: Tensor, x_next: Tensor, coef: StepAsPolicy) -> Tensor:
    """The score-action a_k = (x_{k+1} - A x_k) / B that realises the transition x_k -> x_{k+1}."""
    A, B = expand_time(torch.as_tensor(coef.A), x), expand_time(torch.as_tensor(coef.B), x)
    return (x_next - A * x) / B


def transition_log_prob_via_policy(policy: ScoreActionPolicy, t: float | Tensor, x: Tensor, x_next: Tensor,
                                   coef: StepAsPolicy) -> Tensor:
    """log p(x_{k+1} | x_k) = log pi(a_k | t_k, x_k) - d log |B_k| (change of variables a -> A x + B a).

    ``policy`` must have std = coef.policy_std at t (e.g. :meth:`ScoreActionPolicy.of_sampler`).
    """
    a = action_of_transition(x, x_next, coef)
    B = torch.as_tensor(coef.B, dtype=x.dtype, device=x.device)
    return policy.log_prob(t, x, a) - event_dim(x) * torch.log(B.abs()).expand(x.shape[0])


# ------------------------------------------------------------------------------------------------
# rollouts with sampled actions
# ------------------------------------------------------------------------------------------------
def rollout(problem: ScoreControlProblem, policy: ScoreActionPolicy, x_init: Tensor, grid: TimeGrid,
            brownian: bool = True, generator: torch.Generator | None = None) -> Trajectory:
    """Euler steps of the controlled SDE with *sampled* actions a_k ~ pi(. | t_k, x_k):

        x_{k+1} = x_k + b(t_k, x_k, a_k) dt_k + [sigma(t_k) sqrt(dt_k) z_k   if brownian].

    The transition x_k -> x_{k+1} is Gaussian with mean x_k + b(t_k, x_k, mu) dt and variance
    g^4 dt^2 std_pi^2 + [g^2 dt if brownian]. With a fixed std_pi and Brownian noise, the extra variance is
    O(dt) in total, so the law converges to that of the exploratory SDE (chapter 3). With brownian=False and
    std_pi^2 = 1/(g^2 dt) the step has exactly the law of the Euler-Maruyama step (theory-notes 1.4).

    Returns a :class:`Trajectory` (method ``"policy-euler"``): ``scores`` holds the sampled actions a_k,
    ``means``/``stds``/``log_probs`` the Gaussian transitions, ``extras["action_means"]`` the policy means and
    ``extras["action_log_probs"]`` log pi(a_k | t_k, x_k).
    """
    if abs(policy.T - problem.T) > 1e-12 or abs(grid.T - problem.T) > 1e-12:
        raise ValueError("problem, policy and grid must share the horizon T")
    x = x_init
    xs, acts, mus, means, stds, lps, alps = [x], [], [], [], [], [], []
    for k in range(grid.K):
        t, dt = grid.t[k], grid.dt[k]
        mu = policy.mean(t, x)
        pstd = policy.std(t, x)
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        a = mu + expand_time(pstd, x) * xi
        g = problem.sigma(t, x)
        mean = x + dt * problem.b(t, x, mu)
        x_next = x + dt * problem.b(t, x, a)
        var = (g**2 * dt) ** 2 * pstd**2
        if brownian:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x_next = x_next + expand_time(g * torch.sqrt(dt), x) * z
            var = var + g**2 * dt
        if not torch.isfinite(x_next).all():
            raise FloatingPointError(f"non-finite state at step {k}: the action or the step size is unstable")
        std = torch.sqrt(var)
        acts.append(a)
        mus.append(mu)
        means.append(mean)
        stds.append(std)
        lps.append(gaussian_log_prob(x_next, mean, std) if bool((std > 0).all()) else torch.full_like(std, math.nan))
        alps.append(policy.log_prob(t, x, a) if bool((pstd > 0).all()) else torch.full_like(pstd, math.nan))
        xs.append(x_next)
        x = x_next
    traj = Trajectory(x=x, grid=grid, method="policy-euler", eta=1.0 if brownian else 0.0)
    traj.xs, traj.scores = torch.stack(xs), torch.stack(acts)
    traj.means, traj.stds, traj.log_probs = torch.stack(means), torch.stack(stds), torch.stack(lps)
    traj.extras = {"action_means": torch.stack(mus), "action_log_probs": torch.stack(alps), "brownian": brownian}
    return traj


__all__ = ["ScoreControlProblem", "ScoreActionPolicy", "ExploratorySDE", "StepAsPolicy", "step_coefficients",
           "action_of_transition", "transition_log_prob_via_policy", "rollout"]
