"""A diffusers noise schedule as a linear SDE, and the one place where integer timesteps meet diffusion time.

Diffusers' DDPM/DDIM schedulers are discrete: timestep tau = 0, ..., N-1 (N = ``num_train_timesteps`` = 1000
for Stable Diffusion) has ``alphas_cumprod[tau]`` = abar_tau. We read them as samples of a variance-preserving
SDE in diffusion time s in [0, T = 1]:

    s(tau) = (tau + 1) / N,          knots  s_0 = 0 (abar = 1, clean data),  s_{tau+1} = s(tau) (abar_tau),

with log abar interpolated linearly between knots. Between knots the noise rate b(s) = -d log abar / ds is
constant, so this is the VP SDE dX = -b(s)/2 X ds + sqrt(b(s)) dW (chapter 1) with a
piecewise-constant b; on interval tau, b = -N log(1 - beta_tau) ~ N beta_tau, the familiar continuum limit.
alpha(s) = sqrt(abar(s)), sigma(s) = sqrt(1 - abar(s)), and the score of the eps-parametrised UNet is

    score(s, x) = -eps(x, tau(s)) / sigma(s).

Why tau + 1: the knot s = 0 then carries abar = 1, so s = 0 is the data end exactly as in every other SDE of the
book (alpha(0) = 1, sigma(0) = 0, Tweedie is the identity there). The scheduler's last DDIM step with
``set_alpha_to_one=False`` lands on abar_0, i.e. s = 1/N: the grid ends at s_end = 1/N = 1e-3 T, where the step
still has a density; ``set_alpha_to_one=True`` ends at s = 0 (a deterministic last step).

:func:`scheduler_grid` gives the diffusion times the scheduler visits with K inference steps, so that
:func:`sacode.dynamics.samplers.ddim_step` on that grid *is* ``DDIMScheduler.step`` (tests/test_sd.py checks the equality
against ``scheduler.step(..., eta=eta, variance_noise=z)``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...dynamics.grid import TimeGrid
from ...dynamics.sde import LinearSDE

_SNAP = 1e-3   # |tau - round(tau)| below this is read as an integer timestep (float32 rounding of s is ~1e-4 in tau)


class ScheduleSDE(LinearSDE):
    """The VP SDE whose alpha_bar at s = (tau + 1)/N is a scheduler's ``alphas_cumprod[tau]`` (T = 1).

    Args:
        alphas_cumprod: shape (N,), decreasing, in (0, 1]; e.g. ``scheduler.alphas_cumprod``.
    """

    def __init__(self, alphas_cumprod: Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor with at least 2 entries; got shape {tuple(ac.shape)}")
        if not bool(((ac > 0) & (ac <= 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must decrease strictly and lie in (0, 1]: is this a DDPM-type scheduler?")
        self.N = ac.numel()
        self.T = 1.0
        self.alphas_cumprod = ac
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(ac)])   # knots s = i/N, i = 0..N
        self._cache: dict[Any, Tensor] = {}

    @classmethod
    def from_scheduler(cls, scheduler) -> "ScheduleSDE":
        return cls(scheduler.alphas_cumprod)

    # --- the one conversion between integer timesteps and diffusion time --------------------------------------
    def s_of_timestep(self, tau: Tensor | float | int) -> Tensor:
        """Diffusion time s = (tau + 1)/N of a (possibly fractional) scheduler timestep tau (float64)."""
        return (torch.as_tensor(tau, dtype=torch.float64) + 1.0) / self.N

    def timestep(self, s: Tensor) -> Tensor:
        """Scheduler timestep tau = N s - 1 (float64), snapped to the nearest integer within float32 rounding."""
        tau = torch.as_tensor(s, dtype=torch.float64) * self.N - 1.0
        r = torch.round(tau)
        return torch.where((tau - r).abs() < _SNAP, r, tau)

    # --- interpolation of log alpha_bar -----------------------------------------------------------------------
    def _knots(self, device) -> Tensor:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = self._log_abar.to(device)
        return self._cache[key]

    def log_alpha_bar(self, s: Tensor) -> Tensor:
        """log abar(s), piecewise linear between the knots (float64, on s's device)."""
        s = torch.as_tensor(s, dtype=torch.float64)
        if bool(((s < -1e-9) | (s > self.T + 1e-9)).any()):
            raise ValueError(f"diffusion time must lie in [0, {self.T}]; got values in "
                             f"[{float(s.min()):.4g}, {float(s.max()):.4g}]")
        L = self._knots(s.device)
        u = (s * self.N).clamp(0.0, float(self.N))
        i = torch.floor(u).long().clamp(max=self.N - 1)
        w = u - i
        return L[i] + w * (L[i + 1] - L[i])

    def _rate(self, s: Tensor) -> Tensor:
        """b(s) = -d log abar / ds on the interval containing s (right-continuous)."""
        s = torch.as_tensor(s, dtype=torch.float64)
        L = self._knots(s.device)
        i = torch.floor((s * self.N).clamp(0.0, float(self.N))).long().clamp(max=self.N - 1)
        return -(L[i + 1] - L[i]) * self.N

    # --- LinearSDE interface ----------------------------------------------------------------------------------
    def alpha_bar(self, s: Tensor) -> Tensor:
        return torch.exp(self.log_alpha_bar(s))

    def alpha(self, s):
        return torch.exp(0.5 * self.log_alpha_bar(s))

    def sigma(self, s):
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(s)))

    def f_coef(self, s):
        return -0.5 * self._rate(s)

    def g2(self, s):
        return self._rate(s)

    def g(self, s):
        return torch.sqrt(self._rate(s))

    def int_g2(self, s0, s1):
        return self.log_alpha_bar(s0) - self.log_alpha_bar(s1)

    def prior_std(self) -> float:
        return 1.0

    def __repr__(self):
        return f"ScheduleSDE(N={self.N}, abar in [{float(self.alphas_cumprod[-1]):.3g}, {float(self.alphas_cumprod[0]):.4g}])"


def check_scheduler(scheduler) -> None:
    """Refuse scheduler settings whose DDIM step is not the Gaussian transition of :func:`sacode.dynamics.samplers.ddim_step`."""
    cfg = scheduler.config
    if getattr(cfg, "clip_sample", False) or getattr(cfg, "thresholding", False):
        raise ValueError("the scheduler clips or thresholds x0_hat (clip_sample / thresholding = True), which makes "
                         "the DDIM step non-Gaussian in the score; build it with clip_sample=False, thresholding=False "
                         "(Stable Diffusion's own settings)")
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported; use an epsilon or v_prediction model")
    if getattr(cfg, "rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True gives alphas_cumprod[-1] = 0 (sigma/alpha infinite at s = T); "
                         "this adapter needs a schedule with abar > 0 everywhere")


def scheduler_timesteps(scheduler, K: int) -> list[int]:
    """The K integer timesteps a DDIM scheduler visits, followed by the timestep it finally lands on (-1: abar = 1).

    Uses ``scheduler.set_timesteps(K)`` itself and the step rule of ``DDIMScheduler.step``: from tau it moves to
    prev = tau - N // K, where prev < 0 means ``final_alpha_cumprod`` (abar_0 with ``set_alpha_to_one=False``, read
    here as tau = 0; 1 with ``set_alpha_to_one=True``, read as tau = -1, i.e. s = 0).
    """
    scheduler.set_timesteps(K)
    taus = [int(t) for t in scheduler.timesteps]
    N, jump = scheduler.config.num_train_timesteps, scheduler.config.num_train_timesteps // K
    for a, b in zip(taus[:-1], taus[1:]):
        if b != a - jump:
            raise ValueError(f"the scheduler's timesteps ({scheduler.config.timestep_spacing!r} spacing) do not follow "
                             f"its own DDIM step rule tau -> tau - {jump}; use timestep_spacing='leading' or 'trailing'")
    last = taus[-1] - jump
    if last < 0:
        last = -1 if scheduler.config.set_alpha_to_one else 0
    return taus + [last]


def scheduler_grid(scheduler, K: int, sde: ScheduleSDE | None = None) -> TimeGrid:
    """The diffusers scheduler's own K-step DDIM grid as a :class:`TimeGrid` in diffusion time (s_k = (tau_k+1)/N)."""
    sde = sde or ScheduleSDE.from_scheduler(scheduler)
    s = sde.s_of_timestep(torch.tensor(scheduler_timesteps(scheduler, K), dtype=torch.float64))
    return TimeGrid(s, sde.T)
