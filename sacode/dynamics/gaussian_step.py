"""One Gaussian step of a sampler: the primitive behind every sampler step, transition log-density, per-step KL
and exact recursion of the package (chapter 3, "sampler steps are score-action policies").

A step of the ``em`` or ``ddim`` sampler, and the Euler step of the probability-flow ODE, maps x_k at diffusion time
s_k to x_{k+1} at s_{k+1} < s_k as

    x_{k+1} = A_k x_k + B_k a_k + c_k z,        a_k = score(s_k, x_k),  z ~ N(0, I),

with scalar coefficients; the score is the *action* of the control problem (chapter 3). With h = s_k - s_{k+1},
f the drift coefficient and g the diffusion of the forward SDE, alpha and sigma its marginal coefficients:

=============  =====================================  ===================================================  ==============
method         A                                      B                                                    c
=============  =====================================  ===================================================  ==============
``em`` (eta)   1 - f(s_k) h                           (1 + eta^2)/2 g(s_k)^2 h                             eta g(s_k) sqrt(h)
``ddim`` (eta) alpha_n / alpha_c                      alpha_n sigma_c^2/alpha_c - sigma_c sqrt(sigma_n^2 - c^2)  see below
``pf-euler``   1 - f(s_k) h                           g(s_k)^2 h / 2                                       0
=============  =====================================  ===================================================  ==============

DDIM (Song, Meng, Ermon 2021, eq. 12): c^2 = eta^2 sigma_n^2 (1 - alpha_c^2 sigma_n^2 / (alpha_n^2 sigma_c^2)); for the
VP SDE and eta = 1 this is DDPM's posterior step. Subscripts c and n: s_k and s_{k+1}.

Exploration (chapters 3 and 10) widens a step without moving its mean: state noise ``explore`` * sqrt(h) (it makes a
deterministic sampler stochastic) and a Gaussian *action* a ~ N(score, action_std^2 I), which adds B^2 action_std^2
to the variance. ``brownian=False`` drops the sampler's own noise c_method (the noiseless Euler step of chapter 3):

    c^2 = [c_method^2 if brownian] + explore^2 h + B^2 action_std^2.

:func:`gaussian_chain` propagates a Gaussian law exactly through K such steps when the action is affine in x (the
one exact recursion of the package: samplers, optimal laws, policy evaluation, the K-step optimum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .sde import LinearSDE
from .shapes import expand_time, sum_event
from .time import rl_time

AFFINE_METHODS = ("em", "ddim", "pf-euler")
"""Methods whose step is a single affine map of (x, score): the ones :class:`GaussianStep` covers (Heun's
probability-flow step evaluates the score twice, see :mod:`sacode.dynamics.samplers`)."""

ActionStd = float | Callable[[Tensor], Tensor]
"""An action-exploration std: a number, or a function of RL time t (shape (n,) -> (n,))."""


@dataclass(frozen=True)
class GaussianStep:
    """The coefficients of one Gaussian sampler step, x' = A x + B a + std z (module docstring).

    The tensors have the shape of the times the step was built for: a scalar, (n,) for a batch whose samples sit at
    different times, or (K,) for a whole grid. :meth:`mean` evaluates A x + B a with the sampler's own formula (for
    DDIM through the denoised x0_hat and eps_hat), so sampling, log-densities and KLs use identical numbers.
    """

    method: str
    eta: float
    A: Tensor
    B: Tensor
    std: Tensor
    h: Tensor
    parts: tuple          # method-specific factors used by mean(): (f, g2, factor) for em / pf-euler,
                          # (alpha_c, alpha_n, sigma_c, noise_coef) for ddim

    def mean(self, x: Tensor, score: Tensor) -> Tensor:
        """A x + B score, shape like x."""
        if self.method == "ddim":
            a_c, a_n, g_c, noise_coef = self.parts
            x0 = (x + expand_time(g_c**2, x) * score) / expand_time(a_c, x)
            eps = -expand_time(g_c, x) * score
            return expand_time(a_n, x) * x0 + expand_time(noise_coef, x) * eps
        f, g2, factor = self.parts
        drift = -(expand_time(f, x) * x) + factor * expand_time(g2, x) * score
        return x + expand_time(self.h, x) * drift

    def sample(self, x: Tensor, score: Tensor, noise: Tensor | None) -> Tensor:
        """A x + B score + std noise (the mean when ``noise`` is None)."""
        m = self.mean(x, score)
        return m if noise is None else m + expand_time(self.std, m) * noise

    @property
    def policy_std(self) -> Tensor:
        """Std of the score-action policy this step *is*: std / |B| (chapter 3, eq. ch03-cov)."""
        return self.std / self.B.abs()


def gaussian_step(sde: LinearSDE, s_cur: float | Tensor, s_next: float | Tensor, method: str = "em",
                  eta: float = 1.0, explore: float = 0.0, action_std: ActionStd = 0.0,
                  brownian: bool = True) -> GaussianStep:
    """The :class:`GaussianStep` of ``method`` from diffusion time s_cur to s_next < s_cur (times of any shape).

    ``explore``, ``action_std`` and ``brownian`` add the exploration of the module docstring; with their defaults the
    step is the plain sampler step.
    """
    if method not in AFFINE_METHODS:
        raise ValueError(f"a Gaussian step covers the methods {', '.join(AFFINE_METHODS)}; got {method!r} "
                         "(pf-heun evaluates the score twice per step: use sacode.dynamics.transition.Transition)")
    # times given as tensors keep their dtype (a sampler passes them in the states' dtype); numbers become float64
    sc = s_cur if isinstance(s_cur, Tensor) and s_cur.is_floating_point() else torch.as_tensor(s_cur, dtype=torch.float64)
    sn = torch.as_tensor(s_next, dtype=sc.dtype, device=sc.device)
    if not bool((sn < sc).all()):
        raise ValueError("a sampler step goes from s_cur to a smaller diffusion time s_next < s_cur")
    h = sc - sn
    if method == "ddim":
        a_c, a_n, g_c, g_n = sde.alpha(sc), sde.alpha(sn), sde.sigma(sc), sde.sigma(sn)
        c2 = ((eta**2) * g_n**2 * (1.0 - (a_c * g_n) ** 2 / (a_n * g_c) ** 2)).clamp_min(0.0)
        noise_coef = torch.sqrt((g_n**2 - c2).clamp_min(0.0))
        A = a_n / a_c
        B = a_n * g_c**2 / a_c - g_c * noise_coef
        std_m = torch.sqrt(c2)
        parts = (a_c, a_n, g_c, noise_coef)
    else:
        e = eta if method == "em" else 0.0
        factor = 0.5 * (1.0 + e**2)
        f, g2 = sde.f_coef(sc), sde.g2(sc)
        A = 1.0 - f * h
        B = factor * g2 * h
        std_m = e * sde.g(sc) * torch.sqrt(h)
        parts = (f, g2, factor)
    std = _explored_std(std_m if brownian else torch.zeros_like(std_m), h, B, explore, action_std, sde.T, sc)
    return GaussianStep(method, float(eta), A, B, std, h, parts)


def _explored_std(std_m: Tensor, h: Tensor, B: Tensor, explore: float, action_std: ActionStd, T: float,
                  s_cur: Tensor) -> Tensor:
    """sqrt(std_m^2 + explore^2 h + B^2 action_std^2); a single non-zero term is returned as it is (no rounding)."""
    if callable(action_std):
        a_std = torch.as_tensor(action_std(rl_time(s_cur, T)), dtype=B.dtype)
    else:
        if not (float(action_std) >= 0 and math.isfinite(float(action_std))):
            raise ValueError(f"the action exploration std must be a finite number >= 0; got {action_std}")
        a_std = None if float(action_std) == 0.0 else torch.full_like(B, float(action_std))
    if explore < 0:
        raise ValueError(f"the exploration noise must be >= 0; got {explore}")
    terms = [] if not bool((std_m != 0).any()) else [std_m]
    if explore > 0:
        terms.append(explore * torch.sqrt(h))
    if a_std is not None:
        terms.append(B.abs() * a_std)
    if not terms:
        return std_m
    if len(terms) == 1:
        return terms[0]
    return torch.sqrt(sum(t**2 for t in terms))


# ------------------------------------------------------------------------------------------------
# densities and KLs of Gaussian transitions
# ------------------------------------------------------------------------------------------------
def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2 I) summed over the event dimensions; std has shape (n,). Returns (n,)."""
    d = x[0].numel()
    var = std**2
    return -0.5 * sum_event((x - mean) ** 2) / var - 0.5 * d * torch.log(2 * math.pi * var)


def transition_kl(mean_a: Tensor, mean_b: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean_a, std^2 I) || N(mean_b, std^2 I)) = ||mean_a - mean_b||^2 / (2 std^2), shape (n,).

    Two steps of the same sampler from the same state with different scores share their std, so this is the exact
    per-step KL between the fine-tuned and the pretrained chain (chapter 4)."""
    return sum_event((mean_a - mean_b) ** 2) / (2 * std**2)


def randn_on(generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device and moved to like's device
    (one CPU generator then drives CPU and GPU runs alike, as diffusers' randn_tensor does)."""
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
    return z.to(like.device)


# ------------------------------------------------------------------------------------------------
# the exact recursion: a Gaussian law through K affine Gaussian steps
# ------------------------------------------------------------------------------------------------
@dataclass
class GaussianChainLaw:
    """Exact laws N(means[k], covs[k]) of x_0, ..., x_K and the expected per-step quadratic costs ``kl_steps``."""

    means: np.ndarray      # (K+1, d)
    covs: np.ndarray       # (K+1, d, d)
    kl_steps: np.ndarray   # (K,)

    @property
    def mean(self) -> np.ndarray:
        """Mean of the terminal law, (d,)."""
        return self.means[-1]

    @property
    def cov(self) -> np.ndarray:
        """Covariance of the terminal law, (d, d)."""
        return self.covs[-1]

    @property
    def kl(self) -> float:
        return float(self.kl_steps.sum())


def _as_mats(v, K: int, d: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim <= 1 and a.size in (1, K) and d >= 1:           # scalars per step: times the identity
        a = np.broadcast_to(a.reshape(-1), (K,))[:, None, None] * np.eye(d)
    return np.broadcast_to(a, (K, d, d))


def _as_vecs(v, K: int, d: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim <= 1 and d == 1:
        a = np.broadcast_to(a.reshape(-1), (K,))[:, None]
    return np.broadcast_to(a, (K, d))


def gaussian_chain(gain, offset, std, mean0, cov0, cost_gain=None, cost_offset=None,
                   cost_weight=None) -> GaussianChainLaw:
    """Propagate N(mean0, cov0) exactly through x_{k+1} = G_k x_k + o_k + std_k z_k, k = 0..K-1.

    Args:
        gain: G_k, shape (K, d, d), or (K,) per-step scalars (times the identity).
        offset: o_k, shape (K, d) (or (K,) when d = 1).
        std: std_k, shape (K,).
        mean0, cov0: the initial law, (d,) and (d, d) (scalars when d = 1).
        cost_gain, cost_offset, cost_weight: an optional quadratic cost per step,
            kl_k = cost_weight_k / 2 * E||D_k x_k + e_k||^2 (D_k = cost_gain, e_k = cost_offset), whose expectation
            under the exact law of x_k is ``kl_steps[k]`` = w_k/2 (||D m + e||^2 + tr(D C D^T)). With D x + e the
            difference of the fine-tuned and pretrained step means and w = 1/std^2 it is the exact per-step KL of
            chapter 4; with D x + e the score difference and w = int g^2 over the step, the Girsanov-weighted sum.

    Returns a :class:`GaussianChainLaw` (numpy float64). The update is m' = G m + o, C' = G C G^T + std^2 I.
    """
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    K = std.size
    m = np.asarray(mean0, dtype=np.float64).reshape(-1)
    d = m.size
    C = np.asarray(cov0, dtype=np.float64).reshape(d, d)
    G, o = _as_mats(gain, K, d), _as_vecs(offset, K, d)
    with_cost = cost_weight is not None
    if with_cost:
        D, e = _as_mats(cost_gain, K, d), _as_vecs(cost_offset, K, d)
        w = np.broadcast_to(np.asarray(cost_weight, dtype=np.float64).reshape(-1), (K,))
    means, covs, kls = np.empty((K + 1, d)), np.empty((K + 1, d, d)), np.zeros(K)
    means[0], covs[0] = m, C
    eye = np.eye(d)
    for k in range(K):
        if with_cost:
            u = D[k] @ m + e[k]
            kls[k] = 0.5 * w[k] * (u @ u + np.trace(D[k] @ C @ D[k].T))
        m = G[k] @ m + o[k]
        C = G[k] @ C @ G[k].T + std[k] ** 2 * eye
        means[k + 1], covs[k + 1] = m, C
    return GaussianChainLaw(means, covs, kls)


def affine_coefficients(score_fn: Callable[[Tensor, Tensor], Tensor], s: Tensor, at: Tensor,
                        event_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Read an affine score off its values: score(s_k, x) = S_k x + b_k for x near ``at`` (exact for affine scores).

    s: diffusion times (K,); at: points (K, d) around which the map is read (any point works for an affine score; the
    current mean keeps the arithmetic well scaled). Returns S (K, d, d) and b (K, d) as numpy float64. One call of
    the score on K (d + 1) points.
    """
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
    at = torch.as_tensor(at, dtype=torch.float64).reshape(s.numel(), -1)
    K, d = at.shape
    pts = (at[:, None, :] + torch.cat([torch.zeros(1, d, dtype=at.dtype), torch.eye(d, dtype=at.dtype)])[None])
    vals = score_fn(s.repeat_interleave(d + 1), pts.reshape(K * (d + 1), *event_shape))
    vals = vals.reshape(K, d + 1, d).detach().cpu().numpy()
    S = np.transpose(vals[:, 1:] - vals[:, :1], (0, 2, 1))            # columns S e_i
    b = vals[:, 0] - np.einsum("kij,kj->ki", S, at.numpy())
    return S, b


__all__ = ["AFFINE_METHODS", "GaussianStep", "gaussian_step", "gaussian_log_prob", "transition_kl", "randn_on",
           "GaussianChainLaw", "gaussian_chain", "affine_coefficients"]
