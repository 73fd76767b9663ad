"""Samplers for the reverse-time dynamics on any time grid, with one signature.

Every sampler integrates in RL time t = T - s from the noise end (s = T) to the data end of ``grid``.
One step maps x_k at diffusion time s_k to x_{k+1} at s_{k+1} < s_k. A stochastic step is Gaussian,

    x_{k+1} = mean_k(x_k) + std_k * z,   z ~ N(0, I),

and the sampler can record that mean, std and the transition log-density log N(x_{k+1}; mean_k, std_k^2 I)
*summed over dimensions* (chapter 3). Methods:

=============  =======================================================================================
``"em"``       Euler-Maruyama on dX = [-f + (1+eta^2)/2 g^2 score] dt + eta g dB (eta = 1: reverse SDE)
``"ddim"``     DDIM(eta) (Song, Meng, Ermon 2021, eq. 12) for any linear SDE; eta = 1 is the DDPM ancestral
               step, eta = 0 the deterministic DDIM step
``"pf-euler"`` Euler on the probability-flow ODE dX = [-f + g^2 score / 2] dt
``"pf-heun"``  Heun (explicit trapezoid, 2nd order) on the probability-flow ODE (Karras et al. 2022, Alg. 1)
=============  =======================================================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .gaussian_step import gaussian_chain, gaussian_log_prob, gaussian_step
from .grid import TimeGrid
from .sde import LinearSDE, ScoreFn
from .shapes import as_time, expand_time

METHODS = ("em", "ddim", "pf-euler", "pf-heun")
STOCHASTIC = {"em": True, "ddim": True, "pf-euler": False, "pf-heun": False}


# ------------------------------------------------------------------------------------------------
# one step of each method
# ------------------------------------------------------------------------------------------------
class Step(NamedTuple):
    x_next: Tensor
    mean: Tensor          # mean of x_next given x (equals x_next for deterministic steps)
    std: Tensor           # per-sample std, shape (n,); zeros for deterministic steps
    score: Tensor         # score used at (s_cur, x): the action of chapter 3


def em_step(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, s_cur, s_next, noise: Tensor | None,
            eta: float = 1.0) -> Step:
    """Euler-Maruyama step of the eta-family in RL time: mean = x + b dt, std = eta g(s_cur) sqrt(dt)."""
    return _affine_step("em", sde, score_fn, x, s_cur, s_next, noise, eta)


def ddim_step(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, s_cur, s_next, noise: Tensor | None,
              eta: float = 1.0) -> Step:
    """DDIM(eta) step written with alpha, sigma of any linear SDE.

    x0_hat = (x + sigma_c^2 score)/alpha_c, eps_hat = -sigma_c score,
    x_next = alpha_n x0_hat + sqrt(sigma_n^2 - c^2) eps_hat + c z,
    c^2 = eta^2 sigma_n^2 (1 - alpha_c^2 sigma_n^2 / (alpha_n^2 sigma_c^2)).
    For VP this is c^2 = eta^2 (1 - abar_n)/(1 - abar_c) (1 - abar_c/abar_n), and eta = 1 is DDPM's posterior step.
    """
    return _affine_step("ddim", sde, score_fn, x, s_cur, s_next, noise, eta)


def pf_euler_step(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, s_cur, s_next, noise=None, eta: float = 0.0) -> Step:
    """Euler step of the probability-flow ODE."""
    return _affine_step("pf-euler", sde, score_fn, x, s_cur, s_next, None, 0.0)


def _affine_step(method: str, sde: LinearSDE, score_fn: ScoreFn, x: Tensor, s_cur, s_next, noise, eta) -> Step:
    s = as_time(s_cur, x)
    st = gaussian_step(sde, s, as_time(s_next, x), method, eta)
    score = score_fn(s, x)
    mean = st.mean(x, score)
    return Step(_add_noise(mean, st.std, noise), mean, st.std, score)


def pf_heun_step(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, s_cur, s_next, noise=None, eta: float = 0.0) -> Step:
    """Heun step (predictor Euler, trapezoidal corrector) of the probability-flow ODE; local error O(h^3).

    A step that ends at sigma(s_next) = 0 (the data end) is an Euler step, as in Karras et al. (2022, Alg. 1):
    a learned score -eps/sigma is not defined there.
    """
    s, sn = as_time(s_cur, x), as_time(s_next, x)
    h = expand_time(s - sn, x)
    score = score_fn(s, x)
    d1 = sde.pf_ode_drift(s, x, score)
    x_pred = x + h * d1
    corrected = sde.sigma(sn) > 0                                   # per sample: times may differ within a batch
    if not bool(corrected.any()):
        return Step(x_pred, x_pred, torch.zeros_like(s), score)
    sn_safe = torch.where(corrected, sn, s)                         # never evaluate a score at sigma = 0
    d2 = sde.pf_ode_drift(sn_safe, x_pred, score_fn(sn_safe, x_pred))
    x_next = torch.where(corrected.reshape(-1, *([1] * (x.ndim - 1))), x + 0.5 * h * (d1 + d2), x_pred)
    return Step(x_next, x_next, torch.zeros_like(s), score)


STEPS: dict[str, Callable[..., Step]] = {"em": em_step, "ddim": ddim_step, "pf-euler": pf_euler_step,
                                         "pf-heun": pf_heun_step}


def _add_noise(mean: Tensor, std: Tensor, noise: Tensor | None) -> Tensor:
    if noise is None:
        return mean
    return mean + expand_time(std, mean) * noise


def _recorded_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Transition log-density for the record; a zero-variance step (DDIM to s = 0) is a Dirac: recorded as 0."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, gaussian_log_prob(x, mean, safe), torch.zeros_like(std))


def get_step(method: str) -> Callable[..., Step]:
    if method not in STEPS:
        raise ValueError(f"unknown sampler method {method!r}; choose one of {', '.join(METHODS)}")
    return STEPS[method]


# ------------------------------------------------------------------------------------------------
# the sampler
# ------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """A sampled batch of trajectories. ``x`` is the terminal state (RL time T); the rest is recorded on request.

    xs (K+1, n, *event) states; scores (K, n, *event) the score (action) used at each step;
    means (K, n, *event) and stds (K, n) of each Gaussian transition; log_probs (K, n) their log-densities
    at the realised next state, summed over dimensions (None for deterministic methods; a zero-variance step
    inside a stochastic method, such as the DDIM step that ends at s = 0, is a Dirac and is recorded as 0).
    """

    x: Tensor
    grid: TimeGrid
    method: str
    eta: float
    xs: Tensor | None = None
    scores: Tensor | None = None
    means: Tensor | None = None
    stds: Tensor | None = None
    log_probs: Tensor | None = None
    extras: dict = field(default_factory=dict)


def reverse_sde_sample(sde: LinearSDE, score_fn: ScoreFn, x_init: Tensor, grid: TimeGrid, method: str = "em",
                       eta: float = 1.0, generator: torch.Generator | None = None, record: bool = False,
                       noises: Tensor | None = None) -> Trajectory:
    """Integrate the reverse-time dynamics from ``x_init`` (at s = grid.s[0]) along ``grid``.

    Args:
        sde: the forward SDE whose reversal is simulated.
        score_fn: ``score(s, x)``, exact or learned.
        x_init: initial states, shape (n, *event), usually ``sde.prior_sample``.
        grid: the diffusion-time grid (see :class:`TimeGrid`).
        method: one of ``"em"``, ``"ddim"``, ``"pf-euler"``, ``"pf-heun"``.
        eta: noise level of ``em`` / ``ddim`` (1: reverse SDE / DDPM, 0: deterministic).
        generator: torch generator for the Gaussian noise.
        record: keep states, scores, transition means, stds and log-densities.
        noises: optional pre-drawn standard normal noises of shape (K, n, *event) (common random numbers).
    """
    step = get_step(method)
    x = x_init
    stochastic = STOCHASTIC[method] and eta > 0
    xs, scores, means, stds, lps = [x], [], [], [], []
    for k in range(grid.K):
        if stochastic:
            z = noises[k] if noises is not None else torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                                                  device=x.device)
        else:
            z = None
        st = step(sde, score_fn, x, grid.s[k], grid.s[k + 1], z, eta=eta)
        if not torch.isfinite(st.x_next).all():
            raise FloatingPointError(
                f"non-finite state at step {k} (s = {float(grid.s[k]):.4g} -> {float(grid.s[k + 1]):.4g}) with "
                f"method {method!r}: the score or the step size is unstable; use more steps or check the score")
        if record:
            xs.append(st.x_next)
            scores.append(st.score)
            means.append(st.mean)
            stds.append(st.std)
            if stochastic:
                lps.append(_recorded_log_prob(st.x_next, st.mean, st.std))
        x = st.x_next
    traj = Trajectory(x=x, grid=grid, method=method, eta=eta)
    if record:
        traj.xs, traj.scores = torch.stack(xs), torch.stack(scores)
        traj.means, traj.stds = torch.stack(means), torch.stack(stds)
        traj.log_probs = torch.stack(lps) if stochastic else None
    return traj


def propagate_gaussian(sde: LinearSDE, score_fn: ScoreFn, grid: TimeGrid, mean0: Tensor, cov0: Tensor,
                       method: str = "em", eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Exact law of the *discrete* sampler when the score is affine in x and x_init ~ N(mean0, cov0).

    Each step is then x_{k+1} = A_k x_k + b_k + std_k z, so the law stays Gaussian
    (:func:`sacode.dynamics.gaussian_step.gaussian_chain`). The affine map of each step is read off the sampler's own
    step function, evaluated with zero noise at the current mean m and at m + e_i, so this checks the real code
    (Heun's two score evaluations included) without Monte-Carlo error.
    Vectors of shape (d,), covariances (d, d); the score must accept x of shape (n, d).
    """
    step = get_step(method)
    m, C = mean0.clone(), cov0.clone()
    d = m.numel()
    eye = torch.eye(d, dtype=m.dtype)
    for k in range(grid.K):
        pts = torch.cat([m[None], m[None] + eye], dim=0)                             # (d+1, d)
        st = step(sde, score_fn, pts, grid.s[k], grid.s[k + 1], None, eta=eta)
        b = st.mean[0]
        A = (st.mean[1:] - b).T                                                      # columns A e_i
        law = gaussian_chain(A.numpy()[None], (b - A @ m).numpy()[None], st.std[:1].numpy(), m.numpy(), C.numpy())
        m, C = torch.from_numpy(law.mean).to(m), torch.from_numpy(law.cov).to(C)
    return m, C
