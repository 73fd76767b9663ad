"""KL regularisation by Girsanov: the path KL between the fine-tuned and the pretrained sampler (chapter 4).

Two samplers of the eta-family in RL time, started from the same law,

    dX = [-f + (1 + eta^2)/2 g^2 s_theta] dt + eta g dB     and     the same with s_pre,

share the diffusion eta g and differ in drift by Delta b = (1 + eta^2)/2 g^2 (s_theta - s_pre). Girsanov's
theorem gives (chapter 4; Zhao et al. 2025)

    KL(P^theta || P^pre) = E^theta int_0^T ||Delta b||^2 / (2 eta^2 g^2) dt
                         = ((1 + eta^2)/(2 eta))^2 E^theta int_0^T 1/2 g(T-t)^2 ||s_theta - s_pre||^2 dt,

the factor being 1 at eta = 1 and diverging like 1/(4 eta^2) as eta -> 0 (a drift difference against vanishing
noise). By data processing KL(p^theta_T || p^pre_T) <= KL(P^theta || P^pre).

Discretely, a Gaussian sampler step with a common std_k gives the per-step KL
||mean_theta - mean_pre||^2 / (2 std_k^2) = B_k^2 ||s_theta - s_pre||^2 / (2 std_k^2) (chapter 4): the exact KL
between the two discrete chains ("chain" KL). The paper's code penalises instead the Girsanov form
1/2 ((1 + eta^2)/(2 eta))^2 (int_step g^2) ||s_theta - s_pre||^2 ("girsanov"; int_step g^2 = log(abar_prev/abar_t)
for a VP schedule). Their per-step ratio (:func:`kl_weight_ratio`) is exactly 1 for Euler-Maruyama(eta) against the
left Riemann weight g(s_k)^2 dt_k, and 1 + O(b dt / sigma_n^2) for DDIM: close to 1 for a step that is small compared
to the noise level sigma_n^2 it lands on, far from 1 otherwise. On a uniform grid that stops at a fixed s_end > 0
the chain sum therefore converges to the Girsanov integral as O(1/K); on a diffusers schedule it does not: the last
step always goes from timestep 1 to timestep 0, whatever K, and keeps a ratio of 2.0 on Stable Diffusion's
schedule (eta = 1), and the step into timestep 1 has ratio 11.6 at K = 50 (chapter 4, "the two KLs side by side").
A KL weight beta therefore does not mean the same thing under the two penalties (:func:`kl_penalty_scale`; training
chooses with ``--set kl=chain|girsanov``).

:class:`GaussianLinearExample` holds the closed forms of the running example (chapter 5): Gaussian data,
linear reward, the optimal score shift, its path KL and the terminal KL from the fixed prior.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from scipy import integrate
from torch import Tensor

from ..dynamics.shapes import as_time, expand_time, sum_event
from .presets import toy_preset
from .rewards import LinearReward
from ..dynamics.gaussian_step import gaussian_step
from ..dynamics.grid import TimeGrid
from ..dynamics.samplers import STOCHASTIC, Trajectory, get_step
from ..dynamics.sde import VPSDE, LinearSDE, ScoreFn

def eta_factor(eta: float) -> float:
    """((1 + eta^2) / (2 eta))^2: the Girsanov factor of the eta-family (1 at eta = 1, infinite at eta = 0)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    if eta == 0:
        return math.inf
    return ((1.0 + eta**2) / (2.0 * eta)) ** 2


def path_kl_rate(sde: LinearSDE, s: float | Tensor, x: Tensor, score_theta: Tensor, score_pre: Tensor,
                 eta: float = 1.0) -> Tensor:
    """Girsanov integrand 1/2 ((1+eta^2)/(2 eta))^2 g(s)^2 ||s_theta - s_pre||^2 at diffusion time s, shape (n,)."""
    s = as_time(s, x)
    return 0.5 * eta_factor(eta) * sde.g2(s) * sum_event((score_theta - score_pre) ** 2)


def path_kl_from_trajectory(traj: Trajectory, sde: LinearSDE, score_pre: ScoreFn, weight: str = "exact",
                            eta: float | None = None) -> Tensor:
    """Per-trajectory Monte-Carlo estimate of the path KL, shape (n,); average it over trajectories.

    Uses the recorded states x_k and scores s_theta(s_k, x_k) (``reverse_sde_sample(..., record=True)``) and
    evaluates s_pre on the same states. ``weight="exact"`` weights step k by int_{s_{k+1}}^{s_k} g^2 (the
    code's log(abar_{k-1}/abar_k) for VP, chapter 4); ``weight="riemann"`` by g(s_k)^2 dt_k.
    ``eta`` defaults to the trajectory's eta (the factor ((1+eta^2)/(2 eta))^2 multiplies everything).
    """
    if traj.xs is None or traj.scores is None:
        raise ValueError("the trajectory has no recorded states/scores; sample it with record=True")
    if weight not in ("exact", "riemann"):
        raise ValueError(f"weight must be 'exact' or 'riemann'; got {weight!r}")
    eta = traj.eta if eta is None else eta
    grid = traj.grid
    total = torch.zeros(traj.x.shape[0], dtype=traj.x.dtype, device=traj.x.device)
    for k in range(grid.K):
        x = traj.xs[k]
        s = as_time(grid.s[k], x)
        w = sde.int_g2(grid.s[k + 1], grid.s[k]) if weight == "exact" else sde.g2(grid.s[k]) * grid.dt[k]
        d2 = sum_event((traj.scores[k] - score_pre(s, x)) ** 2)
        total = total + 0.5 * eta_factor(eta) * w * d2
    return total


def per_step_kl(traj: Trajectory, sde: LinearSDE, score_pre: ScoreFn) -> Tensor:
    """KL(N(mean_theta, std_k^2 I) || N(mean_pre, std_k^2 I)) = ||mean_theta - mean_pre||^2 / (2 std_k^2), (K, n).

    mean_pre is the same sampler step (``traj.method``, ``traj.eta``) evaluated at the recorded x_k with the
    pretrained score. A deterministic step (std_k = 0) gives +inf where the means differ and 0 where they agree
    (KL between two point masses).
    """
    if traj.xs is None or traj.means is None or traj.stds is None:
        raise ValueError("the trajectory has no recorded means/stds; sample it with record=True")
    if traj.method not in STOCHASTIC:
        raise ValueError(f"per_step_kl needs a trajectory from sacode.dynamics.samplers; got method {traj.method!r}")
    step = get_step(traj.method)
    grid = traj.grid
    out = []
    for k in range(grid.K):
        x = traj.xs[k]
        pre = step(sde, score_pre, x, grid.s[k], grid.s[k + 1], None, eta=traj.eta)
        d2 = sum_event((traj.means[k] - pre.mean) ** 2)
        var = traj.stds[k] ** 2
        kl = torch.where(var > 0, d2 / (2 * torch.where(var > 0, var, torch.ones_like(var))),
                         torch.where(d2 > 0, torch.full_like(d2, math.inf), torch.zeros_like(d2)))
        out.append(kl)
    return torch.stack(out)


def discrete_path_kl(traj: Trajectory, sde: LinearSDE, score_pre: ScoreFn) -> Tensor:
    """Sum over steps of :func:`per_step_kl`: the exact KL between the two discrete Markov chains, shape (n,)."""
    return per_step_kl(traj, sde, score_pre).sum(0)


def _shift_sq(shift: Callable[[Tensor], Tensor], s: Tensor) -> Tensor:
    """||shift(s)||^2 for diffusion times s of shape (m,): shift returns (m,) (1-D) or (m, *event)."""
    v = torch.as_tensor(shift(s), dtype=torch.float64)
    if v.ndim == 0:
        v = v.expand(s.shape)
    if v.shape[0] != s.shape[0]:
        raise ValueError(f"shift(s) must return one value (or vector) per time; got shape {tuple(v.shape)} for "
                         f"{s.shape[0]} times")
    return v.reshape(s.shape[0], -1).pow(2).sum(1)


def shift_path_kl(sde: LinearSDE, shift: Callable[[Tensor], Tensor], s_end: float = 0.0, eta: float = 1.0,
                  epsabs: float = 1e-13, epsrel: float = 1e-12) -> tuple[float, float]:
    """Path KL of a score shift s_theta - s_pre = shift(s) that does not depend on x (scipy quad):

        KL = ((1+eta^2)/(2 eta))^2 int_{s_end}^T 1/2 g(s)^2 ||shift(s)||^2 ds.

    Returns (value, quad's absolute error estimate). ``shift`` maps diffusion times (float64 tensor of shape (m,))
    to shifts of shape (m,) or (m, *event). Along any trajectory the integrand is deterministic, so this is
    also the Girsanov expectation.
    """
    fac = eta_factor(eta)

    def integrand(s: float) -> float:
        st = torch.tensor([s], dtype=torch.float64)
        return float(0.5 * fac * sde.g2(st) * _shift_sq(shift, st))

    val, err = integrate.quad(integrand, s_end, sde.T, epsabs=epsabs, epsrel=epsrel, limit=200)
    return float(val), float(err)


def shift_per_step_kl(sde: LinearSDE, shift: Callable[[Tensor], Tensor], grid: TimeGrid, method: str = "em",
                      eta: float = 1.0) -> Tensor:
    """Per-step transition KLs (B_k / std_k)^2 ||shift(s_k)||^2 / 2 of a score shift, shape (K,) (no sampling).

    The means of the fine-tuned and pretrained steps differ by B_k shift(s_k) (:func:`sacode.theory.control.
    step_coefficients`), their stds agree, so KL_k = ||B_k shift||^2 / (2 std_k^2): the KL between the two
    score-action policies N(s_theta, (std_k/B_k)^2 I) and N(s_pre, (std_k/B_k)^2 I). For ``em`` with eta = 1
    this is g(s_k)^2 dt_k ||shift||^2 / 2, a left Riemann sum of the path KL.
    """
    coef = gaussian_step(sde, grid.s[:-1], grid.s[1:], method, eta)
    if not bool((coef.std > 0).all()):
        raise ValueError("a step of this grid is deterministic (std = 0), so its KL is infinite; end the grid at "
                         "s_end > 0 (DDIM's last step to s = 0 has no noise) or use eta > 0")
    return 0.5 * (coef.B / coef.std) ** 2 * _shift_sq(shift, grid.s[:-1])


KL_FORMS = ("chain", "girsanov")
"""The per-step KL penalties (module docstring): the exact chain KL, or the paper code's Girsanov form."""


def chain_kl_weights(sde: LinearSDE, grid: TimeGrid, method: str = "ddim", eta: float = 1.0) -> Tensor:
    """(B_k / std_k)^2, shape (K,): the exact chain KL of step k is 1/2 (B_k/std_k)^2 ||s_theta - s_pre||^2."""
    st = gaussian_step(sde, grid.s[:-1], grid.s[1:], method, eta)
    return (st.B / st.std) ** 2


def girsanov_kl_weights(sde: LinearSDE, grid: TimeGrid, eta: float = 1.0) -> Tensor:
    """((1+eta^2)/(2 eta))^2 int_{s_{k+1}}^{s_k} g^2, shape (K,): the paper code's penalty of step k is
    1/2 times this times ||s_theta - s_pre||^2 (for VP: the factor times log(abar_{k+1}/abar_k))."""
    return eta_factor(eta) * sde.int_g2(grid.s[1:], grid.s[:-1])


def kl_weight_ratio(sde: LinearSDE, grid: TimeGrid, method: str = "ddim", eta: float = 1.0) -> Tensor:
    """Per-step ratio chain KL / Girsanov penalty (the same score difference), shape (K,) (chapter 4)."""
    return chain_kl_weights(sde, grid, method, eta) / girsanov_kl_weights(sde, grid, eta)


def kl_penalty_scale(form: str, sde: LinearSDE, method: str, eta: float, s_cur: Tensor, s_next: Tensor,
                     std: Tensor) -> Tensor:
    """The factor that turns the chain KL ||m_theta - m_pre||^2/(2 std^2) of a step into the penalty ``form``.

    ``chain``: 1. ``girsanov``: eta_factor int g^2 std^2 / B^2, so that the product is
    1/2 eta_factor (int g^2) ||(m_theta - m_pre)/B||^2 = 1/2 eta_factor (int g^2) ||s_theta - s_pre||^2 (the mean of an
    em/ddim step is A x + B score). ``std`` is the step's transition std (any exploration included; it cancels);
    times and std of shape (n,) or scalars. The factor does not depend on the state or on theta.
    """
    if form not in KL_FORMS:
        raise ValueError(f"unknown KL form {form!r}; choose one of {', '.join(KL_FORMS)}")
    std = torch.as_tensor(std)
    if form == "chain":
        return torch.ones_like(std)
    if method not in ("em", "ddim") or eta <= 0:
        raise ValueError(f"the Girsanov penalty needs a stochastic em/ddim sampler with eta > 0 (its factor "
                         f"((1+eta^2)/(2 eta))^2 is infinite at eta = 0); got method={method!r}, eta={eta}")
    s_cur = torch.as_tensor(s_cur, dtype=std.dtype, device=std.device)
    s_next = torch.as_tensor(s_next, dtype=std.dtype, device=std.device)
    B = gaussian_step(sde, s_cur, s_next, method, eta).B
    return eta_factor(eta) * sde.int_g2(s_next, s_cur).to(std) * std**2 / B.to(std) ** 2


def published_beta_for_chain(beta_girsanov: float, sde: LinearSDE, grid: TimeGrid, method: str = "ddim",
                             eta: float = 1.0, step_weights: Tensor | None = None) -> float:
    """A beta for the chain KL that matches ``beta_girsanov`` under the paper code's Girsanov penalty on average.

    beta_chain sum_k c_k u_k = beta_girsanov sum_k w_k u_k with c_k, w_k the chain and Girsanov weights and u_k the
    expected ||s_theta - s_pre||^2 at step k (``step_weights``; None: the same at every step), i.e. beta_chain =
    beta_girsanov / (weighted mean ratio). Only the whole-path penalty can be matched: the per-step ratios differ
    (chapter 4).
    """
    c, w = chain_kl_weights(sde, grid, method, eta), girsanov_kl_weights(sde, grid, eta)
    u = torch.ones_like(c) if step_weights is None else torch.as_tensor(step_weights, dtype=c.dtype)
    return float(beta_girsanov * (w * u).sum() / (c * u).sum())


def gaussian_kl(mean_p: Tensor, cov_p: Tensor, mean_q: Tensor, cov_q: Tensor) -> float:
    """KL(N(m_p, C_p) || N(m_q, C_q)) = 1/2 [tr(C_q^{-1} C_p) + (m_q - m_p)^T C_q^{-1} (m_q - m_p) - d
    + log det C_q - log det C_p]; vectors (d,), covariances (d, d)."""
    mp = torch.as_tensor(mean_p, dtype=torch.float64).reshape(-1)
    mq = torch.as_tensor(mean_q, dtype=torch.float64).reshape(-1)
    d = mp.numel()
    Cp = torch.as_tensor(cov_p, dtype=torch.float64).reshape(d, d)
    Cq = torch.as_tensor(cov_q, dtype=torch.float64).reshape(d, d)
    Lq = torch.linalg.cholesky(Cq)
    dm = (mq - mp)[:, None]
    tr = torch.cholesky_solve(Cp, Lq).diagonal().sum()
    quad = (dm * torch.cholesky_solve(dm, Lq)).sum()
    logdet = 2 * torch.log(Lq.diagonal()).sum() - torch.linalg.slogdet(Cp)[1]
    return float(0.5 * (tr + quad - d + logdet))


def torchsde_path_kl(exploratory_sde, x_init: Tensor, t0: float, t1: float, dt: float,
                     method: str = "euler", entropy: int | None = None) -> Tensor:
    """Per-trajectory path log-ratio int 1/2 ||(f - h)/g||^2 dt from ``torchsde.sdeint(..., logqp=True)``, (n,).

    ``exploratory_sde`` follows torchsde's protocol with drift f (fine-tuned), prior drift h (pretrained) and
    diffusion g, e.g. :meth:`sacode.theory.control.ScoreControlProblem.exploratory_sde`; its time is RL time.
    x_init of shape (n, d). Its mean over trajectories estimates KL(P^theta || P^pre) (Li et al. 2020).
    ``entropy`` seeds torchsde's Brownian interval (None: torchsde draws a fresh seed, so runs differ).
    """
    import torchsde

    if x_init.ndim != 2:
        raise ValueError(f"torchsde needs states of shape (n, d); got {tuple(x_init.shape)} (use x[:, None] in 1-D)")
    ts = torch.tensor([t0, t1], dtype=x_init.dtype)
    bm = None
    if entropy is not None:        # logqp augments the state by one coordinate, and the noise with it
        n, d = x_init.shape
        bm = torchsde.BrownianInterval(t0, t1, size=(n, d + 1), dtype=x_init.dtype, device=x_init.device,
                                       entropy=entropy)
    _, log_ratio = torchsde.sdeint(exploratory_sde, x_init, ts, method=method, dt=dt, logqp=True, bm=bm)
    return log_ratio.sum(0)


# ------------------------------------------------------------------------------------------------
# the running example: closed forms of chapter 5
# ------------------------------------------------------------------------------------------------
@dataclass
class GaussianLinearExample:
    """1-D data N(m0, s0^2), VP SDE, reward r(x) = w x, KL weight beta: closed forms of chapter 5
    (the running example of chapters 3-4; the general optimal control lives in :mod:`sacode.theory.optimal`).

    * pretrained score s_pre(s, x) = -(x - alpha m0)/D,  D = alpha^2 s0^2 + 1 - alpha^2;
    * optimal control a* - s_pre = grad V*/beta = alpha s0^2 w/(beta D) (``shift``), constant in x;
    * path KL int_{s_end}^T 1/2 g^2 shift^2 ds = w^2 s0^4 (alpha_{s_end}^2 - alpha_T^2)/(2 beta^2 D_{s_end} D_T)
      (substitute u = alpha^2, du = -g^2 u ds), = w^2 v_T/(2 beta^2) at s_end = 0, v_T = s0^2(1 - alpha_T^2)/D_T;
    * from the fixed prior N(0, 1) the optimal terminal law is the pretrained one shifted by w v_T/beta, the
      pretrained terminal variance is v_T + (alpha_T s0^2/D_T)^2, and KL(p*_T || p^pre_T) = (w v_T/beta)^2/(2 Var_T).
    """

    sde: VPSDE
    m0: float
    s0: float
    w: float
    beta: float

    @classmethod
    def from_preset(cls, name: str) -> "GaussianLinearExample":
        """``gauss1d-linear`` or ``gauss1d-linear-short`` (1-D Gaussian data, linear reward, VP SDE)."""
        p = toy_preset(name)
        if not (p.data.K == 1 and p.data.d == 1 and isinstance(p.reward, LinearReward) and isinstance(p.sde, VPSDE)):
            raise ValueError(f"preset {name!r} is not 1-D Gaussian data with a linear reward under a VP SDE; use "
                             "'gauss1d-linear' or 'gauss1d-linear-short'")
        return cls(p.sde, float(p.data.means[0, 0]), math.sqrt(float(p.data.covs[0, 0, 0])), float(p.reward.w[0]),
                   p.beta)

    def a2(self, s) -> torch.Tensor:
        return self.sde.alpha(torch.as_tensor(s, dtype=torch.float64)) ** 2

    def D(self, s) -> torch.Tensor:
        a2 = self.a2(s)
        return a2 * self.s0**2 + 1.0 - a2

    def s_pre(self, s, x: torch.Tensor) -> torch.Tensor:
        """Exact pretrained score -(x - alpha m0)/D (chapter 5), affine in x, any event shape."""
        s = torch.as_tensor(s, dtype=x.dtype)
        return -(x - expand_time(self.sde.alpha(s), x) * self.m0) / expand_time(self.D(s), x)

    def shift(self, s) -> torch.Tensor:
        """grad V*/beta = alpha s0^2 w / (beta D) (chapter 5), a function of s only."""
        s = torch.as_tensor(s, dtype=torch.float64)
        return self.sde.alpha(s) * self.s0**2 * self.w / (self.beta * self.D(s))

    def s_opt(self, s, x: torch.Tensor) -> torch.Tensor:
        return self.s_pre(s, x) + expand_time(self.shift(torch.as_tensor(s, dtype=x.dtype)), x)

    def path_kl_closed(self, s_end: float = 0.0) -> float:
        """Path KL of the optimal control on [s_end, T]: w^2 s0^4 (a_e^2 - a_T^2) / (2 beta^2 D_e D_T)."""
        T = self.sde.T
        return float(self.w**2 * self.s0**4 * (self.a2(s_end) - self.a2(T))
                     / (2 * self.beta**2 * self.D(s_end) * self.D(T)))

    def v_T(self) -> float:
        """Posterior variance Var(X_0 | X_T = y) = s0^2 (1 - alpha_T^2) / D_T (the same for every y)."""
        return float(self.s0**2 * (1 - self.a2(self.sde.T)) / self.D(self.sde.T))

    def terminal_var_pre(self) -> float:
        """Variance of the pretrained sampler's terminal law from N(0, 1): v_T + (alpha_T s0^2 / D_T)^2."""
        T = self.sde.T
        return self.v_T() + float(self.a2(T) * self.s0**4 / self.D(T) ** 2)

    def terminal_shift(self) -> float:
        """Mean shift of the optimal sampler's terminal law: int_0^T Phi(T, t) g^2 shift dt = w v_T / beta, where
        Phi = alpha s0^2 / D = d E[X_T | X_t = x] / dx is the pretrained sampler's linear propagator."""
        return self.w * self.v_T() / self.beta

    def terminal_kl_closed(self) -> float:
        """KL(p*_T || p^pre_T) = terminal_shift^2 / (2 Var_T) (two Gaussians with the same variance)."""
        return self.terminal_shift() ** 2 / (2 * self.terminal_var_pre())


__all__ = ["eta_factor", "path_kl_rate", "path_kl_from_trajectory", "per_step_kl", "discrete_path_kl",
           "shift_path_kl", "shift_per_step_kl", "KL_FORMS", "chain_kl_weights", "girsanov_kl_weights",
           "kl_weight_ratio", "kl_penalty_scale", "published_beta_for_chain", "gaussian_kl", "torchsde_path_kl",
           "GaussianLinearExample"]
