"""The laws that inference-time steering converges to, in closed form (chapter 13).

A frozen sampler has a path law P: it starts from N(0, p^2 I) and runs the pretrained score. Three laws are in play
when it is steered towards a reward r with KL weight beta:

* the **fixed-initial optimum** P* of chapter 5, dP*/dP = e^{r(X_T)/beta} / h(0, X_0): the optimum over controls that
  keep the initial law; fine-tuning and guidance by grad V* aim at it. Value J* = E_y beta log h(0, y).
* the **tilted law** Q~, dQ~/dP = e^{r(X_T)/beta} / Z with Z = E_P e^{r(X_T)/beta}: what importance resampling and
  sequential Monte Carlo (SMC) with the usual initial potential converge to. Its terminal law is the tilt of the
  sampler's *output* law, p_out e^{r/beta} / Z, and Q~ is P* started from the tilted noise
  pi~(y) = N(y; 0, p^2 I) h(0, y) / Z. Its value is beta log Z >= J* (Jensen), and KL(Q~ || P) = E_Q~ r/beta - log Z.
* the **naive tilt** p_data e^{r/beta} / Z_data of chapter 5, which neither reaches unless the sampler forgets its
  start (then p_out = p_data and all three agree).

On a grid of K steps the sampler is a Markov chain and the same three laws exist for the chain. For 1-D Gaussian data
every step is affine-Gaussian (:func:`sacode.theory.discrete_optimum.pretrained_steps`), so X_K | X_k = x is
N(gain_k x + offset_k, var_k) (:class:`PretrainedChain`), and the discrete Cole-Hopf value

    V_K(k, x) = beta log h_K(k, x),     h_K(k, x) = E_P[e^{r(X_K)/beta} | X_k = x],

is a Gaussian integral (:func:`tilt_gaussian`). The K-step fixed-initial optimum over *all* transition kernels is
the h-transform dP*_K/dP = e^{r(X_K)/beta} / h_K(0, X_0); for a linear reward it equals the K-step optimum over
mean-shifted Gaussian steps (:func:`sacode.theory.discrete_optimum.discrete_optimum`).

Monte-Carlo constants (:func:`importance_sampling_theory`, :func:`smc_theory`): the self-normalised importance
estimate of E_Q~ f from N particles has N Var -> E_P[wbar^2 (f - mu)^2] and bias -E_Q~[wbar (f - mu)] / N + o(1/N)
(delta method), ESS/N -> 1/E_P[wbar^2]; SMC with the exact potentials and multinomial resampling at every step has
the asymptotic variance of Del Moral's formula, a sum over steps (chapter 13 derives both).

API (``preset`` a 1-D Gaussian or mixture toy preset; ``grid`` None for continuous time, else a TimeGrid):

=========================================  =================================================================
``tilt_gaussian(mean, var, reward, beta)``  log E e^{r/beta} and the tilted N(mean', var') (1-D, r quadratic)
``pretrained_chain(preset, grid)``          the K-step chain's conditional maps and output law
``DiscreteSoftValue(preset, grid)``         V_K(t_k, x) and its gradient, a value for the SMC samplers
``tilted_law(preset, grid=None)``           the tilted law (TargetLaw: mean, cov, mode weights, value, KL)
``fixed_initial_law(preset, grid=None)``    the fixed-initial optimum (chapter 5; its K-step h-transform)
``best_of_n_law(mean, var, reward, n)``     the law of the best of n draws from N(mean, var) (1-D quadrature)
``importance_sampling_theory(...)``         ESS fraction, bias and variance constants of importance resampling
``smc_theory(preset, grid)``                per-step ESS and asymptotic variance of exact-potential SMC
``sampler_chain_law(preset, grid, score)``  exact law, reward and chain KL of a sampler with an affine score
=========================================  =================================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..dynamics.gaussian_step import affine_coefficients, gaussian_chain, gaussian_step
from ..dynamics.grid import TimeGrid
from ..dynamics.sde import ScoreFn
from ..dynamics.shapes import as_time
from .affine_policy import reward_coefficients
from .discrete_optimum import pretrained_steps
from .optimal import (_law_from_posteriors, conditional_optimal_law, gauss_hermite, log_doob_h, optimal_objective,
                      optimal_terminal_law, pretrained_score, pretrained_terminal_law)
from .presets import ToyPreset
from .rewards import LinearReward

__all__ = ["tilt_gaussian", "PretrainedChain", "pretrained_chain", "DiscreteSoftValue", "TargetLaw", "tilted_law",
           "fixed_initial_law", "BestOfNLaw", "best_of_n_law", "best_of_n_kl", "ImportanceTheory",
           "importance_sampling_theory", "SMCTheory", "smc_theory", "ChainLaw", "sampler_chain_law",
           "expected_reward_gaussian"]


# ------------------------------------------------------------------------------------------------
# the tilt of a 1-D Gaussian by e^{r/beta}, r a quadratic polynomial
# ------------------------------------------------------------------------------------------------
def tilt_gaussian(mean, var, reward, beta: float):
    """log E e^{r(X)/beta} for X ~ N(mean, var) and the tilted law N(mean', var') (1-D; numpy or floats).

    With r(x) = r2 x^2 + r1 x + r0 and q_i = r_i / beta (completing the square):
    1/var' = 1/var - 2 q2,  mean' = var' (mean/var + q1),
    log E = q0 - 1/2 log(var/var') + 1/2 (mean'^2/var' - mean^2/var).  Needs 1 - 2 q2 var > 0.
    """
    r2, r1, r0 = reward_coefficients(reward)
    q2, q1, q0 = r2 / beta, r1 / beta, r0 / beta
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    prec = 1.0 / var - 2.0 * q2
    if np.any(prec <= 0):
        raise ValueError("E e^{r/beta} is infinite: the reward's curvature beats the Gaussian's precision")
    var_t = 1.0 / prec
    mean_t = var_t * (mean / var + q1)
    log_E = q0 - 0.5 * np.log(var / var_t) + 0.5 * (mean_t**2 / var_t - mean**2 / var)
    return log_E, mean_t, var_t


# ------------------------------------------------------------------------------------------------
# the K-step pretrained chain (1-D Gaussian data): X_K | X_k = x ~ N(gain_k x + offset_k, var_k)
# ------------------------------------------------------------------------------------------------
@dataclass
class PretrainedChain:
    """The pretrained sampler on a grid as conditional maps to the end (arrays of length K + 1, index k = step).

    ``steps`` = (A, b, c): x_{k+1} = A_k x_k + b_k + c_k z. Backwards from gain_K = 1, offset_K = var_K = 0:
    gain_k = gain_{k+1} A_k, offset_k = gain_{k+1} b_k + offset_{k+1}, var_k = var_{k+1} + gain_{k+1}^2 c_k^2.
    ``marginal_var[k]`` is Var X_k from X_0 ~ N(0, prior_var) (forwards: A_k^2 V_k + c_k^2).
    """

    grid: TimeGrid
    A: np.ndarray
    b: np.ndarray
    c: np.ndarray
    gain: np.ndarray
    offset: np.ndarray
    var: np.ndarray
    prior_var: float
    marginal_mean: np.ndarray
    marginal_var: np.ndarray

    @property
    def K(self) -> int:
        return self.grid.K

    @property
    def output_mean(self) -> float:
        return float(self.marginal_mean[-1])

    @property
    def output_var(self) -> float:
        return float(self.marginal_var[-1])


def pretrained_chain(preset: ToyPreset, grid: TimeGrid, method: str = "em", eta: float = 1.0) -> PretrainedChain:
    """The exact K-step chain of the pretrained sampler (1-D Gaussian presets), read off its Gaussian steps."""
    A, b, c, _ = pretrained_steps(preset, grid, method, eta)
    K = grid.K
    gain, offset, var = np.ones(K + 1), np.zeros(K + 1), np.zeros(K + 1)
    for k in reversed(range(K)):
        gain[k] = gain[k + 1] * A[k]
        offset[k] = gain[k + 1] * b[k] + offset[k + 1]
        var[k] = var[k + 1] + gain[k + 1] ** 2 * c[k] ** 2
    p2 = preset.sde.prior_std() ** 2
    mm, mv = np.zeros(K + 1), np.zeros(K + 1)
    mv[0] = p2
    for k in range(K):
        mm[k + 1] = A[k] * mm[k] + b[k]
        mv[k + 1] = A[k] ** 2 * mv[k] + c[k] ** 2
    return PretrainedChain(grid, A, b, c, gain, offset, var, p2, mm, mv)


class DiscreteSoftValue:
    """V_K(t_k, x) = beta log E_P[e^{r(X_K)/beta} | X_k = x] on the grid's times (1-D Gaussian presets).

    The exact value of the K-step chain (the discrete Cole-Hopf transform); V_K(t_K, .) = r and V_K -> V* of
    chapter 5 as K grows. Called as ``value(t, x)`` with RL times t on the grid (a scalar or shape (n,)).
    """

    def __init__(self, preset: ToyPreset, grid: TimeGrid, method: str = "em", eta: float = 1.0):
        self.preset, self.grid, self.beta = preset, grid, preset.beta
        self.chain = pretrained_chain(preset, grid, method, eta)

    def _index(self, t: Tensor) -> Tensor:
        tk = self.grid.t.to(t)
        k = torch.argmin((t[:, None] - tk[None, :]).abs(), dim=1)
        if not bool(((t - tk[k]).abs() <= 1e-9 * max(1.0, self.grid.T)).all()):
            raise ValueError("the discrete soft value is defined on its grid's times only")
        return k

    def __call__(self, t, x: Tensor, cond=None) -> Tensor:
        t = as_time(t, x)
        k = self._index(t).cpu().numpy()
        ch = self.chain
        mu = ch.gain[k] * x.detach().cpu().numpy().reshape(-1) + ch.offset[k]
        var = np.maximum(ch.var[k], 1e-300)
        log_E, _, _ = tilt_gaussian(mu, var, self.preset.reward, self.beta)
        at_end = ch.var[k] == 0.0                       # V_K(t_K, x) = r(x)
        v = torch.as_tensor(self.beta * log_E, dtype=x.dtype, device=x.device)
        r = self.preset.reward(x)
        return torch.where(torch.as_tensor(at_end, device=x.device), r, v)


# ------------------------------------------------------------------------------------------------
# the target laws
# ------------------------------------------------------------------------------------------------
@dataclass
class TargetLaw:
    """A law that a steering method converges to.

    ``kind`` is "tilted" or "fixed-initial"; ``mean`` (d,), ``cov`` (d, d), ``weights`` the mixture-mode weights
    ((1,) for Gaussian data); ``value`` its objective E r - beta KL (beta log Z for the tilted law, J* for the
    fixed-initial one); ``kl`` its path KL to the pretrained sampler; ``log_Z`` = log E_P e^{r/beta} (tilted) or 0
    (fixed-initial: E_P[e^{r/beta}/h(0, X_0)] = 1); ``method``: "closed-form", "chain K=..", "quadrature".
    """

    kind: str
    mean: Tensor
    cov: Tensor
    weights: Tensor
    value: float
    expected_reward: float
    kl: float
    log_Z: float
    beta: float
    method: str

    @property
    def var(self) -> Tensor:
        return torch.diagonal(self.cov)


def _check_1d_gaussian(preset: ToyPreset) -> None:
    if preset.data.K != 1 or preset.data.d != 1:
        raise ValueError(f"{preset.name}: this closed form needs 1-D Gaussian data")


def _t(v) -> Tensor:
    return torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1))


def expected_reward_gaussian(reward, mean: Tensor, cov: Tensor) -> float:
    """E r(X) for X with mean (d,) and covariance (d, d) (exact for the linear and quadratic rewards)."""
    if isinstance(reward, LinearReward):
        return float(reward.w @ mean)
    return float(-0.5 * reward.lam * (torch.trace(cov) + ((mean - reward.center) ** 2).sum()))


def tilted_law(preset: ToyPreset, grid: TimeGrid | None = None, method: str = "em", eta: float = 1.0,
               n_nodes: int = 40, route: str = "auto") -> TargetLaw:
    """The tilt p_out e^{r/beta} / Z of the sampler's output law, with value beta log Z and KL E r/beta - log Z.

    Continuous time (``grid`` None), two routes: ``"closed-form"`` (1-D Gaussian data) tilts the exact output law
    (``pretrained_terminal_law``); ``"quadrature"`` (any preset; the default for mixtures) averages the conditional
    optimal laws over y with weights N(y; 0, p^2) h(0, y) / Z (Gauss-Hermite): the optimum started from the tilted
    noise. On a grid (1-D Gaussian data): the tilt of the K-step chain's output law N(offset_0, gain_0^2 p^2 + var_0).
    """
    beta, reward = preset.beta, preset.reward
    if route not in ("auto", "closed-form", "quadrature"):
        raise ValueError(f"route must be auto, closed-form or quadrature; got {route!r}")
    gaussian_1d = preset.data.K == 1 and preset.data.d == 1
    if route == "auto":
        route = "closed-form" if gaussian_1d else "quadrature"
    if grid is not None:
        _check_1d_gaussian(preset)
        ch = pretrained_chain(preset, grid, method, eta)
        log_Z, m, v = tilt_gaussian(ch.output_mean, ch.output_var, reward, beta)
        mean, cov, w, how = _t(m), _t(v).reshape(1, 1), torch.ones(1, dtype=torch.float64), f"chain K={grid.K}"
    elif route == "closed-form":
        _check_1d_gaussian(preset)
        pre = pretrained_terminal_law(preset)
        log_Z, m, v = tilt_gaussian(float(pre.mean[0]), float(pre.cov[0, 0]), reward, beta)
        mean, cov, w, how = _t(m), _t(v).reshape(1, 1), torch.ones(1, dtype=torch.float64), "closed-form"
    else:
        y, qw = gauss_hermite(preset.data.d, n_nodes, preset.sde.prior_std())
        y = y.reshape(-1, *preset.data.event_shape)
        log_h = log_doob_h(preset, 0.0, y)
        log_Z = float(torch.logsumexp(torch.log(qw) + log_h, 0))
        mean, cov, w = _law_from_posteriors(conditional_optimal_law(preset, y), torch.exp(torch.log(qw) + log_h
                                                                                            - log_Z))
        how = f"gauss-hermite {n_nodes}^{preset.data.d}"
    log_Z = float(log_Z)
    Er = expected_reward_gaussian(reward, mean, cov)
    kl = Er / beta - log_Z
    return TargetLaw("tilted", mean, cov, w, beta * log_Z, Er, kl, log_Z, beta, how)


def fixed_initial_law(preset: ToyPreset, grid: TimeGrid | None = None, method: str = "em", eta: float = 1.0
                      ) -> TargetLaw:
    """The fixed-initial optimum: chapter 5's law and J* (``grid`` None), or the K-step h-transform on a grid.

    On a grid (1-D Gaussian data), given X_0 = y the output N(gain_0 y + offset_0, var_0) is tilted to
    N(mean'(y), var'), mean'(y) = var' ((gain_0 y + offset_0)/var_0 + q1), and averaged over y ~ N(0, p^2):
    mean = mean'(0), var = var' + (var' gain_0 / var_0)^2 p^2; J_K = beta E_y log h_K(0, y) (Gaussian moments).
    """
    beta, reward = preset.beta, preset.reward
    if grid is None:
        law, obj = optimal_terminal_law(preset), optimal_objective(preset)
        return TargetLaw("fixed-initial", law.mean, law.cov, law.weights, obj.J, obj.expected_reward, obj.kl, 0.0,
                         beta, law.method)
    _check_1d_gaussian(preset)
    ch = pretrained_chain(preset, grid, method, eta)
    G, o, P, p2 = ch.gain[0], ch.offset[0], ch.var[0], ch.prior_var
    _, m0, Pt = tilt_gaussian(o, P, reward, beta)               # the tilted conditional law at y = 0
    slope = Pt * G / P
    mean, var = float(m0), float(Pt + slope**2 * p2)
    r2, r1, r0 = reward_coefficients(reward)
    # E_y log h_K(0, y) with log h = q0 - 1/2 log(P/P') + 1/2 (mean'(y)^2/P' - mu(y)^2/P), mu(y) = G y + o
    E_log_h = (r0 / beta - 0.5 * math.log(P / Pt) + 0.5 * ((m0**2 + slope**2 * p2) / Pt - (o**2 + G**2 * p2) / P))
    J = beta * float(E_log_h)
    cov = _t(var).reshape(1, 1)
    Er = expected_reward_gaussian(reward, _t(mean), cov)
    return TargetLaw("fixed-initial", _t(mean), cov, torch.ones(1, dtype=torch.float64), J, Er, (Er - J) / beta, 0.0,
                     beta, f"chain K={grid.K}")


# ------------------------------------------------------------------------------------------------
# best of n
# ------------------------------------------------------------------------------------------------
@dataclass
class BestOfNLaw:
    """Mean, variance and expected reward of the best of n draws, and its exact KL log n - (n - 1)/n."""

    n: int
    mean: float
    var: float
    expected_reward: float
    kl: float


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || p) = log n - (n - 1)/n when r(X) has a continuous law (density n F(r)^{n-1} p)."""
    return math.log(n) - (n - 1) / n


def best_of_n_law(mean: float, var: float, reward, n: int, n_grid: int = 40001) -> BestOfNLaw:
    """The law of the draw with the largest reward among n draws from N(mean, var) (1-D), by quadrature.

    Its density is n F(r(x))^{n-1} p(x) with F the law of r(X) (ties have probability zero); F(r(x)) is computed on
    a fine grid by sorting the rewards, so any 1-D reward works.
    """
    sd = math.sqrt(var)
    x = np.linspace(mean - 12 * sd, mean + 12 * sd, n_grid)
    p = np.exp(-0.5 * ((x - mean) / sd) ** 2)
    p /= p.sum()
    r = reward(torch.as_tensor(x)).numpy()
    order = np.argsort(r, kind="stable")
    F = np.empty_like(p)
    F[order] = np.cumsum(p[order]) - 0.5 * p[order]           # midpoint rule for P(r(X) <= r(x))
    q = n * F ** (n - 1) * p
    q /= q.sum()
    m = float((q * x).sum())
    return BestOfNLaw(n, m, float((q * (x - m) ** 2).sum()), float((q * r).sum()), best_of_n_kl(n))


# ------------------------------------------------------------------------------------------------
# Monte-Carlo constants
# ------------------------------------------------------------------------------------------------
@dataclass
class ImportanceTheory:
    """Large-N constants of self-normalised importance resampling of N(mean, var) with weights e^{r/beta}.

    For the estimate mu_N of the target mean from one population of N: N Var mu_N -> ``variance``,
    N (E mu_N - mu) -> ``bias`` (so one resampled output has mean mu + bias/N + o(1/N)), ESS/N -> ``ess_fraction``
    = 1 / E_p[wbar^2] = 1 / (1 + chi^2(q || p)).
    """

    target_mean: float
    ess_fraction: float
    bias: float
    variance: float


def importance_sampling_theory(mean: float, var: float, reward, beta: float, n_nodes: int = 200) -> ImportanceTheory:
    """The constants of :class:`ImportanceTheory` for p = N(mean, var) (1-D), by Gauss-Hermite quadrature.

    Delta method for mu_N = sum w_i x_i / sum w_i with wbar = w / E_p w:
    N Var -> E_p[wbar^2 (x - mu)^2],  N (E mu_N - mu) -> -E_p[wbar^2 (x - mu)],  ESS/N -> 1/E_p[wbar^2].
    """
    z, qw = np.polynomial.hermite_e.hermegauss(n_nodes)
    qw = qw / math.sqrt(2 * math.pi)
    x = mean + math.sqrt(var) * z
    logw = reward(torch.as_tensor(x)).numpy() / beta
    logw -= logw.max()
    w = np.exp(logw)
    wbar = w / (qw @ w)
    mu = float(qw @ (wbar * x))
    return ImportanceTheory(mu, float(1.0 / (qw @ wbar**2)), float(-(qw @ (wbar**2 * (x - mu)))),
                            float(qw @ (wbar**2 * (x - mu) ** 2)))


@dataclass
class SMCTheory:
    """Exact-potential SMC on a 1-D Gaussian chain with a linear reward (multinomial resampling at every step).

    ``sigma`` (K,): the log-weight of step k is sigma_k z_k - sigma_k^2/2 (z_k the step's noise), independent of the
    state; ``sigma_init`` the same for the initial potential (0 without it). ``ess_fraction`` (K,): 1/E[G^2] =
    e^{-sigma_k^2} per step; ``variance``: N Var of the particle estimate of the target mean (Del Moral's formula);
    ``variance_terms`` (K + 1,) its terms, one per resampling.
    """

    target_mean: float
    sigma: np.ndarray
    sigma_init: float
    ess_fraction: np.ndarray
    variance: float
    variance_terms: np.ndarray


def smc_theory(preset: ToyPreset, grid: TimeGrid, initial_potential: bool = True, method: str = "em",
               eta: float = 1.0) -> SMCTheory:
    """The constants of :class:`SMCTheory` (chapter 13 derives them).

    Potentials of the exact K-step value: G_{k+1} = h_K(k+1, x_{k+1}) / h_K(k, x_k), times h_K(0, x_0) at the start
    when ``initial_potential`` (the tilted target) and not otherwise (the fixed-initial target). For r = w x,
    a = w/beta, log h_K(k, x) = a (gain_k x + offset_k) + a^2 var_k/2, so log G_{k+1} = sigma_k z_k - sigma_k^2/2 with
    sigma_k = a gain_{k+1} c_k. With m_k(x) = E_target[X_K | X_k = x] = gain_k x + offset_k + a var_k, Del Moral's
    formula sum_p E_{eta_p}[G_p^2 (m_p - mu)^2] gives the terms
      p = 0:  e^{s^2} gain_0^2 p^2 (1 + s^2), s = sigma_init (just gain_0^2 p^2 without the initial potential);
      p >= 1: e^{sigma_{p-1}^2} gain_p^2 (V_p + c_{p-1}^2 sigma_{p-1}^2),  V_p = Var X_p (the pretrained marginal).
    """
    _check_1d_gaussian(preset)
    if not isinstance(preset.reward, LinearReward):
        raise ValueError("the closed-form SMC constants need a linear reward (state-independent log-weights)")
    a = float(preset.reward.w[0]) / preset.beta
    ch = pretrained_chain(preset, grid, method, eta)
    sigma = a * ch.gain[1:] * ch.c
    s0 = a * ch.gain[0] * math.sqrt(ch.prior_var) if initial_potential else 0.0
    terms = np.empty(ch.K + 1)
    terms[0] = math.exp(s0**2) * ch.gain[0] ** 2 * ch.prior_var * (1 + s0**2)
    terms[1:] = np.exp(sigma**2) * ch.gain[1:] ** 2 * (ch.marginal_var[1:] + ch.c**2 * sigma**2)
    target = tilted_law(preset, grid, method, eta) if initial_potential else fixed_initial_law(preset, grid, method,
                                                                                                eta)
    return SMCTheory(float(target.mean[0]), sigma, s0, np.exp(-sigma**2), float(terms.sum()), terms)


# ------------------------------------------------------------------------------------------------
# the exact law of a guided sampler (affine score, Gaussian data)
# ------------------------------------------------------------------------------------------------
@dataclass
class ChainLaw:
    """Exact terminal law of a sampler on a grid, E r, and the KL between its chain and the pretrained chain (the sum
    of the per-step KLs that ``rollout`` records), with ``objective`` = E r - beta KL."""

    mean: Tensor
    cov: Tensor
    expected_reward: float
    kl: float
    objective: float


def sampler_chain_law(preset: ToyPreset, grid: TimeGrid, score_fn: ScoreFn, method: str = "em",
                      eta: float = 1.0) -> ChainLaw:
    """Propagate N(0, p^2 I) exactly through the sampler with an *affine* score (Gaussian data; guidance by grad V*
    or by the Tweedie reward of a linear or quadratic reward is affine there).

    Step k: x' = (A + B S_k) x + B c_k + std z with score = S_k x + c_k read off the function
    (:func:`~sacode.dynamics.gaussian_step.affine_coefficients`); per-step KL
    B^2 ||score - s_pre||^2 / (2 std^2), exactly what a rollout records.
    """
    if preset.data.K != 1:
        raise ValueError(f"{preset.name}: the exact chain law needs Gaussian data (affine scores)")
    sde, d, ev = preset.sde, preset.data.d, preset.event_shape
    s = grid.s[:-1]
    zeros = torch.zeros(grid.K, d, dtype=torch.float64)
    S_a, c_a = affine_coefficients(score_fn, s, zeros, ev)
    S_p, c_p = affine_coefficients(pretrained_score(preset), s, zeros, ev)
    st = gaussian_step(sde, s, grid.s[1:], method, eta)
    A, B, sd = st.A.numpy(), st.B.numpy(), st.std.numpy()
    law = gaussian_chain(A[:, None, None] * np.eye(d) + B[:, None, None] * S_a, B[:, None] * c_a, sd, np.zeros(d),
                         sde.prior_std() ** 2 * np.eye(d), S_a - S_p, c_a - c_p, B**2 / sd**2)
    m, C = torch.from_numpy(law.mean.copy()), torch.from_numpy(law.cov.copy())
    Er = expected_reward_gaussian(preset.reward, m, C)
    return ChainLaw(m, C, Er, law.kl, Er - preset.beta * law.kl)
