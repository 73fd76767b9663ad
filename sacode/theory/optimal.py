"""Optimal fine-tuning in closed form: Cole-Hopf, the Doob h-transform, tilted laws and J* (chapter 5).

The control problem of chapter 3 (chapters 4, 5): in RL time t = T - s, with action a (a score),

    dX_t = [-f(s, X_t) + g(s)^2 a] dt + g(s) dB_t,     X_0 ~ N(0, p^2 I)   (the sampler's prior, *fixed*),
    J(a) = E[ r(X_T) - beta int_0^T 1/2 g(s)^2 ||a - s_pre(s, X_t)||^2 dt ].

With the exact pretrained score s_pre = grad log p_s of the data law p_0 (sacode.theory.data) everything is explicit:

* **Cole-Hopf / Doob h-transform.** V*(t, x) = beta log h(t, x), h(t, x) = E_pre[e^{r(X_T)/beta} | X_t = x].
  Under the exact-score sampler X_T | X_t = x is the posterior X_0 | Y_s = x of the forward process, a Gaussian
  mixture, so h is a Gaussian integral per component (linear and quadratic rewards).
  V* solves the HJB equation
      d_t V + (-f + g^2 s_pre) . grad V + 1/2 g^2 Lap V + g^2/(2 beta) ||grad V||^2 = 0,   V(T, .) = r,
  and the optimal action is a* = s_pre + grad V*/beta.
* **Optimal score = score of the noised tilt.** p_s(x) h(t, x) = Z p~_s(x) with p~_0 = p_0 e^{r/beta}/Z (the naive
  tilt, a Gaussian mixture again), so a*(t, x) = grad log p~_s(x): the optimal sampler is the exact reverse SDE
  of p~_0 -- but started from N(0, p^2 I) instead of p~_T.
* **Terminal law with the initial law fixed.** X_T | X_0 = y is the tilt of the posterior p(x_0 | Y_T = y) by
  e^{r/beta}, i.e. the posterior of p~_0 given Y_T = y; the terminal law is its mixture over y ~ N(0, p^2 I).
  Gaussian data: a Gaussian, by the law of total variance. Mixtures: tensor-product Gauss-Hermite quadrature over y.
  It equals the naive tilt p~_0 only when X_T forgets X_0 (alpha_T -> 0: "memoryless").
* **Optimal objective.** J* = E_y V*(0, y) = E_{p*}[r] - beta KL, with KL = E int 1/2 g^2 ||a* - s_pre||^2 dt
  = E_y KL(tilt_y || posterior_y) (Girsanov; chapter 4).

API (``preset`` is a :class:`sacode.theory.presets.ToyPreset`: VP SDE, Gaussian or mixture data, linear or quadratic reward):

=====================================================  ============================================================
``optimal_value(preset, t, x)``                        V*(t, x) = beta log h (Cole-Hopf; posterior integral)
``log_doob_h(preset, t, x)``                           log h(t, x)
``optimal_value_grad(preset, t, x)``                   grad V*(t, x) (closed form)
``optimal_control(preset, t, x)``                      a* - s_pre = grad V*/beta
``optimal_score(preset)`` / ``pretrained_score(...)``  ``score(s, x)`` callables for ``sacode.dynamics.samplers``
``naive_tilt(preset)``                                 p_data e^{r/beta}/Z as a GaussianMixture; ``log_partition``
``optimal_terminal_law(preset)``                       TerminalLaw(mean, cov, weights) with the start fixed
``pretrained_terminal_law`` / ``naive_tilt_law``       the same for the pretrained sampler / the naive tilt
``conditional_optimal_law(preset, y)``                 Law(X_T | X_0 = y) under the optimum (a MixturePosterior)
``optimal_objective(preset)``                          OptimalObjective(J, expected_reward, kl, J_naive, ...)
``optimal_marginal_law`` / ``optimal_path_kl_rate``    Gaussian presets: law of X_t, Girsanov KL rate at time t
``hjb_residual(preset, t, x)``                         the four HJB terms by float64 autograd
``sample_optimal`` / ``sample_optimal_coupled``        Monte-Carlo rollouts (reward, discretised path KL)
``discrete_gaussian_objective(preset, grid)``          exact law and objective of the discrete sampler (Gaussian)
``mode_misassignment_bound(preset)``                   error bound of nearest-mode weight estimates
=====================================================  ============================================================

Time conventions: functions named with ``t`` take RL time (V*, the control); score functions take diffusion time s
(the sampler protocol ``score(s, x)``). Conversions go through :mod:`sacode.dynamics.time`. Shapes: x of shape (n,) for
1-D presets, (n, d) or (n, *event) otherwise; t a scalar or of shape (n,). Use float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..dynamics.shapes import as_time, sum_event
from .data import GaussianMixture, MixturePosterior
from .exact_laws import reverse_sde_terminal_law
from .presets import ToyPreset
from .rewards import LinearReward, QuadraticReward
from ..dynamics.gaussian_step import affine_coefficients, gaussian_chain, gaussian_step
from ..dynamics.grid import TimeGrid
from ..dynamics.samplers import reverse_sde_sample
from ..dynamics.sde import LinearSDE, ScoreFn
from ..dynamics.time import diffusion_time

__all__ = [
    "log_doob_h", "optimal_value", "optimal_value_grad", "optimal_control", "optimal_score", "pretrained_score",
    "naive_tilt", "log_partition", "conditional_optimal_law", "TerminalLaw", "optimal_terminal_law",
    "pretrained_terminal_law", "naive_tilt_law", "OptimalObjective", "optimal_objective", "HJBTerms",
    "hjb_residual", "OptimalRollout", "sample_optimal", "sample_optimal_coupled", "DiscreteGaussianLaw",
    "discrete_gaussian_objective",
    "gauss_hermite", "optimal_marginal_law", "optimal_path_kl_rate", "mode_misassignment_bound",
]

DEFAULT_NODES = 40
"""Gauss-Hermite nodes per dimension for the mixture terminal law and J* (error estimate reported alongside)."""


# ------------------------------------------------------------------------------------------------
# the tilt of a Gaussian mixture by e^{r/beta}
# ------------------------------------------------------------------------------------------------
def _check_preset(preset: ToyPreset) -> None:
    if not isinstance(preset.reward, (LinearReward, QuadraticReward)):
        raise TypeError(f"closed forms exist for LinearReward and QuadraticReward only; got {preset.reward!r}. "
                        "Use one of the toy presets (sacode.theory.presets.toy_preset) or build a ToyPreset with one.")
    if not preset.beta > 0:
        raise ValueError(f"the KL weight beta must be positive; got {preset.beta}")
    if preset.reward.__class__ is LinearReward and preset.reward.w.numel() != preset.data.d:
        raise ValueError(f"LinearReward has {preset.reward.w.numel()} weights but the data has d = {preset.data.d}")
    if preset.reward.__class__ is QuadraticReward and preset.reward.center.numel() != preset.data.d:
        raise ValueError(f"QuadraticReward center has {preset.reward.center.numel()} coordinates but d = "
                         f"{preset.data.d}")


def _tilt(reward, beta: float, means: Tensor, var_eig: Tensor, U: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tilt each Gaussian N(means[n, k], U_k diag(var_eig[n, k]) U_k^T) by e^{r(x)/beta}.

    Returns (log_E, means', var_eig') with log_E[n, k] = log E_{N_k}[e^{r/beta}] and the tilted component
    N(means', U_k diag(var_eig') U_k^T) (same eigenbasis). Closed forms (completing the square):

    * linear r = w.x:  log E = w.m/beta + ||P^{1/2} w||^2/(2 beta^2),  m' = m + P w/beta,  P' = P;
    * quadratic r = -(lam/2)||x - c||^2, kappa = lam/beta, z = U^T (m - c):
      log E = -1/2 sum log(1 + kappa p) - kappa/2 sum z^2/(1 + kappa p),
      m' = m - U (kappa p/(1 + kappa p) z),  p' = p/(1 + kappa p).
    """
    U = U.to(means)
    if isinstance(reward, LinearReward):
        w = reward.w.to(means)
        we = torch.einsum("kji,j->ki", U, w)                                         # U_k^T w, (K, d)
        log_E = means @ w / beta + 0.5 * (var_eig * we[None] ** 2).sum(-1) / beta**2
        shift = torch.einsum("kij,nkj->nki", U, var_eig * we[None]) / beta
        return log_E, means + shift, var_eig
    if isinstance(reward, QuadraticReward):
        c = reward.center.to(means)
        kappa = reward.lam / beta
        z = torch.einsum("kji,nkj->nki", U, means - c)                                # U_k^T (m - c)
        shrink = 1.0 / (1.0 + kappa * var_eig)
        log_E = 0.5 * torch.log(shrink).sum(-1) - 0.5 * kappa * (z**2 * shrink).sum(-1)
        new_means = means - torch.einsum("kij,nkj->nki", U, kappa * var_eig * shrink * z)
        return log_E, new_means, var_eig * shrink
    raise TypeError(f"no closed-form tilt for {reward!r}")


def _log_weights(weights: Tensor) -> Tensor:
    # clamp: a responsibility that underflows to 0 contributes e^{-745} instead of 0 and keeps autograd finite
    return torch.log(weights.clamp_min(torch.finfo(weights.dtype).tiny))


def _tilt_posterior(preset: ToyPreset, post: MixturePosterior) -> tuple[Tensor, MixturePosterior]:
    """log h = log E[e^{r/beta}] under the mixture ``post`` and the tilted mixture (normalised weights)."""
    log_E, means, var_eig = _tilt(preset.reward, preset.beta, post.means, post.var_eig, post.U)
    logits = _log_weights(post.weights) + log_E
    log_h = torch.logsumexp(logits, dim=1)
    return log_h, MixturePosterior(torch.softmax(logits, dim=1), means, var_eig, post.U, post.event_shape)


# ------------------------------------------------------------------------------------------------
# the value function, the optimal control and the optimal score
# ------------------------------------------------------------------------------------------------
def log_doob_h(preset: ToyPreset, t: float | Tensor, x: Tensor) -> Tensor:
    """log h(t, x), h(t, x) = E_pre[e^{r(X_T)/beta} | X_t = x] (Doob's h, chapter 5), shape (n,).

    Uses Law(X_T | X_t = x) = Law(X_0 | Y_s = x), s = T - t, under the exact-score pretrained sampler
    (``data.posterior``), and the closed-form Gaussian integral of each posterior component (:func:`_tilt`).
    """
    _check_preset(preset)
    s = diffusion_time(as_time(t, x), preset.sde.T)
    return _tilt_posterior(preset, preset.data.posterior(preset.sde, s, x))[0]


def optimal_value(preset: ToyPreset, t: float | Tensor, x: Tensor) -> Tensor:
    """V*(t, x) = beta log h(t, x) (Cole-Hopf), shape (n,). t is RL time; V*(T, x) = r(x)."""
    return preset.beta * log_doob_h(preset, t, x)


def naive_tilt(preset: ToyPreset) -> GaussianMixture:
    """The tilted data law p~_0 = p_data e^{r/beta} / Z, a Gaussian mixture (tilted weights, shifted means).

    For w_k N(m_k, C_k) data: linear r gives N(m_k + C_k w/beta, C_k) with weight
    proportional to w_k exp(w.m_k/beta + w^T C_k w/(2 beta^2)); quadratic r gives precision C_k^{-1} + (lam/beta) I.
    """
    _check_preset(preset)
    data = preset.data
    means, lam = data.means[None], data.lam[None]
    log_E, new_means, new_lam = _tilt(preset.reward, preset.beta, means, lam, data.U)
    w = torch.softmax(torch.log(data.weights) + log_E[0], dim=0)
    covs = torch.einsum("kij,kj,klj->kil", data.U, new_lam[0], data.U)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    return GaussianMixture(w, new_means[0], covs, data.event_shape)


def log_partition(preset: ToyPreset) -> float:
    """log Z = log E_{p_data}[e^{r/beta}]; beta log Z is the optimal value if the initial law could be tilted too."""
    _check_preset(preset)
    data = preset.data
    log_E, _, _ = _tilt(preset.reward, preset.beta, data.means[None], data.lam[None], data.U)
    return float(torch.logsumexp(torch.log(data.weights) + log_E[0], dim=0))


class _AffineGaussianScore:
    """Fast exact score of a single Gaussian N(m, U diag(lam) U^T) noised by a linear SDE (affine in x):

    grad log p_s(x) = -U diag(1/(alpha^2 lam + sigma^2)) U^T (x - alpha m).  Same values as
    ``GaussianMixture.score`` with far fewer operations (used inside long rollouts).
    """

    def __init__(self, sde: LinearSDE, data: GaussianMixture):
        if data.K != 1:
            raise ValueError("_AffineGaussianScore needs a single Gaussian (K = 1)")
        self.sde, self.data = sde, data

    def __call__(self, s: Tensor, x: Tensor) -> Tensor:
        xf = x.reshape(x.shape[0], -1)
        s = as_time(s, xf)
        a, sg = self.sde.alpha(s).to(xf), self.sde.sigma(s).to(xf)
        lam, U, m = self.data.lam[0].to(xf), self.data.U[0].to(xf), self.data.means[0].to(xf)
        prec = 1.0 / (a[:, None] ** 2 * lam[None] + sg[:, None] ** 2)                  # (n, d)
        z = (xf - a[:, None] * m[None]) @ U                                             # U^T (x - a m)
        return (-(prec * z) @ U.T).reshape(x.shape)


def _score_fn(sde: LinearSDE, data: GaussianMixture) -> ScoreFn:
    return _AffineGaussianScore(sde, data) if data.K == 1 else data.score_fn(sde)


def pretrained_score(preset: ToyPreset) -> ScoreFn:
    """s_pre(s, x): the exact score of the data law (the pretrained model of the toy presets), diffusion time."""
    return _score_fn(preset.sde, preset.data)


def optimal_score(preset: ToyPreset) -> ScoreFn:
    """a*(s, x) = s_pre + grad V*/beta = grad log p~_s(x): the optimal action as a ``score(s, x)`` callable.

    s is diffusion time (the sampler protocol), so ``reverse_sde_sample(sde, optimal_score(preset), ...)`` runs the
    optimally fine-tuned sampler. Identity: p_s h(T - s, .) = Z p~_s with p~ = :func:`naive_tilt`.
    """
    return _score_fn(preset.sde, naive_tilt(preset))


def optimal_control(preset: ToyPreset, t: float | Tensor, x: Tensor) -> Tensor:
    """a*(t, x) - s_pre(T - t, x) = grad V*(t, x) / beta, shape like x (RL time t)."""
    s = diffusion_time(as_time(t, x), preset.sde.T)
    return optimal_score(preset)(s, x) - pretrained_score(preset)(s, x)


def optimal_value_grad(preset: ToyPreset, t: float | Tensor, x: Tensor) -> Tensor:
    """grad_x V*(t, x) = beta (grad log p~_s - grad log p_s)(x), closed form, shape like x."""
    return preset.beta * optimal_control(preset, t, x)


# ------------------------------------------------------------------------------------------------
# the terminal law with the initial law fixed, and J*
# ------------------------------------------------------------------------------------------------
def gauss_hermite(d: int, n_nodes: int, std: float = 1.0) -> tuple[Tensor, Tensor]:
    """Tensor-product Gauss-Hermite rule for E f(Y), Y ~ N(0, std^2 I_d): nodes (n_nodes^d, d), weights (sum 1).

    Exact for polynomials of degree <= 2 n_nodes - 1 in each coordinate.
    """
    if n_nodes ** d > 400_000:
        raise ValueError(f"{n_nodes}^{d} quadrature nodes are too many; lower n_nodes (the tensor-product rule "
                         "suits d <= 3)")
    x1, w1 = np.polynomial.hermite_e.hermegauss(n_nodes)
    w1 = w1 / math.sqrt(2 * math.pi)
    grids = np.meshgrid(*([x1] * d), indexing="ij")
    wgrids = np.meshgrid(*([w1] * d), indexing="ij")
    nodes = np.stack([g.ravel() for g in grids], axis=1) * std
    weights = np.prod(np.stack([g.ravel() for g in wgrids], axis=1), axis=1)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def conditional_optimal_law(preset: ToyPreset, y: Tensor) -> MixturePosterior:
    """Law of X_T given X_0 = y under the optimal sampler: p(x | Y_T = y) e^{r(x)/beta} / h(0, y).

    It is the posterior of the tilted data p~_0 given Y_T = y (a Gaussian mixture per y).
    """
    _check_preset(preset)
    T = torch.tensor(preset.sde.T, dtype=torch.float64)
    return _tilt_posterior(preset, preset.data.posterior(preset.sde, T, y))[1]


@dataclass
class TerminalLaw:
    """Mean (d,), covariance (d, d) and mode weights (K,) of a terminal law.

    ``weights[k]`` is the probability of (tilted) data component k; ``quad_error`` estimates the quadrature error
    (max abs change of every entry between n and 3n/4 nodes; 0 for closed forms); ``method`` says which.
    """

    mean: Tensor
    cov: Tensor
    weights: Tensor
    quad_error: float
    method: str

    @property
    def var(self) -> Tensor:
        """Diagonal of the covariance (the variance for 1-D presets)."""
        return torch.diagonal(self.cov)


def _mixture_law(mix: GaussianMixture) -> TerminalLaw:
    return TerminalLaw(mix.mean(), mix.cov(), mix.weights.clone(), 0.0, "closed-form")


def _law_from_posteriors(post: MixturePosterior, qw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Average per-node mixtures with quadrature weights: mean, covariance (total variance), mode weights."""
    covk = torch.einsum("kij,nkj,klj->nkil", post.U, post.var_eig, post.U)
    w = post.weights * qw[:, None]                                                    # (N, K)
    mean = torch.einsum("nk,nki->i", w, post.means)
    second = torch.einsum("nk,nkij->ij", w, covk) + torch.einsum("nk,nki,nkj->ij", w, post.means, post.means)
    cov = second - mean[:, None] * mean[None, :]
    return mean, 0.5 * (cov + cov.T), w.sum(0)


def _quadrature_law(sde: LinearSDE, mix: GaussianMixture, tilt_preset: ToyPreset | None, n_nodes: int):
    T = torch.tensor(sde.T, dtype=torch.float64)
    out = []
    for n in (n_nodes, max(2, (3 * n_nodes) // 4)):
        y, qw = gauss_hermite(mix.d, n, sde.prior_std())
        post = mix.posterior(sde, T, y.reshape(-1, *mix.event_shape))
        if tilt_preset is not None:
            post = _tilt_posterior(tilt_preset, post)[1]
        out.append(_law_from_posteriors(post, qw))
    err = max(float((a - b).abs().max()) for a, b in zip(out[0], out[1]))
    return TerminalLaw(*out[0], err, f"gauss-hermite {n_nodes}^{mix.d}")


def _gaussian_fixed_init(preset: ToyPreset):
    """Eigen-coordinates of the Gaussian-data formulas (K = 1): alpha_T, p^2, m', lam, U, G, P.

    Posterior X_0 | Y_T = y ~ N(m + U G U^T (y - alpha m), U diag(P) U^T), G = alpha lam/Sigma, P = lam sigma^2/Sigma,
    Sigma = alpha^2 lam + sigma^2 (in the eigenbasis of C).
    """
    sde, data = preset.sde, preset.data
    T = torch.tensor(sde.T, dtype=torch.float64)
    a, sg = float(sde.alpha(T)), float(sde.sigma(T))
    lam, U = data.lam[0], data.U[0]
    Sig = a**2 * lam + sg**2
    G, P = a * lam / Sig, lam * sg**2 / Sig
    m_e = U.T @ data.means[0]
    return a, sde.prior_std() ** 2, m_e, lam, U, G, P


def optimal_terminal_law(preset: ToyPreset, method: str = "auto", n_nodes: int = DEFAULT_NODES) -> TerminalLaw:
    """Law of X_T under the optimal sampler started from the fixed prior N(0, p^2 I).

    ``method="closed-form"`` (Gaussian data only; the default there): law of total variance over y, per
    eigen-coordinate i with E mu_i = m_i (1 - alpha G_i), Var mu_i = p^2 G_i^2 (posterior mean mu(y)):
      linear     mean_i = E mu_i + P_i w_i/beta,                 var_i = P_i + p^2 G_i^2;
      quadratic  A_i = 1/(1 + kappa P_i): mean_i = A_i E mu_i + (1 - A_i) c_i,  var_i = A_i P_i + p^2 A_i^2 G_i^2.
    ``method="quadrature"`` (the default for mixtures): Gauss-Hermite over y of the conditional tilts
    (:func:`conditional_optimal_law`).
    """
    _check_preset(preset)
    method = _resolve(preset, method)
    if method == "quadrature":
        return _quadrature_law(preset.sde, preset.data, preset, n_nodes)
    a, p2, m_e, lam, U, G, P = _gaussian_fixed_init(preset)
    Emu = m_e * (1 - a * G)
    if isinstance(preset.reward, LinearReward):
        w_e = U.T @ preset.reward.w
        mean_e, var_e = Emu + P * w_e / preset.beta, P + p2 * G**2
    else:
        c_e = U.T @ preset.reward.center
        A = 1.0 / (1.0 + preset.reward.lam / preset.beta * P)
        mean_e, var_e = A * Emu + (1 - A) * c_e, A * P + p2 * A**2 * G**2
    return TerminalLaw(U @ mean_e, U @ torch.diag(var_e) @ U.T, torch.ones(1, dtype=torch.float64), 0.0,
                       "closed-form")


def pretrained_terminal_law(preset: ToyPreset, method: str = "auto", n_nodes: int = DEFAULT_NODES) -> TerminalLaw:
    """Law of X_T under the exact-score pretrained sampler from N(0, p^2 I) (``sacode.theory.exact_laws`` for Gaussians)."""
    method = _resolve(preset, method)
    if method == "quadrature":
        return _quadrature_law(preset.sde, preset.data, None, n_nodes)
    mean, cov = reverse_sde_terminal_law(preset.data, preset.sde)
    return TerminalLaw(mean, cov, torch.ones(1, dtype=torch.float64), 0.0, "closed-form")


def naive_tilt_law(preset: ToyPreset) -> TerminalLaw:
    """Mean, covariance and weights of the naive tilt p_data e^{r/beta}/Z (the memoryless-limit optimum)."""
    return _mixture_law(naive_tilt(preset))


def _resolve(preset: ToyPreset, method: str) -> str:
    if method not in ("auto", "closed-form", "quadrature"):
        raise ValueError(f"method must be 'auto', 'closed-form' or 'quadrature'; got {method!r}")
    if method == "auto":
        return "closed-form" if preset.data.K == 1 else "quadrature"
    if method == "closed-form" and preset.data.K != 1:
        raise ValueError(f"the closed-form terminal law needs Gaussian data (K = 1); {preset.name} has "
                         f"K = {preset.data.K}: use method='quadrature'")
    return method


def _expected_reward(reward, mean: Tensor, cov: Tensor) -> float:
    if isinstance(reward, LinearReward):
        return float(reward.w @ mean)
    return float(-0.5 * reward.lam * (torch.trace(cov) + ((mean - reward.center) ** 2).sum()))


@dataclass
class OptimalObjective:
    """J* = E_y V*(0, y) and its split J* = E_{p*}[r] - beta KL (path KL of the optimal sampler).

    ``J_naive`` = beta log Z is what the naive tilt would score if the initial law could be tilted too (the
    memoryless limit); ``expected_reward_pretrained`` is E r(X_T) under the pretrained sampler (KL = 0).
    """

    J: float
    expected_reward: float
    kl: float
    beta: float
    J_naive: float
    expected_reward_pretrained: float
    quad_error: float
    method: str

    @property
    def beta_kl(self) -> float:
        return self.beta * self.kl


def optimal_objective(preset: ToyPreset, method: str = "auto", n_nodes: int = DEFAULT_NODES) -> OptimalObjective:
    """Exact J*, E_{p*} r and KL for a preset (sampler started from the fixed prior N(0, p^2 I)).

    Gaussian data (closed form, eigen-coordinates as in :func:`optimal_terminal_law`):
      linear     J* = w.E mu + sum_i P_i w_i^2/(2 beta);
      quadratic  J* = sum_i [-beta/2 log(1 + kappa P_i) - lam/2 A_i ((E mu_i - c_i)^2 + p^2 G_i^2)].
    Mixtures: J* = beta E_y log h(0, y) by Gauss-Hermite quadrature. In both, KL = (E_{p*} r - J*)/beta.
    """
    _check_preset(preset)
    method = _resolve(preset, method)
    law = optimal_terminal_law(preset, method, n_nodes)
    pre = pretrained_terminal_law(preset, method, n_nodes)
    beta, reward = preset.beta, preset.reward
    if method == "closed-form":
        a, p2, m_e, lam, U, G, P = _gaussian_fixed_init(preset)
        Emu = m_e * (1 - a * G)
        if isinstance(reward, LinearReward):
            w_e = U.T @ reward.w
            J = float(w_e @ Emu + (P * w_e**2).sum() / (2 * beta))
        else:
            c_e = U.T @ reward.center
            kappa = reward.lam / beta
            A = 1.0 / (1.0 + kappa * P)
            J = float((-0.5 * beta * torch.log1p(kappa * P)
                       - 0.5 * reward.lam * A * ((Emu - c_e) ** 2 + p2 * G**2)).sum())
        err = 0.0
    else:
        Js = []
        for n in (n_nodes, max(2, (3 * n_nodes) // 4)):
            y, qw = gauss_hermite(preset.data.d, n, preset.sde.prior_std())
            y = y.reshape(-1, *preset.data.event_shape)
            Js.append(float(qw @ optimal_value(preset, 0.0, y)))
        J, err = Js[0], max(abs(Js[0] - Js[1]), law.quad_error)
    Er = _expected_reward(reward, law.mean, law.cov)
    return OptimalObjective(J=J, expected_reward=Er, kl=(Er - J) / beta, beta=beta,
                            J_naive=beta * log_partition(preset),
                            expected_reward_pretrained=_expected_reward(reward, pre.mean, pre.cov),
                            quad_error=err, method=method)


def _gaussian_reverse_marginal(sde: LinearSDE, mix: GaussianMixture, s: float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of X_t (s = T - t) for the exact reverse SDE of Gaussian data ``mix`` from N(0, p^2 I).

    Given X_0 = y the reversal is the forward bridge: X_t | y ~ Law(Y_s | Y_T = y). Per eigen-coordinate,
    V_s = alpha_s^2 lam + sigma_s^2, Cov(Y_s, Y_T) = (alpha_T/alpha_s) V_s, k = Cov/V_T, and over y ~ N(0, p^2):
    mean = alpha_s m - k alpha_T m,  var = V_s - k Cov + p^2 k^2.
    """
    sv, Tv = torch.tensor(float(s), dtype=torch.float64), torch.tensor(sde.T, dtype=torch.float64)
    a_s, g_s, a_T, g_T = (float(f(v)) for f, v in ((sde.alpha, sv), (sde.sigma, sv), (sde.alpha, Tv), (sde.sigma, Tv)))
    lam, U, m_e = mix.lam[0], mix.U[0], mix.U[0].T @ mix.means[0]
    V_s, V_T = a_s**2 * lam + g_s**2, a_T**2 * lam + g_T**2
    cov_sT = a_T / a_s * V_s
    k = cov_sT / V_T
    mean_e = a_s * m_e - k * a_T * m_e
    var_e = V_s - k * cov_sT + sde.prior_std() ** 2 * k**2
    return U @ mean_e, U @ torch.diag(var_e) @ U.T


def optimal_marginal_law(preset: ToyPreset, t: float) -> tuple[Tensor, Tensor]:
    """Mean (d,) and covariance (d, d) of X_t under the optimal sampler from N(0, p^2 I) (Gaussian presets).

    The optimal sampler is the exact reverse SDE of the tilted data p~_0 (:func:`optimal_score`), so X_t | X_0 = y
    is the forward bridge of p~ (see ``_gaussian_reverse_marginal``). At t = T this is :func:`optimal_terminal_law`.
    """
    if preset.data.K != 1:
        raise ValueError(f"{preset.name}: optimal_marginal_law needs Gaussian data (K = 1)")
    return _gaussian_reverse_marginal(preset.sde, naive_tilt(preset), diffusion_time(float(t), preset.sde.T))


def optimal_path_kl_rate(preset: ToyPreset, t: float) -> float:
    """1/2 g(s)^2 E||a*(t, X_t) - s_pre(s, X_t)||^2 under the optimal sampler at RL time t (Gaussian presets).

    Both scores are affine, a* - s_pre = D x + e, so E||D X + e||^2 = ||D mean + e||^2 + tr(D cov D^T) with
    the law of :func:`optimal_marginal_law`. int_0^T of this rate is the path KL of the optimal sampler (Girsanov).
    """
    mean, cov = optimal_marginal_law(preset, t)
    d, ev = preset.data.d, preset.event_shape
    s = diffusion_time(float(t), preset.sde.T)
    pts = torch.cat([mean[None], mean[None] + torch.eye(d, dtype=torch.float64)]).reshape(-1, *ev)
    sv = torch.full((d + 1,), s, dtype=torch.float64)
    ctl = (optimal_score(preset)(sv, pts) - pretrained_score(preset)(sv, pts)).reshape(d + 1, d)
    e0, D = ctl[0], (ctl[1:] - ctl[0]).T
    g2 = float(preset.sde.g2(torch.tensor(s, dtype=torch.float64)))
    return 0.5 * g2 * float((e0**2).sum() + torch.trace(D @ cov @ D.T))


def mode_misassignment_bound(preset: ToyPreset, n_nodes: int = 24) -> float:
    """Upper bound on the mass of the optimal terminal law that ``data.nearest_component`` assigns to another mode.

    Mode weights estimated by nearest-mode counting differ from the component weights of
    :func:`optimal_terminal_law` by at most this much (add it to a Monte-Carlo tolerance).

    With equal weights and equal isotropic covariances the data's cells are the Voronoi cells of the means, an
    intersection of half-planes; a tilted component N(mu, p I) leaves the half-plane against mode j with probability
    Phi(-dist/sqrt(p)) (union bound over j), averaged over y by Gauss-Hermite.
    """
    data = preset.data
    iso = torch.allclose(data.covs, data.covs[0, 0, 0] * torch.eye(data.d, dtype=torch.float64).expand_as(data.covs))
    if not (iso and torch.allclose(data.weights, data.weights[0].expand_as(data.weights))):
        raise ValueError("the misassignment bound needs data with equal weights and equal isotropic covariances "
                         "(then nearest_component picks the nearest mean)")
    y, qw = gauss_hermite(data.d, n_nodes, preset.sde.prior_std())
    post = conditional_optimal_law(preset, y)
    m = data.means
    bound = torch.zeros(y.shape[0], dtype=torch.float64)
    for k in range(data.K):
        sd = post.var_eig[:, k].max(-1).values.sqrt()                                # (N,)
        leave = torch.zeros_like(sd)
        for j in range(data.K):
            if j != k:
                nrm = (m[j] - m[k]).norm()
                dist = (0.5 * (m[j].dot(m[j]) - m[k].dot(m[k])) - post.means[:, k] @ (m[j] - m[k])) / nrm
                leave = leave + torch.special.ndtr(-dist / sd)
        bound = bound + post.weights[:, k] * leave.clamp(max=1.0)
    return float(qw @ bound)


# ------------------------------------------------------------------------------------------------
# the HJB residual
# ------------------------------------------------------------------------------------------------
@dataclass
class HJBTerms:
    """The four terms of the HJB equation at (t, x) and their sum (each of shape (n,)).

    time = d_t V, drift = (-f + g^2 s_pre) . grad V, diffusion = 1/2 g^2 Lap V, control = g^2/(2 beta) ||grad V||^2.
    """

    time: Tensor
    drift: Tensor
    diffusion: Tensor
    control: Tensor

    @property
    def residual(self) -> Tensor:
        return self.time + self.drift + self.diffusion + self.control

    @property
    def scale(self) -> Tensor:
        """max of |term| over the four terms, per point (the size the residual is measured against)."""
        return torch.stack([self.time.abs(), self.drift.abs(), self.diffusion.abs(), self.control.abs()]).amax(0)


def hjb_residual(preset: ToyPreset, t: Tensor, x: Tensor) -> HJBTerms:
    """Evaluate the HJB terms of V* at RL times t (n,) and states x (n, *event) by float64 autograd.

    V* is the posterior (Cole-Hopf) formula :func:`optimal_value`; s_pre is the data score. The derivatives are
    exact derivatives of the float64 computation, so the residual is rounding error if V* solves the HJB.
    """
    if x.dtype != torch.float64:
        raise TypeError("hjb_residual needs float64 inputs (the residual is a rounding-level check)")
    sde, beta = preset.sde, preset.beta
    t = as_time(t, x).detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    V = optimal_value(preset, t, x)
    dt, dx = torch.autograd.grad(V.sum(), (t, x), create_graph=True)
    dxf = dx.reshape(x.shape[0], -1)
    lap = torch.zeros_like(V)
    for j in range(dxf.shape[1]):
        h = torch.autograd.grad(dxf[:, j].sum(), x, retain_graph=True)[0].reshape(x.shape[0], -1)
        lap = lap + h[:, j]
    s = diffusion_time(t.detach(), sde.T)
    xd = x.detach()
    g2 = sde.g2(s)
    b = -sde.drift(s, xd) + (g2.reshape(-1, *([1] * (xd.ndim - 1)))) * preset.data.score(sde, s, xd)
    return HJBTerms(time=dt.detach(), drift=sum_event(b * dx.detach()), diffusion=0.5 * g2 * lap.detach(),
                    control=g2 / (2 * beta) * sum_event(dx.detach() ** 2))


# ------------------------------------------------------------------------------------------------
# rollouts of the optimal sampler (Monte Carlo) and the exact discrete law for Gaussian presets
# ------------------------------------------------------------------------------------------------
class _KLMeter:
    """Wraps a policy score for ``reverse_sde_sample``: returns a(s, x) and accumulates, per sample,
    the discretised path KL  sum_k 1/2 (int_{s_{k+1}}^{s_k} g^2) ||a(s_k, x_k) - s_pre(s_k, x_k)||^2."""

    def __init__(self, sde: LinearSDE, policy: ScoreFn, pre: ScoreFn, grid: TimeGrid):
        self.sde, self.policy, self.pre, self.grid = sde, policy, pre, grid
        self.weights = sde.int_g2(grid.s[1:], grid.s[:-1])
        self.k, self.kl = 0, None

    def __call__(self, s: Tensor, x: Tensor) -> Tensor:
        if self.k >= self.grid.K or abs(float(s.reshape(-1)[0]) - float(self.grid.s[self.k])) > 1e-12:
            raise RuntimeError("the KL meter is called once per step of its own grid; build a fresh one per rollout")
        a = self.policy(s, x)
        dkl = 0.5 * float(self.weights[self.k]) * sum_event((a - self.pre(s, x)) ** 2)
        self.kl = dkl if self.kl is None else self.kl + dkl
        self.k += 1
        return a


@dataclass
class OptimalRollout:
    """n Monte-Carlo rollouts of a sampler: terminal states x, rewards r(x) and discretised path KLs (n,)."""

    x: Tensor
    reward: Tensor
    kl: Tensor
    beta: float
    grid: TimeGrid

    @property
    def objective(self) -> Tensor:
        """Per-sample r(X_T) - beta * KL; its mean estimates J."""
        return self.reward - self.beta * self.kl


def sample_optimal(preset: ToyPreset, n: int, grid: TimeGrid, generator: torch.Generator | None = None,
                   noises: Tensor | None = None, x_init: Tensor | None = None,
                   policy: ScoreFn | None = None) -> OptimalRollout:
    """Run ``reverse_sde_sample`` (Euler-Maruyama, eta = 1) with the optimal score from N(0, p^2 I).

    Records the reward and the discretised path KL against the pretrained score. ``policy`` replaces the optimal
    score (e.g. the pretrained one); ``noises`` (K, n, *event) and ``x_init`` give common random numbers.
    """
    _check_preset(preset)
    sde = preset.sde
    meter = _KLMeter(sde, optimal_score(preset) if policy is None else policy, pretrained_score(preset), grid)
    x0 = sde.prior_sample((n, *preset.event_shape), generator) if x_init is None else x_init
    if x0.shape != (n, *preset.event_shape):
        raise ValueError(f"x_init must have shape {(n, *preset.event_shape)}; got {tuple(x0.shape)}")
    x = reverse_sde_sample(sde, meter, x0, grid, "em", 1.0, generator=generator, noises=noises).x
    return OptimalRollout(x, preset.reward(x), meter.kl, preset.beta, grid)


def sample_optimal_coupled(preset: ToyPreset, n: int, K: int, generator: torch.Generator | None = None
                           ) -> tuple[OptimalRollout, OptimalRollout]:
    """Rollouts on uniform grids with K and K/2 steps driven by the *same* Brownian path (and X_0).

    The coarse step uses (z_{2j} + z_{2j+1})/sqrt(2), the Brownian increment of two fine steps. Differences of any
    statistic between the two have a small variance, so for a weak-order-1 scheme (Euler-Maruyama) the
    Richardson estimate bias(K) ~ stat(K/2) - stat(K) resolves a discretisation bias far below the MC error of
    either run.
    """
    if K % 2:
        raise ValueError(f"K must be even for the coupled K/2 rollout; got K = {K}")
    ev = preset.event_shape
    x0 = preset.sde.prior_sample((n, *ev), generator)
    z = torch.randn((K, n, *ev), generator=generator, dtype=torch.float64)
    fine = sample_optimal(preset, n, TimeGrid.uniform(preset.sde.T, K), noises=z, x_init=x0)
    coarse = sample_optimal(preset, n, TimeGrid.uniform(preset.sde.T, K // 2),
                            noises=(z[0::2] + z[1::2]) / math.sqrt(2.0), x_init=x0)
    return fine, coarse


@dataclass
class DiscreteGaussianLaw:
    """Exact law and objective of the *discrete* optimal sampler on a grid (Gaussian presets, affine score)."""

    mean: Tensor
    cov: Tensor
    expected_reward: float
    kl: float
    objective: float


def discrete_gaussian_objective(preset: ToyPreset, grid: TimeGrid, method: str = "em") -> DiscreteGaussianLaw:
    """Propagate N(0, p^2 I) exactly through the discrete optimal sampler (affine score: x' = A x + b + std z).

    Each step is the sampler's :func:`~sacode.dynamics.gaussian_step.gaussian_step` with the affine optimal score
    a*(s_k, x) = S_k x + c_k read off the closed form, and the exact recursion
    :func:`~sacode.dynamics.gaussian_step.gaussian_chain` also accumulates the expected discretised path KL
    sum_k 1/2 (int g^2) E||D_k x_k + e_k||^2, D x + e = a* - s_pre, so the discretisation bias of a Monte-Carlo J
    estimate is known exactly.
    """
    if preset.data.K != 1:
        raise ValueError(f"{preset.name}: the exact discrete law needs Gaussian data (an affine optimal score)")
    sde, d, ev = preset.sde, preset.data.d, preset.event_shape
    s = grid.s[:-1]
    zeros = torch.zeros(grid.K, d, dtype=torch.float64)
    S_a, c_a = affine_coefficients(optimal_score(preset), s, zeros, ev)
    S_p, c_p = affine_coefficients(pretrained_score(preset), s, zeros, ev)
    st = gaussian_step(sde, s, grid.s[1:], method, 1.0)
    A, B = st.A.numpy(), st.B.numpy()
    law = gaussian_chain(A[:, None, None] * np.eye(d) + B[:, None, None] * S_a, B[:, None] * c_a, st.std.numpy(),
                         np.zeros(d), sde.prior_std() ** 2 * np.eye(d), S_a - S_p, c_a - c_p,
                         sde.int_g2(grid.s[1:], s).numpy())
    m, C = torch.from_numpy(law.mean.copy()), torch.from_numpy(law.cov.copy())
    Er = _expected_reward(preset.reward, m, C)
    return DiscreteGaussianLaw(m, C, Er, law.kl, Er - preset.beta * law.kl)
