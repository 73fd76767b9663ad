"""Steering a frozen sampler at inference time (chapter 13): best-of-N, importance resampling, sequential Monte
Carlo with intermediate potentials, and guidance by the gradient of a value, with the cost of each.

Everything samples the *frozen* pretrained model with the one rollout loop (:func:`sacode.theory.control.rollout`)
on the engine's grids and transitions; SMC calls it one step at a time and resamples in between. A **value**
V(t, x, cond) (RL time t, shape (n,)) is what guidance differentiates and what SMC turns into potentials:

* :class:`ClosedFormValue` wraps a closed form, e.g. V* of chapter 5 (``sacode.theory.optimal.optimal_value``) or
  the exact K-step value (``sacode.theory.steering_targets.DiscreteSoftValue``);
* :class:`TweedieRewardValue` is r(x0_hat(t, x)), the reward of the pretrained model's Tweedie estimate (the plug-in
  of DPS-style guidance, Chung et al. 2023, and of Feynman-Kac steering, Singhal et al. 2025);
* :class:`LearnedValue` wraps a value network of :mod:`sacode.engine.value` (e.g. fitted by
  :class:`sacode.engine.soft_value.SoftValueLearner`).

Samplers call a value as ``value(t, x, cond, s=s)``, passing the diffusion time s of the step as well: a value that
evaluates the score network does so at exactly the sampler's times (T - (T - s) is not always s in floating point),
so a memoised score network (the digits environment's) computes each score once.

Samplers (each returns :class:`SteeredSamples`, one output per population, with its cost per output):

=================================================  ==========================================================
``best_of_n(pool, n)``                             the highest-reward draw of each block of n pretrained samples
``importance_resampling(pool, n, beta, gen)``      one draw per block with probability prop. to e^{r/beta}
                                                   (times e^{-V(0, x_0)/beta} with ``initial_value``: the fixed
                                                   initial law's optimum instead of the tilted law)
``smc(problem, grid, transition, value, ...)``     particles with potentials G_k = e^{(V(t_{k+1}) - V(t_k))/beta},
                                                   resampled when the ESS drops below a fraction of N
``guide(problem, grid, transition, value, ...)``   the sampler with score s_pre + grad V / beta (a control)
=================================================  ==========================================================

**Cost** (:class:`Cost`, per output sample): forward and backward passes of the score network, reward and reward
gradient evaluations, value-network passes. One *score unit* is one forward pass of the score network on one sample;
a backward pass through it counts as 2 units (its FLOP count; :meth:`Cost.score_units`). Closed-form values cost
nothing. SMC reuses the pretrained score of a state for its step and its Tweedie potential, so the potential adds
reward evaluations only. The counts are what the method needs (``tests/test_steering.py`` checks them against a
memoising counter); the rollout loop also evaluates the pretrained step at each state to *measure* the path KL, and
that measurement is not part of a method's cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
from torch import Tensor, nn

from ..dynamics.grid import TimeGrid
from ..dynamics.parameterisation import tweedie
from ..dynamics.shapes import as_time
from ..dynamics.time import diffusion_time
from ..dynamics.transition import Transition
from ..theory.conditions import Conditions
from ..theory.control import Rollout, ScoreControlProblem, rollout
from .policy import FixedScorePolicy, ScorePolicy
from .value import StructuredValue

__all__ = ["Cost", "ClosedFormValue", "TweedieRewardValue", "LearnedValue", "ValueGuidedPolicy", "SteeredSamples",
           "effective_sample_size", "resample_indices", "TerminalPool", "sample_pretrained", "best_of_n",
           "importance_resampling", "smc", "guide"]


# ------------------------------------------------------------------------------------------------
# cost accounting
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """Network evaluations per output sample (floats: a cost spread over a population is a fraction)."""

    score_fwd: float = 0.0
    score_bwd: float = 0.0
    reward: float = 0.0
    reward_grad: float = 0.0
    value_fwd: float = 0.0
    value_bwd: float = 0.0

    BACKWARD_UNITS = 2.0
    """A backward pass through the score network counts as this many forward passes (its FLOP count)."""

    def score_units(self, backward: float | None = None) -> float:
        """Score-network forward passes plus ``backward`` (default 2) times the backward passes."""
        return self.score_fwd + (self.BACKWARD_UNITS if backward is None else backward) * self.score_bwd

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __mul__(self, k: float) -> "Cost":
        return Cost(**{f.name: getattr(self, f.name) * k for f in fields(self)})

    __rmul__ = __mul__

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"score_units": self.score_units()}


# ------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------
class ClosedFormValue:
    """A value given in closed form, ``fn(t, x) -> (n,)`` (RL time); it costs no network evaluation.

    Every value carries ``call_cost`` (one evaluation) and ``grad_cost`` (value and gradient, beyond the score
    forward pass the sampler makes at the same state anyway).
    """

    call_cost = Cost()
    grad_cost = Cost()

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], name: str = "closed form"):
        self.fn, self.name = fn, name

    def __call__(self, t, x: Tensor, cond: Conditions | None = None, s: Tensor | None = None) -> Tensor:
        return self.fn(t, x)


class TweedieRewardValue:
    """V(t, x) = r(x0_hat(t, x)) with x0_hat = (x + sigma^2 s_pre)/alpha, the pretrained model's Tweedie estimate.

    By Jensen it differs from V* = beta log E[e^{r/beta} | X_t = x] by a gap; for a linear reward on Gaussian data the
    gap does not depend on x, so its gradient is exact (chapter 13). The score it needs at (s, x) is the one the
    sampler evaluates there anyway, so a call costs one reward, and value and gradient one backward pass through
    the score and one reward evaluation with its gradient.
    """

    call_cost = Cost(reward=1.0)
    grad_cost = Cost(score_bwd=1.0, reward_grad=1.0)

    def __init__(self, problem: ScoreControlProblem):
        self.problem = problem

    def value_and_score(self, t, x: Tensor, cond: Conditions | None = None, s: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
        """(V(t, x), s_pre(s, x)) from one pass of the score network (s: the step's diffusion time, T - t)."""
        p = self.problem
        s = diffusion_time(as_time(t, x), p.T) if s is None else as_time(s, x)
        score = p.pretrained_score(s, x, cond)
        return p.reward(tweedie(p.sde, s, x, score), cond), score

    def __call__(self, t, x: Tensor, cond: Conditions | None = None, s: Tensor | None = None) -> Tensor:
        return self.value_and_score(t, x, cond, s)[0]


class LearnedValue:
    """A value network V_phi(t, x, cond) of :mod:`sacode.engine.value` as a value (frozen, no parameter gradients).

    A structured value c_skip r(x0_hat) + c_out V_phi also evaluates the reward of the Tweedie estimate, and its
    gradient flows back through the score network.
    """

    def __init__(self, net: nn.Module):
        self.net = net
        for p in net.parameters():
            p.requires_grad_(False)
        self.structured = isinstance(net, StructuredValue)
        self.call_cost = Cost(value_fwd=1.0, reward=1.0 if self.structured else 0.0)
        self.grad_cost = Cost(value_fwd=1.0, value_bwd=1.0, score_bwd=1.0 if self.structured else 0.0,
                              reward_grad=1.0 if self.structured else 0.0)

    def __call__(self, t, x: Tensor, cond: Conditions | None = None, s: Tensor | None = None) -> Tensor:
        return self.value_and_score(t, x, cond, s)[0]

    def value_and_score(self, t, x: Tensor, cond: Conditions | None = None, s: Tensor | None = None
                        ) -> tuple[Tensor, Tensor | None]:
        """(V(t, x), s_pre(s, x)): a structured value shares the score pass of its Tweedie branch; None otherwise."""
        t = as_time(t, x)
        if not self.structured:
            return self.net(t, x, cond), None
        env = self.net.env
        s = diffusion_time(t, env.T) if s is None else as_time(s, x)
        score = env.pretrained_score(s, x, cond)
        skip = env.reward(tweedie(env.sde, s, x, score), cond)
        return self.net(t, x, cond, skip=skip), score


class ValueGuidedPolicy(ScorePolicy):
    """The guided score s_pre(s, x) + scale grad_x V(T - s, x) / beta (a control of chapter 3; no parameters).

    With V = V* this *is* the optimal score of chapter 5, a* = s_pre + grad V*/beta. ``scale`` multiplies the
    guidance (DPS's step size; 1 is the control-theoretic value).
    """

    def __init__(self, problem: ScoreControlProblem, value, beta: float | None = None, scale: float = 1.0):
        super().__init__()
        self.problem, self.value, self.scale = problem, value, float(scale)
        self.beta = float(problem.beta if beta is None else beta)
        if not self.beta > 0:
            raise ValueError(f"guidance divides by beta; got beta = {self.beta}")

    def guidance(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> tuple[Tensor, Tensor]:
        """(grad_x V(T - s, x), s_pre(s, x)), the score from the same pass when the value provides it."""
        s = as_time(s, x)
        t = self.problem.T - s
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            if hasattr(self.value, "value_and_score"):
                v, score = self.value.value_and_score(t, xg, cond, s)
                score = None if score is None else score.detach()
            else:
                v, score = self.value(t, xg, cond, s=s), None
            (g,) = torch.autograd.grad(v.sum(), xg)
        if score is None:
            score = self.problem.pretrained_score(s, x, cond)
        return g.detach(), score

    def forward(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        g, score = self.guidance(s, x, cond)
        return score + (self.scale / self.beta) * g


# ------------------------------------------------------------------------------------------------
# results and resampling
# ------------------------------------------------------------------------------------------------
@dataclass
class SteeredSamples:
    """M outputs of a steering method, one per population of ``n_particles`` (1 for guidance).

    ``x`` (M, *event), ``reward`` (M,); ``kl`` (M,): a path-KL estimate per output (guidance: the exact KL between the
    guided and the pretrained chains along the sampled path, Girsanov; best-of-N: the exact log N - (N-1)/N;
    resampling and SMC: sum_i W_i log G_i - log Z_N, whose mean bounds the KL of the output law from above and
    converges to the KL of the law they target, :meth:`kl_estimate`);
    ``log_Z`` (M,): log of each population's normalising-constant estimate; ``ess`` (n_checks, M): ESS/N where the
    weights were checked (SMC: row 0 the initial weights, row k + 1 the weights after step k, before any
    resampling); ``particles`` (M, N, *event) and ``weights``
    (M, N) the final weighted population; ``cost`` per output; ``resamplings`` (M,) how often each population
    resampled.
    """

    method: str
    x: Tensor
    reward: Tensor
    kl: Tensor | None
    n_particles: int
    cost: Cost
    log_Z: Tensor | None = None
    ess: Tensor | None = None
    particles: Tensor | None = None
    weights: Tensor | None = None
    resamplings: Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def M(self) -> int:
        return self.x.shape[0]

    def kl_estimate(self) -> float:
        """The mean of ``kl`` over the outputs. For resampling and SMC it estimates an *upper bound* on the path KL of
        the output law: with Q_N the law of the particle system and the pick, and the extended target
        Q_N Z_N / Z (whose picked path has the target law, Andrieu et al. 2010), data processing gives
        KL(q_N || P) <= E[sum_i W_i log G_i] - E log Z_N. It converges to the KL of the target law as N grows; a
        J built from it is a lower bound."""
        return float(self.kl.double().mean())

    def estimate(self, f: Callable[[Tensor], Tensor]) -> Tensor:
        """Per population, the weighted particle estimate sum_i W_i f(x_i) of E_target f, shape (M,)."""
        if self.particles is None:
            raise ValueError(f"{self.method} keeps no weighted population")
        M, N = self.weights.shape
        vals = f(self.particles.reshape(M * N, *self.particles.shape[2:])).reshape(M, N)
        return (self.weights * vals).sum(1)


def effective_sample_size(log_w: Tensor) -> Tensor:
    """(sum w)^2 / sum w^2 per row of log-weights (M, N), shape (M,)."""
    W = torch.softmax(log_w, dim=1)
    return 1.0 / (W**2).sum(1)


def resample_indices(log_w: Tensor, n_out: int, generator: torch.Generator, scheme: str = "multinomial") -> Tensor:
    """Indices (M, n_out) drawn within each row with probabilities softmax(log_w) (multinomial or systematic)."""
    W = torch.softmax(log_w.double(), dim=1)
    if scheme == "multinomial":
        return torch.multinomial(W, n_out, replacement=True, generator=generator)
    if scheme == "systematic":
        M = W.shape[0]
        u = (torch.rand(M, 1, generator=generator, dtype=W.dtype) + torch.arange(n_out, dtype=W.dtype)) / n_out
        cw = torch.cumsum(W, dim=1)
        cw[:, -1] = 1.0
        return torch.searchsorted(cw, u).clamp(max=W.shape[1] - 1)
    raise ValueError(f"unknown resampling scheme {scheme!r}; use multinomial or systematic")


def _blocks(v: Tensor, n: int) -> Tensor:
    if v.shape[0] % n:
        raise ValueError(f"a pool of {v.shape[0]} samples does not split into populations of {n}")
    return v.reshape(v.shape[0] // n, n, *v.shape[1:])


# ------------------------------------------------------------------------------------------------
# methods on a pool of pretrained samples
# ------------------------------------------------------------------------------------------------
@dataclass
class TerminalPool:
    """Samples of the frozen sampler as best-of-N and importance resampling see them: terminal states x (n, *event),
    rewards (n,), initial states x0 (n, *event) (needed only for the fixed-initial weights), the conditions and the
    number of steps K that made each sample (its cost)."""

    x: Tensor
    rewards: Tensor
    K: int
    x0: Tensor | None = None
    cond: Conditions | None = None

    @classmethod
    def of(cls, pool: "Rollout | TerminalPool") -> "TerminalPool":
        if isinstance(pool, TerminalPool):
            return pool
        return cls(pool.x, pool.rewards, pool.K, pool.xs[0], pool.cond)


def sample_pretrained(problem: ScoreControlProblem, grid: TimeGrid, transition: Transition, n: int,
                      generator: torch.Generator) -> TerminalPool:
    """n trajectories of the frozen pretrained sampler (K score evaluations each): the pool of best-of-N and
    importance resampling."""
    return TerminalPool.of(rollout(problem, FixedScorePolicy.pretrained(problem), grid, transition, n, generator))


def best_of_n(pool: TerminalPool | Rollout, n: int) -> SteeredSamples:
    """Split the pool into blocks of n and keep the highest-reward sample of each (ties: the first).

    Selection depends on X_T only, so the selected path has density n F(r(X_T))^{n-1} against the pretrained path
    law and KL log n - (n - 1)/n when r(X_T) has a continuous law.
    """
    pool = TerminalPool.of(pool)
    R = _blocks(pool.rewards, n)
    idx = R.argmax(1)
    rows = torch.arange(R.shape[0])
    x = _blocks(pool.x, n)[rows, idx]
    kl = torch.full((R.shape[0],), math.log(n) - (n - 1) / n, dtype=torch.float64)
    return SteeredSamples("best-of-n", x, R[rows, idx], kl, n, Cost(score_fwd=n * pool.K, reward=n))


def importance_resampling(pool: TerminalPool | Rollout, n: int, beta: float, generator: torch.Generator,
                          initial_value=None) -> SteeredSamples:
    """One draw per block of n pretrained samples with probability proportional to w = e^{r(X_T)/beta}.

    As n grows the output law tends to the tilted law p_out e^{r/beta}/Z. With ``initial_value`` (a value V(0, .))
    the weights are e^{(r(X_T) - V(0, X_0))/beta}, the density dP*/dP of chapter 5, and the output law tends to the
    fixed-initial optimum instead (exactly so when V(0, .) is the exact value of the sampler's chain).
    """
    pool = TerminalPool.of(pool)
    logw = pool.rewards.double() / beta
    cost = Cost(score_fwd=n * pool.K, reward=n)
    if initial_value is not None:
        if pool.x0 is None:
            raise ValueError("the fixed-initial weights need the initial states of the pool (x0)")
        logw = logw - initial_value(0.0, pool.x0, pool.cond, s=None).double() / beta
        cost = cost + n * initial_value.call_cost
    LW = _blocks(logw, n)
    idx = resample_indices(LW, 1, generator)[:, 0]
    rows = torch.arange(LW.shape[0])
    W = torch.softmax(LW, dim=1)
    log_Z = torch.logsumexp(LW, 1) - math.log(n)
    kl = (W * LW).sum(1) - log_Z
    xs = _blocks(pool.x, n)
    return SteeredSamples("importance", xs[rows, idx], _blocks(pool.rewards, n)[rows, idx], kl, n, cost, log_Z,
                          (effective_sample_size(LW) / n)[None], xs, W)


# ------------------------------------------------------------------------------------------------
# sequential Monte Carlo
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def smc(problem: ScoreControlProblem, grid: TimeGrid, transition: Transition, value, n_populations: int,
        n_particles: int, generator: torch.Generator, beta: float | None = None, proposal: ScorePolicy | None = None,
        initial_potential: bool = True, ess_threshold: float | None = 0.5, scheme: str = "multinomial"
        ) -> SteeredSamples:
    """Sequential Monte Carlo (Feynman-Kac steering) on the frozen sampler: M populations of N particles.

    Potentials telescope: G_0 = e^{V(t_0, x_0)/beta} (only with ``initial_potential``), and
    G_{k+1} = e^{(V(t_{k+1}, x_{k+1}) - V(t_k, x_k))/beta} with V(t_K, .) = r, so a whole path is weighted by
    e^{r(x_K)/beta} (the tilted law) or by e^{(r(x_K) - V(t_0, x_0))/beta} (without the initial potential: the
    fixed-initial optimum when V(t_0, .) is exact). The value only decides how much of the weight is paid early, and
    so the variance. A population is resampled when its ESS falls below ``ess_threshold`` N (None: at every step).
    ``proposal`` (default: the pretrained sampler) moves the particles; a guided proposal q adds log(p_pre/q) of each
    realised step to the weights (twisted SMC).
    """
    beta = float(problem.beta if beta is None else beta)
    M, N, K = n_populations, n_particles, grid.K
    n = M * N
    prop = proposal if proposal is not None else FixedScorePolicy.pretrained(problem)
    cond = problem.sample_conditions(n, generator)
    x = problem.sample_init(n, generator)
    ev = x.shape[1:]
    t = grid.t.to(x)
    v_prev = value(t[0], x, cond, s=grid.s[0]).double()
    logw = (v_prev / beta if initial_potential else torch.zeros_like(v_prev)).reshape(M, N)
    lpath = logw.clone()
    log_Z = torch.zeros(M, dtype=torch.float64)
    ess_log, n_res = [], torch.zeros(M, dtype=torch.long)
    rows = torch.arange(M)[:, None]
    for k in range(K):
        ess = effective_sample_size(logw) / N
        need = torch.ones(M, dtype=torch.bool) if ess_threshold is None else ess < ess_threshold
        ess_log.append(ess)
        if bool(need.any()):
            idx = torch.where(need[:, None], resample_indices(logw, N, generator, scheme),
                              torch.arange(N).expand(M, N))
            log_Z = log_Z + torch.where(need, torch.logsumexp(logw, 1) - math.log(N), torch.zeros_like(log_Z))
            x = x.reshape(M, N, *ev)[rows, idx].reshape(n, *ev)
            v_prev = v_prev.reshape(M, N)[rows, idx].reshape(n)
            lpath = lpath[rows, idx]
            cond = cond.index((rows * N + idx).reshape(-1))
            logw = torch.where(need[:, None], torch.zeros_like(logw), logw)
            n_res += need.long()
        step = TimeGrid(grid.s[k:k + 2], grid.T)
        b = rollout(problem, prop, step, transition, n, generator, cond=cond, x_init=x, with_reward=False)
        x = b.x
        v_new = (problem.reward(x, cond) if k == K - 1 else value(t[k + 1], x, cond, s=grid.s[k + 1])).double()
        r_last = v_new
        inc = ((v_new - v_prev) / beta).reshape(M, N)
        logw = logw + inc - b.log_ratio_steps[0].double().reshape(M, N)
        lpath = lpath + inc
        v_prev = v_new
    ess_log.append(effective_sample_size(logw) / N)
    log_Z = log_Z + torch.logsumexp(logw, 1) - math.log(N)
    W = torch.softmax(logw, dim=1)
    pick = resample_indices(logw, 1, generator, scheme)[:, 0]
    parts = x.reshape(M, N, *ev)
    r = r_last.reshape(M, N).to(x.dtype)
    out_rows = torch.arange(M)
    kl = (W * lpath).sum(1) - log_Z
    # per particle: K score passes, K value calls (t_0 .. t_{K-1}; the last potential is the reward itself)
    cost = Cost(score_fwd=N * K, reward=N) + (N * K) * value.call_cost
    if isinstance(proposal, ValueGuidedPolicy):
        cost = cost + (N * K) * proposal.value.grad_cost
    return SteeredSamples("smc", parts[out_rows, pick], r[out_rows, pick], kl, N, cost, log_Z, torch.stack(ess_log),
                          parts, W, n_res)


# ------------------------------------------------------------------------------------------------
# guidance
# ------------------------------------------------------------------------------------------------
def guide(problem: ScoreControlProblem, grid: TimeGrid, transition: Transition, value, n: int,
          generator: torch.Generator, beta: float | None = None, scale: float = 1.0) -> SteeredSamples:
    """n samples of the sampler guided by grad V/beta (:class:`ValueGuidedPolicy`), with the exact KL of each path
    between the guided and the pretrained chains (a control keeps the initial law, so Girsanov applies)."""
    pol = ValueGuidedPolicy(problem, value, beta, scale)
    b = rollout(problem, pol, grid, transition, n, generator)
    cost = Cost(score_fwd=grid.K, reward=1.0) + grid.K * value.grad_cost
    return SteeredSamples("guidance", b.x, b.rewards, b.kl_path, 1, cost, info={"rollout": b})
