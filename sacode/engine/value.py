"""Value networks V(t, x, c) in RL time and the value learner that fits them (chapter 9).

* :class:`MLPValue` — a plain time-embedded MLP.
* :class:`StructuredValue` — the design of the paper's value network:

      V(t, x) = c_skip(t) r(x0_hat(t, x)) + c_out(t) V_phi(t, x),
      c_skip(t) = cos(pi/2 (T - t)/T),   c_out(t) = sin(pi/2 (T - t)/T),

  with x0_hat the Tweedie denoiser of the pretrained score. At t = T, x0_hat = x and c_out = 0, so the terminal
  condition V(T, x) = r(x) holds exactly, and r(x0_hat) is a good zeroth-order guess (it equals
  r(E[X_T | X_t = x]), which is V up to a Jensen gap) that the learned branch corrects where the denoiser is
  uninformative.
* :class:`ValueLearner` — regression of V on Monte-Carlo returns, a component that any algorithm (or a chapter)
  uses on its own.

Options measured in chapter 7 (defaults keep the paper's design and the original learner):

* ``skip="one"`` — V = r(x0_hat) + c_out(t) V_phi. With the exact pretrained score r(x0_hat) is the pretrained
  policy's value up to a function of t alone (exactly, for a linear or quadratic reward on Gaussian data, chapter 9),
  so grad_x V is exact at the start of fine-tuning; the paper's c_skip = cos fades the guess out towards the noise
  end and leaves V_phi to learn (1 - c_skip) r(x0_hat) / c_out.
* ``zero_init`` — the learned branch's last layer starts at zero, so V starts at its fixed branch.
* ``replay`` — the regression uses the states and returns of the last ``replay`` batches (no new samples).
* ``lam`` < 1 — TD(lambda) targets G^lam_k = rew_k + (1 - lam) V(t_{k+1}, x_{k+1}) + lam G^lam_{k+1} built from the
  algorithm's Monte-Carlo targets (rew_k = G_k - G_{k+1}) and the current network (lam = 1: Monte-Carlo returns).
"""
from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor, nn

from ..dynamics.parameterisation import tweedie
from ..dynamics.shapes import as_time
from ..dynamics.time import diffusion_time
from ..theory.conditions import Conditions
from ..theory.control import Rollout
from .divergence import FiniteWatch
from .nets import MLP


def zero_last_layer(module: nn.Module) -> None:
    """Set the weight and bias of the last layer (in registration order) that has both to zero, so that the module's
    output starts at zero (a learned correction that starts at nothing)."""
    last = None
    for m in module.modules():
        if isinstance(getattr(m, "weight", None), Tensor) and isinstance(getattr(m, "bias", None), Tensor):
            last = m
    if last is None:
        raise ValueError(f"{type(module).__name__} has no layer with a weight and a bias to set to zero")
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


class MLPValue(nn.Module):
    """V(t, x) = MLP(t/T, x)."""

    def __init__(self, env, hidden: int = 64, depth: int = 2, n_freq: int = 4, zero_init: bool = False):
        super().__init__()
        self.env = env
        self.net = MLP(math.prod(env.event_shape), 1, hidden, depth, n_freq)
        self.to(env.dtype)                                  # the environment's dtype (float64 toys, float32 images)
        if zero_init:
            zero_last_layer(self.net)

    def forward(self, t: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        t = as_time(t, x)
        return self.net((t / self.env.sde.T).to(x.dtype), x.reshape(x.shape[0], -1)).squeeze(1)


SKIPS = ("cos", "one")
"""Weights of the Tweedie branch of :class:`StructuredValue`: the paper's cos(u), or 1 (module docstring)."""


class StructuredValue(nn.Module):
    """c_skip(t) r(x0_hat(t, x)) + c_out(t) V_phi(t, x) with the exact terminal condition V(T, x) = r(x).

    ``skip``: ``"cos"`` (the paper's c_skip = cos u) or ``"one"`` (c_skip = 1); ``zero_init``: V_phi starts at zero.
    """

    def __init__(self, env, hidden: int = 64, depth: int = 2, n_freq: int = 4, skip: str = "cos",
                 zero_init: bool = False):
        super().__init__()
        if skip not in SKIPS:
            raise ValueError(f"unknown skip weight {skip!r}; choose one of {', '.join(SKIPS)}")
        self.env, self.skip_kind = env, skip
        own = env.value_correction(hidden=hidden, depth=depth)   # e.g. a conv net on Stable Diffusion latents
        self.correction = own if own is not None else MLPValue(env, hidden, depth, n_freq)
        if zero_init:
            zero_last_layer(self.correction)

    def weights(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) = (cos u, sin u), or (1, sin u) for ``skip="one"``; u = pi/2 (T - t)/T = pi/2 s/T."""
        T = self.env.sde.T
        u = 0.5 * math.pi * diffusion_time(t, T) / T
        return (torch.cos(u) if self.skip_kind == "cos" else torch.ones_like(u)), torch.sin(u)

    def denoised(self, t: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        s = as_time(diffusion_time(as_time(t, x), self.env.sde.T), x)
        return tweedie(self.env.sde, s, x, self.env.pretrained_score(s, x, cond))

    def forward(self, t: Tensor, x: Tensor, cond: Conditions | None = None, skip: Tensor | None = None) -> Tensor:
        """V(t, x); ``skip`` = r(x0_hat(t, x)) when already known (see :func:`skip_on_rollout`)."""
        t = as_time(t, x)
        c_skip, c_out = self.weights(t)
        if skip is None:
            skip = self.env.reward(self.denoised(t, x, cond), cond)
        return c_skip * skip.to(x.dtype) + c_out * self.correction(t, x, cond)


VALUE_NETWORKS = {"mlp": MLPValue, "structured": StructuredValue}

PAPER_VALUE_LEARNING = {"value_skip": "cos", "value_zero_init": False, "value_lambda": 1.0, "value_replay": 1}
"""The paper's value learner: the structured value with the cosine-faded Tweedie branch, fitted on the current
batch's Monte-Carlo returns. The engine's default (digits and Stable Diffusion keep it)."""
IMPROVED_VALUE_LEARNING = {"value_skip": "one", "value_zero_init": True, "value_lambda": 0.5, "value_replay": 4}
"""The value learner chapter 7 recommends (the toys' default): the Tweedie branch with weight one, a learned branch
that starts at zero, TD(0.5) targets and the last 4 batches in each regression (no extra samples). Chapter 7 measures
that it keeps the value's input gradient, and with it ctpo's variance advantage, along training."""


def make_value(kind: str, env, **kw) -> nn.Module:
    if kind not in VALUE_NETWORKS:
        raise ValueError(f"unknown value network {kind!r}; choose one of {', '.join(VALUE_NETWORKS)}")
    return VALUE_NETWORKS[kind](env, **kw)


def _flat_states(batch: Rollout, steps: slice) -> tuple[Tensor, Tensor]:
    """RL times and states of the rollout's steps ``steps`` flattened step by step: (m,), (m, *event)."""
    xs = batch.xs[steps]
    t = batch.grid.t.to(batch.xs)[steps]
    return t.repeat_interleave(batch.n), xs.reshape(xs.shape[0] * batch.n, *xs.shape[2:])


def skip_on_rollout(value: nn.Module, batch: Rollout) -> Tensor | None:
    """The fixed branch r(x0_hat(t_k, x_k)) of a structured value at every state of a rollout, shape (K+1, n).

    Uses the pretrained scores the rollout recorded, so it costs no score evaluation (for Stable Diffusion: a VAE
    decode and a reward per state, once per rollout instead of once per value evaluation); the terminal entry is the
    reward. None for other value networks.
    """
    if not isinstance(value, StructuredValue) or batch.pre_scores is None:
        return None
    K, n, ev = batch.K, batch.n, batch.xs.shape[2:]
    s = batch.grid.s.to(batch.xs)[:-1].repeat_interleave(n)
    x = batch.xs[:-1].reshape(K * n, *ev)
    with torch.no_grad():
        x0 = tweedie(value.env.sde, s, x, batch.pre_scores.reshape(K * n, *ev).to(x))
        r = value.env.reward(x0, batch.cond.repeat(K)).reshape(K, n)
    return torch.cat([r, batch.rewards[None].to(r)], 0)


def value_on_rollout(value: nn.Module, batch: Rollout, terminal_exact: bool = True, skip: Tensor | None = None,
                     chunk: int | None = None) -> Tensor:
    """V(t_k, x_k) for k = 0..K, shape (K+1, n); the terminal entry is the reward itself when terminal_exact.

    ``skip`` (K+1, n): a structured value's precomputed r(x0_hat) (:func:`skip_on_rollout`); ``chunk``: evaluate at
    most this many states per call (memory).
    """
    K, n = batch.K, batch.n
    flat_t, flat_x = _flat_states(batch, slice(None))
    cond = batch.cond.repeat(K + 1)
    flat_skip = skip.reshape(-1) if skip is not None else None
    N = flat_x.shape[0]
    if not chunk or chunk >= N:
        v = value(flat_t, flat_x, cond, **({"skip": flat_skip} if flat_skip is not None else {}))
    else:
        parts = []
        for j in range(0, N, chunk):
            idx = torch.arange(j, min(j + chunk, N))
            kw = {"skip": flat_skip[idx]} if flat_skip is not None else {}
            parts.append(value(flat_t[idx], flat_x[idx], cond.index(idx), **kw))
        v = torch.cat(parts)
    v = v.reshape(K + 1, n)
    if terminal_exact:
        v = torch.cat([v[:-1], batch.rewards[None].to(v)], dim=0)
    return v


def returns_to_go(batch: Rollout, beta: float, with_kl: bool = True, kl_steps: Tensor | None = None) -> Tensor:
    """G_k = R - beta sum_{j >= k} KL_j, shape (K+1, n) (G_K = R): Monte-Carlo targets of V(t_k, x_k).

    ``kl_steps`` (K, n) replaces the rollout's recorded chain KLs (e.g. the Girsanov penalty, chapter 4)."""
    kl = (batch.kl_steps if kl_steps is None else kl_steps) if with_kl else torch.zeros_like(batch.kl_steps)
    tail = torch.flip(torch.cumsum(torch.flip(kl, [0]), 0), [0])
    G = batch.rewards[None] - beta * tail
    return torch.cat([G, batch.rewards[None]], 0)


def lambda_returns(value: nn.Module, batch: Rollout, targets: Tensor, lam: float, skip: Tensor | None = None,
                   chunk: int | None = None) -> Tensor:
    """TD(lambda) targets (K+1, n) from Monte-Carlo targets G_k (K+1, n) and the network's current values:

        G^lam_K = G_K,   G^lam_k = (G_k - G_{k+1}) + (1 - lam) V(t_{k+1}, x_{k+1}) + lam G^lam_{k+1},

    where G_k - G_{k+1} is the step's reward (e.g. -beta KL_k) and V(T, .) = r. lam = 1 returns G itself."""
    if lam >= 1.0:
        return targets
    with torch.no_grad():
        v = value_on_rollout(value, batch, skip=skip, chunk=chunk).to(targets)
    out = targets.clone()
    for k in reversed(range(batch.K)):
        out[k] = (targets[k] - targets[k + 1]) + (1.0 - lam) * v[k + 1] + lam * out[k + 1]
    return out


def _cat_conditions(parts: list[Conditions]) -> Conditions:
    if all(c.values is None for c in parts):
        return Conditions.none(sum(c.n for c in parts))
    if all(isinstance(c.values, Tensor) for c in parts):
        return Conditions(torch.cat([c.values for c in parts]))
    return Conditions([v for c in parts for v in c.values])


class ValueLearner:
    """Fits a value network by regression of V(t_k, x_k) on targets (Monte-Carlo returns) over rollouts.

    Args:
        value: the network (e.g. from :func:`make_value`).
        lr: Adam learning rate; epochs: passes over the regression data per fit; minibatch: states per step;
        max_grad_norm: gradient clipping; replay: batches whose states and targets each fit uses (1: the current one);
        lam: TD(lambda) parameter of the targets (1: the Monte-Carlo targets as given, :func:`lambda_returns`).
    """

    def __init__(self, value: nn.Module, lr: float, epochs: int = 2, minibatch: int = 1024,
                 max_grad_norm: float = 1.0, replay: int = 1, lam: float = 1.0):
        self.value, self.epochs, self.minibatch, self.max_grad_norm = value, int(epochs), int(minibatch), max_grad_norm
        if replay < 1 or not 0.0 <= lam <= 1.0:
            raise ValueError(f"replay must be >= 1 and lam in [0, 1]; got replay={replay}, lam={lam}")
        self.replay, self.lam = int(replay), float(lam)
        self.memory: deque = deque(maxlen=self.replay)
        self.opt = torch.optim.Adam(value.parameters(), lr=lr)
        self.value_train = value          # the network or its DDP wrapper (attach)
        self.accelerator = None
        self.watch = FiniteWatch("value-network", "value_lr")

    @classmethod
    def from_config(cls, env, cfg) -> "ValueLearner":
        """The value network ``cfg.value`` for ``env`` and its learner with the run's settings (value_lr,
        value_epochs, value_minibatch or minibatch, max_grad_norm, and the value-learning block of the config)."""
        kw = {"zero_init": cfg.value_zero_init} | ({"skip": cfg.value_skip} if cfg.value == "structured" else {})
        value = make_value(cfg.value, env, hidden=cfg.hidden, depth=cfg.depth, **kw)
        return cls(value, cfg.value_lr, cfg.value_epochs, cfg.value_minibatch or cfg.minibatch, cfg.max_grad_norm,
                   cfg.value_replay, cfg.value_lambda)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The regression loss of a minibatch: the mean squared error (its minimiser is E[target | t, x])."""
        return ((pred - target) ** 2).mean()

    def attach(self, accelerator) -> None:
        """Train through accelerate (device placement, mixed precision, DDP)."""
        self.accelerator = accelerator
        self.value_train, self.opt = accelerator.prepare(self.value, self.opt)

    def fit(self, batch: Rollout, targets: Tensor, gen: torch.Generator, skip: Tensor | None = None) -> float:
        """Regress V(t_k, x_k) on ``targets`` (K+1, n) over k < K (V(T, .) = r is exact by construction), together
        with the last ``replay - 1`` batches; returns the mean squared error over the steps taken. ``skip`` (K+1, n):
        a structured value's r(x0_hat)."""
        K = batch.K
        targets = lambda_returns(self.value, batch, targets, self.lam, skip)
        t, x = _flat_states(batch, slice(None, -1))
        self.memory.append((t, x, targets[:-1].reshape(-1).to(x), batch.cond.repeat(K),
                            skip[:-1].reshape(-1) if skip is not None else None))
        if len(self.memory) == 1:
            t, x, y, cond, flat_skip = self.memory[0]
        else:
            parts = list(self.memory)
            t, x, y = (torch.cat([p[j] for p in parts]) for j in range(3))
            cond = _cat_conditions([p[3] for p in parts])
            flat_skip = torch.cat([p[4] for p in parts]) if parts[0][4] is not None else None
        N = x.shape[0]
        losses = []
        for _ in range(self.epochs):
            perm = torch.randperm(N, generator=gen)
            for j in range(0, perm.numel(), self.minibatch):
                idx = perm[j: j + self.minibatch]
                kw = {"skip": flat_skip[idx]} if flat_skip is not None else {}
                pred = self.value_train(t[idx], x[idx], cond.index(idx), **kw)
                loss = self.loss(pred, y[idx])
                self.opt.zero_grad(set_to_none=True)
                self.watch.loss(loss)
                if self.accelerator is None:
                    loss.backward()
                    gn = nn.utils.clip_grad_norm_(list(self.value.parameters()), self.max_grad_norm)
                else:
                    self.accelerator.backward(loss)
                    gn = self.accelerator.clip_grad_norm_(list(self.value.parameters()), self.max_grad_norm)
                self.watch.gradients(gn)
                self.opt.step()
                self.watch.parameters(self.value.parameters())
                losses.append(float(loss.detach()))
        return sum(losses) / max(len(losses), 1)

    def state_dict(self) -> dict:
        d = {"value": self.value.state_dict(), "value_opt": self.opt.state_dict()}
        if self.replay > 1:
            d["value_memory"] = [tuple(p) for p in self.memory]
        return d

    def load_state_dict(self, d: dict) -> None:
        self.value.load_state_dict(d["value"])
        self.opt.load_state_dict(d["value_opt"])
        self.memory.clear()
        self.memory.extend(d.get("value_memory", []))
