"""Fine-tuning algorithms on the one engine: they consume :class:`Rollout` batches.

=================  =========================================================================================
``ctpo``           Continuous-time policy optimisation (the paper's method): per-step advantage rates from a value
                   network, q_k dt ~ V(t_{k+1}, x_{k+1}) - V(t_k, x_k) - beta KL_k (chapter 6), PPO-clipped
                   likelihood-ratio update on the Gaussian score-action policy (chapter 6).
``ctpo-pathwise``  The pathwise form of the same policy gradient: surrogate grad_x V(t_{k+1}, x_{k+1}) . m_theta(x_k)
                   - beta KL_k(theta), whose theta-gradient is g^2 dt (d mu)^T (grad V - beta (mu - s_pre)).
``ddpo``           DDPO (Black et al. 2024): the trajectory return R - beta sum_k log(pi_theta/p_pre)(x_{k+1}|x_k) (the
                   sampled log-ratio: an RLHF-style KL penalty whose likelihood-ratio gradient is that of the KL),
                   normalised per condition, broadcast to every step; PPO clip. With beta = 0 it is the original DDPO.
``dpok``           DPOK (Fan et al. 2023): per-step advantage R - V(t_k, x_k) with a value baseline trained on the
                   reward, plus the differentiable per-step KL penalty beta KL_k(theta); clipped ratio.
``backprop``       Reward backpropagation through the sampler (AlignProp / DRaFT-K): loss -r(x_T) + beta sum KL_k,
                   gradient truncated to the last ``bp_steps`` steps (reparameterised noise).
=================  =========================================================================================

All likelihood ratios use the transition log-density summed over dimensions (chapter 3). The
option ``logprob_mean=True`` divides log-densities by the dimension as in DDPO's code (documented there as the
reason for its tiny clip ranges).

The per-step KL penalty is ``cfg.kl`` (chapter 4): ``chain``, the exact KL ||m_theta - m_pre||^2/(2 c_k^2) between the
fine-tuned and pretrained transitions (default: it is the KL of the sampler that is actually run), or ``girsanov``,
the paper code's 1/2 ((1+eta^2)/(2 eta))^2 (int_step g^2) ||s_theta - s_pre||^2. The second is the first times a
per-step factor that depends on neither the state nor theta (:func:`~sacode.theory.kl.kl_penalty_scale`), so every
algorithm applies it the same way: to the KL term of its loss, to the value targets, and (ddpo) to the sampled
log-ratio.

The official recipe of the paper's code (chapter 8) is a combination of options: ``adv_norm=step`` (advantages
standardised per time step and then clamped to +- ``adv_clip``, for ctpo and dpok as for ddpo),
``logprob_mean=True`` with the clip range divided by the dimension, and AdamW (``weight_decay > 0``). Every
``update`` reports ``grad_clipped_frac``, the fraction of its optimiser steps whose gradient norm exceeded
``max_grad_norm`` (and was clipped to it).
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..dynamics.gaussian_step import gaussian_log_prob, randn_on, transition_kl
from ..dynamics.shapes import expand_time, sum_event
from ..dynamics.transition import Transition
from ..theory.conditions import Conditions
from ..theory.control import Rollout
from ..theory.kl import kl_penalty_scale
from .config import ALGORITHMS
from .divergence import FiniteWatch
from .value import ValueLearner, returns_to_go, skip_on_rollout, value_on_rollout


@dataclass
class Transitions:
    """A rollout flattened into N = K n transitions (x_k -> x_{k+1}); ``i`` indexes the trajectory."""

    x: Tensor
    x_next: Tensor
    s_cur: Tensor
    s_next: Tensor
    logp_old: Tensor
    std: Tensor
    pre_mean: Tensor
    i: Tensor
    k: Tensor

    @classmethod
    def from_rollout(cls, b: Rollout) -> "Transitions":
        K, n = b.K, b.n
        ev = b.xs.shape[2:]
        s = b.grid.s.to(b.xs)
        return cls(b.xs[:-1].reshape(K * n, *ev), b.xs[1:].reshape(K * n, *ev),
                   s[:-1].repeat_interleave(n), s[1:].repeat_interleave(n), b.log_probs.reshape(K * n),
                   b.stds.reshape(K * n), b.pre_means.reshape(K * n, *ev),
                   torch.arange(n).repeat(K), torch.arange(K).repeat_interleave(n))


def ppo_clip_loss(logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip: float) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate -min(rho A, clip(rho, 1 +- eps) A), averaged; with diagnostics."""
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    with torch.no_grad():
        info = {"clip_frac": float(((ratio - 1).abs() > clip).double().mean()),
                "approx_kl": float(0.5 * (log_ratio**2).mean())}
    return loss, info


def normalise(adv: Tensor, mode: str) -> Tensor:
    """How advantages are rescaled before the PPO loss.

    ``none``; ``center`` (subtract, per step, the mean of the *other* trajectories of the batch: a leave-one-out
    baseline, so the expected gradient and its scale are kept); ``global`` (one mean/std for all steps); ``step``
    (per time step, as the paper's SD code). Rescaling changes the balance between the reward term and an explicit
    ``beta KL_k(theta)`` term, so ctpo and dpok default to ``center``. The baseline must leave the trajectory out:
    subtracting the plain batch mean, which contains the trajectory's own advantage, multiplies the expected
    reward gradient by 1 - 1/n while the explicit KL gradient keeps its weight, an effective KL weight
    beta n/(n - 1) (measured in chapter 8: a terminal-mean bias of about 1/n of the fine-tuning shift). Standardised
    advantages (``global``, ``step``) are clamped by :func:`clamp_standardised`.
    """
    if mode == "none":
        return adv
    if mode == "center":
        n = adv.shape[1]
        return (adv - adv.mean(1, keepdim=True)) * (n / (n - 1) if n > 1 else 0.0)
    if mode == "global":
        return (adv - adv.mean()) / (adv.std() + 1e-8)
    if mode == "step":
        return (adv - adv.mean(1, keepdim=True)) / (adv.std(1, keepdim=True) + 1e-8)
    raise ValueError(f"unknown advantage normalisation {mode!r}; use none, global or step")


def clamp_standardised(adv: Tensor, mode: str, bound: float) -> Tensor:
    """Clamp advantages to +- ``bound`` when ``mode`` standardised them (``global``, ``step``), as the official
    code clamps its per-step standardised advantages to +- 5; unscaled advantages (``none``, ``center``) are kept."""
    return adv.clamp(-bound, bound) if mode in ("global", "step") else adv


class PerConditionStats:
    """DDPO's per-prompt reward statistics: normalise by the mean/std of recent rewards of the same condition.

    Unconditional environments use one group (batch statistics). ``buffer`` recent values are kept per group;
    groups with fewer than ``min_count`` values fall back to batch statistics.
    """

    def __init__(self, buffer: int = 32, min_count: int = 16):
        self.buffer, self.min_count = buffer, min_count
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer))

    def __call__(self, values: Tensor, cond: Conditions) -> Tensor:
        keys = cond.keys()
        out = torch.empty_like(values)
        mean_all, std_all = values.mean(), values.std() + 1e-8
        for key in set(keys):
            idx = torch.tensor([j for j, k in enumerate(keys) if k == key])
            self.history[key].extend(values[idx].tolist())
            hist = torch.tensor(list(self.history[key]), dtype=values.dtype)
            if key == "" or len(hist) < self.min_count:
                out[idx] = (values[idx] - mean_all) / std_all
            else:
                out[idx] = (values[idx] - hist.mean()) / (hist.std() + 1e-8)
        return out

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.history.items()}

    def load_state_dict(self, d: dict) -> None:
        self.history.clear()
        for k, v in d.items():
            self.history[k].extend(v)


class Algorithm:
    """Shared machinery: the policy optimiser (through accelerate when attached), PPO epochs over shuffled
    transitions, and a :class:`~sacode.engine.value.ValueLearner` for the algorithms that use a value network."""

    name = "base"
    uses_value = False
    needs_reward_gradient = False
    on_policy_rollouts = True

    def __init__(self, env, policy: nn.Module, cfg, transition: Transition):
        self.env, self.policy, self.cfg, self.transition = env, policy, cfg, transition
        self.beta = cfg.beta
        params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay > 0
                    else torch.optim.Adam(params, lr=cfg.lr))
        self.accelerator = None
        self.policy_train = policy          # what training passes call: the policy, or its DDP wrapper (attach)
        self.value_learner = ValueLearner.from_config(env, cfg) if self.uses_value else None
        self.value = self.value_learner.value if self.uses_value else None
        self.stats = PerConditionStats()
        self.watch = FiniteWatch("policy", "lr")      # every optimiser step is checked for non-finite values
        if self.needs_reward_gradient and not env.reward_differentiable:
            raise ValueError(f"{self.name} needs a differentiable reward; use --algo ctpo or ddpo for this reward")

    def attach(self, accelerator) -> None:
        """Train through Hugging Face accelerate: device placement, mixed precision and the
        DDP all-reduce of gradients. Rollouts keep calling the unwrapped modules (they need no gradients)."""
        self.accelerator = accelerator
        self.policy_train, self.opt = accelerator.prepare(self.policy, self.opt)
        if self.value_learner is not None:
            self.value_learner.attach(accelerator)

    # ----- helpers -----------------------------------------------------------------------------
    def _logp(self, tr: Transitions, idx: Tensor, cond: Conditions) -> tuple[Tensor, Tensor]:
        """Log-density of the stored x_{k+1} under the current policy, and the policy's step mean."""
        c = cond.index(tr.i[idx])
        pol = lambda s, x: self.policy_train(s, x, c)
        mean, std = self.transition.mean_std(pol, tr.x[idx], tr.s_cur[idx], tr.s_next[idx])
        lp = gaussian_log_prob(tr.x_next[idx], mean, std)
        if self.cfg.logprob_mean:
            lp = lp / tr.x[0].numel()
        return lp, mean

    def _minibatches(self, N: int, gen: torch.Generator):
        for _ in range(self.cfg.inner_epochs):
            perm = torch.randperm(N, generator=gen)
            if self.cfg.step_fraction < 1.0:
                perm = perm[: max(1, int(round(self.cfg.step_fraction * N)))]
            for j in range(0, perm.numel(), self.cfg.minibatch):
                yield perm[j: j + self.cfg.minibatch]

    def _backward(self, loss: Tensor, model: nn.Module | None = None, sync: bool = True) -> None:
        """loss.backward(), through accelerate when attached; sync=False skips DDP's all-reduce (the gradient of a
        micro-batch that is accumulated before the optimiser step)."""
        self.watch.loss(loss)
        if self.accelerator is None:
            loss.backward()
        elif sync:
            self.accelerator.backward(loss)
        else:
            with self.accelerator.no_sync(model if model is not None else self.policy_train):
                self.accelerator.backward(loss)

    def _clip_step(self, opt, params: list) -> float:
        clip = nn.utils.clip_grad_norm_ if self.accelerator is None else self.accelerator.clip_grad_norm_
        gn = clip(params, self.cfg.max_grad_norm)
        self.watch.gradients(gn)                      # before the step: a non-finite value never reaches the weights
        opt.step()
        self.watch.parameters(params)
        return float(gn)

    def _clipped_frac(self, norms: list[float]) -> float:
        """Fraction of optimiser steps whose gradient norm (before clipping) exceeded ``max_grad_norm``."""
        return sum(g > self.cfg.max_grad_norm for g in norms) / max(len(norms), 1)

    def _trainable(self) -> list:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def _opt_step(self, loss: Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        self._backward(loss)
        return self._clip_step(self.opt, self._trainable())

    def ppo_update(self, batch: Rollout, adv: Tensor, gen: torch.Generator, extra_kl: bool = False) -> dict:
        """PPO epochs on the transitions with per-step advantages ``adv`` of shape (K, n)."""
        tr = Transitions.from_rollout(batch)
        a = adv.reshape(-1)
        logp_old = tr.logp_old / (tr.x[0].numel() if self.cfg.logprob_mean else 1)
        infos = []
        for idx in self._minibatches(a.numel(), gen):
            # gradient accumulation over micro-batches of cfg.micro_batch transitions, one optimiser step
            parts = idx.split(self.cfg.micro_batch) if self.cfg.micro_batch > 0 else (idx,)
            self.opt.zero_grad(set_to_none=True)
            info: dict = defaultdict(float)
            for j, part in enumerate(parts):
                lp, mean = self._logp(tr, part, batch.cond)
                loss, part_info = ppo_clip_loss(lp, logp_old[part], a[part], self.cfg.clip)
                if extra_kl:
                    loss = loss + self.beta * self.step_penalty(mean, tr.pre_mean[part], tr.std[part],
                                                                tr.s_cur[part], tr.s_next[part]).mean()
                w = part.numel() / idx.numel()
                self._backward(loss * (w * batch.K if self.cfg.sum_steps else w), sync=j == len(parts) - 1)
                for k, v in part_info.items():
                    info[k] += w * v
            info = dict(info)
            info["grad_norm"] = self._clip_step(self.opt, self._trainable())
            info["grad_clipped_frac"] = self._clipped_frac([info["grad_norm"]])
            infos.append(info)
        return {k: sum(i[k] for i in infos) / len(infos) for k in infos[0]} if infos else {}

    def fit_value(self, batch: Rollout, targets: Tensor, gen: torch.Generator, skip: Tensor | None = None) -> float:
        """Fit the value network on ``targets`` (K+1, n) (:meth:`ValueLearner.fit`)."""
        return self.value_learner.fit(batch, targets, gen, skip)

    def returns_to_go(self, batch: Rollout, with_kl: bool = True) -> Tensor:
        """G_k = R - beta sum_{j >= k} KL_j, shape (K+1, n) (G_K = R), with the per-step penalty of cfg.kl."""
        return returns_to_go(batch, self.beta, with_kl, self.penalty_steps(batch))

    # ----- the per-step KL penalty (cfg.kl) --------------------------------------------------------------
    def kl_scale(self, s_cur: Tensor, s_next: Tensor, std: Tensor) -> Tensor:
        """Factor from the chain KL of a step to the penalty of cfg.kl (1 for ``chain``)."""
        t = self.transition
        return kl_penalty_scale(getattr(self.cfg, "kl", "chain"), t.sde, t.method, t.eta, s_cur, s_next, std)

    def step_penalty(self, mean: Tensor, pre_mean: Tensor, std: Tensor, s_cur: Tensor, s_next: Tensor) -> Tensor:
        """The per-step KL penalty of cfg.kl, differentiable in the policy's step mean, shape (n,)."""
        return transition_kl(mean, pre_mean, std) * self.kl_scale(s_cur, s_next, std)

    def penalty_steps(self, batch: Rollout) -> Tensor:
        """The recorded per-step KLs of a rollout as penalties of cfg.kl, shape (K, n)."""
        s = batch.grid.s.to(batch.stds)
        return batch.kl_steps * self.kl_scale(s[:-1, None], s[1:, None], batch.stds)

    def update(self, batch: Rollout, gen: torch.Generator) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict:
        d = {"opt": self.opt.state_dict(), "stats": self.stats.state_dict()}
        if self.value_learner is not None:
            d |= self.value_learner.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        self.opt.load_state_dict(d["opt"])
        self.stats.load_state_dict(d["stats"])
        if self.value_learner is not None:
            self.value_learner.load_state_dict(d)


class CTPO(Algorithm):
    name, uses_value = "ctpo", True

    def advantages(self, batch: Rollout, skip: Tensor | None = None) -> Tensor:
        """V(t_{k+1}, x_{k+1}) - V(t_k, x_k): the action-dependent part of q_k dt (V includes future KL costs).

        The running reward's part of q, -beta/2 g^2 (||a - s_pre||^2 - ||mu - s_pre||^2 - tr Sigma), has expectation
        zero under the policy and its likelihood-ratio gradient equals the gradient of -beta KL_k(theta); we use
        that gradient directly (a Rao-Blackwellised estimator with far less variance), see ``extra_kl``.
        """
        with torch.no_grad():
            v = value_on_rollout(self.value, batch, skip=skip, chunk=self.cfg.value_minibatch or None)
        return v[1:] - v[:-1]

    def update(self, batch, gen):
        skip = skip_on_rollout(self.value, batch)
        vloss = self.fit_value(batch, self.returns_to_go(batch), gen, skip)
        adv = normalise(self.advantages(batch, skip), self.cfg.adv_norm)
        adv = clamp_standardised(adv, self.cfg.adv_norm, self.cfg.adv_clip)
        return self.ppo_update(batch, adv, gen, extra_kl=True) | {"value_loss": vloss}


class CTPOPathwise(Algorithm):
    name, uses_value = "ctpo-pathwise", True
    needs_reward_gradient = True

    def grad_value_next(self, batch: Rollout) -> Tensor:
        """grad_x V(t_{k+1}, x_{k+1}) for k = 0..K-1; the last one is grad r(x_K) (exact terminal condition)."""
        K, n = batch.K, batch.n
        t = batch.grid.t.to(batch.xs)[1:].repeat_interleave(n)
        x = batch.xs[1:].reshape(K * n, *batch.xs.shape[2:]).clone().requires_grad_(True)
        cond = batch.cond.repeat(K)
        v = self.value(t, x, cond)
        last = torch.arange(K * n) >= (K - 1) * n
        r = self.env.reward(x, cond)
        v = torch.where(last, r, v)
        (g,) = torch.autograd.grad(v.sum(), x)
        return g.detach()

    def update(self, batch, gen):
        if not self.env.reward_differentiable:
            raise ValueError("ctpo-pathwise needs a differentiable reward; use --algo ctpo for this reward")
        vloss = self.fit_value(batch, self.returns_to_go(batch), gen, skip_on_rollout(self.value, batch))
        gv = self.grad_value_next(batch)
        tr = Transitions.from_rollout(batch)
        infos = []
        for idx in self._minibatches(tr.i.numel(), gen):
            _, mean = self._logp(tr, idx, batch.cond)
            gain = sum_event(gv[idx] * mean)
            kl = self.step_penalty(mean, tr.pre_mean[idx], tr.std[idx], tr.s_cur[idx], tr.s_next[idx])
            loss = -(gain - self.beta * kl).mean()
            infos.append({"grad_norm": self._opt_step(loss * batch.K if self.cfg.sum_steps else loss)})
        norms = [i["grad_norm"] for i in infos]
        return {"grad_norm": sum(norms) / len(norms), "grad_clipped_frac": self._clipped_frac(norms),
                "value_loss": vloss}


class DDPO(Algorithm):
    name = "ddpo"

    def update(self, batch, gen):
        # The sampled log-ratio, not KL_k(theta): KL_k depends on theta directly, and a likelihood-ratio estimator
        # only sees the dependence through sampled transitions, so R - beta KL_path would not penalise the KL.
        # (kl=girsanov: each step's log-ratio times the state-independent factor of kl_penalty_scale)
        s = batch.grid.s.to(batch.stds)
        scale = self.kl_scale(s[:-1, None], s[1:, None], batch.stds)
        ret = batch.rewards - self.beta * (scale * batch.log_ratio_steps).sum(0)
        adv = self.per_condition(ret, batch.cond).clamp(-self.cfg.adv_clip, self.cfg.adv_clip)
        return self.ppo_update(batch, adv[None].expand(batch.K, -1), gen)

    def per_condition(self, values: Tensor, cond: Conditions) -> Tensor:
        """Per-condition normalisation over the samples of *all* processes when distributed (DDPO gathers them
        too), so every rank keeps the same statistics; each rank gets back its own slice."""
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return self.stats(values, cond)
        all_v, all_c = acc.gather(values), cond.gather(acc)
        n, r = values.shape[0], acc.process_index
        return self.stats(all_v, all_c)[r * n:(r + 1) * n]


class DPOK(Algorithm):
    name, uses_value = "dpok", True

    def update(self, batch, gen):
        skip = skip_on_rollout(self.value, batch)
        vloss = self.fit_value(batch, self.returns_to_go(batch, with_kl=False), gen, skip)
        with torch.no_grad():
            v = value_on_rollout(self.value, batch, skip=skip, chunk=self.cfg.value_minibatch or None)[:-1]
        adv = normalise(batch.rewards[None] - v, self.cfg.adv_norm)
        adv = clamp_standardised(adv, self.cfg.adv_norm, self.cfg.adv_clip)
        return self.ppo_update(batch, adv, gen, extra_kl=True) | {"value_loss": vloss}


class Backprop(Algorithm):
    """Differentiable sampling; the rollout of the trainer is used only for logging."""

    name = "backprop"
    needs_reward_gradient = True

    def update(self, batch, gen):
        if not self.env.reward_differentiable:
            raise ValueError("backprop needs a differentiable reward (e.g. not JPEG compressibility)")
        n_up = max(1, self.cfg.bp_updates)
        m = max(1, batch.n // n_up)                    # same number of fresh samples per iteration as the others
        norms = []
        for _ in range(n_up):
            cond = self.env.sample_conditions(m, gen)
            norms.append(self._opt_step(-self.objective(batch.grid, m, cond, gen).mean()))
        return {"grad_norm": sum(norms) / len(norms), "grad_clipped_frac": self._clipped_frac(norms)}

    def objective(self, grid, n: int, cond, gen: torch.Generator) -> Tensor:
        """r(x_T) - beta sum_k KL_k(theta) on fresh reparameterised samples; differentiable in theta."""
        x = self.env.sample_init(n, gen)
        pol = lambda s, y: self.policy_train(s, y, cond)
        pre = lambda s, y: self.env.pretrained_score(s, y, cond)
        kl_total = torch.zeros(n, dtype=x.dtype, device=x.device)
        first_grad = grid.K - self.cfg.bp_steps if self.cfg.bp_steps > 0 else 0
        for k in range(grid.K):
            s_c, s_n = grid.s[k], grid.s[k + 1]
            x_in = x if k >= first_grad else x.detach()
            mean, std = self.transition.mean_std(pol, x_in, s_c, s_n)
            # the pretrained mean must see the same (differentiable) state: KL_k depends on x_k through both means
            mean_pre, _ = self.transition.mean_std(pre, x_in, s_c, s_n)
            kl_total = kl_total + self.step_penalty(mean, mean_pre, std, s_c, s_n)
            z = randn_on(gen, x)
            x = mean + expand_time(std, x) * z
        return self.env.reward(x, cond) - self.beta * kl_total


ALGORITHM_CLASSES = {c.name: c for c in (CTPO, CTPOPathwise, DDPO, DPOK, Backprop)}
assert set(ALGORITHM_CLASSES) == set(ALGORITHMS), "engine.config.ALGORITHMS lists every algorithm"


def make_algorithm(name: str, env, policy, cfg, transition: Transition) -> Algorithm:
    if name not in ALGORITHM_CLASSES:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHM_CLASSES)}")
    return ALGORITHM_CLASSES[name](env, policy, cfg, transition)
