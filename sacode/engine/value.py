"""Value networks V(t, x, c) in RL time (chapter 8).

* :class:`MLPValue` — a plain time-embedded MLP.
* :class:`StructuredValue` — the design of the paper's value network (theory-notes section 4, "Eq. (20)"):

      V(t, x) = c_skip(t) r(x0_hat(t, x)) + c_out(t) V_phi(t, x),
      c_skip(t) = cos(pi/2 (T - t)/T),   c_out(t) = sin(pi/2 (T - t)/T),

  with x0_hat the Tweedie denoiser of the pretrained score. At t = T, x0_hat = x and c_out = 0, so the terminal
  condition V(T, x) = r(x) holds exactly, and r(x0_hat) is a good zeroth-order guess (it equals
  r(E[X_T | X_t = x]), which is V up to a Jensen gap) that the learned branch corrects where the denoiser is
  uninformative.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._shapes import as_time
from ..nets import MLP
from ..time import diffusion_time
from .env import index_cond, tweedie


class MLPValue(nn.Module):
    """V(t, x) = MLP(t/T, x)."""

    def __init__(self, env, hidden: int = 64, depth: int = 2, n_freq: int = 4):
        super().__init__()
        self.env = env
        d = math.prod(env.event_shape) if env.event_shape else 1
        self.net = MLP(d, 1, hidden, depth, n_freq)
        self.to(getattr(env, "dtype", torch.float64))       # the environment's dtype (float64 toys, float32 images)

    def forward(self, t: Tensor, x: Tensor, cond: Any = None) -> Tensor:
        t = as_time(t, x)
        return self.net((t / self.env.sde.T).to(x.dtype), x.reshape(x.shape[0], -1)).squeeze(1)


class StructuredValue(nn.Module):
    """c_skip(t) r(x0_hat(t, x)) + c_out(t) V_phi(t, x) with the exact terminal condition V(T, x) = r(x)."""

    def __init__(self, env, hidden: int = 64, depth: int = 2, n_freq: int = 4):
        super().__init__()
        self.env = env
        make = getattr(env, "value_correction", None)    # an environment may supply V_phi (a conv net on latents)
        self.correction = make(hidden=hidden, depth=depth) if make is not None else MLPValue(env, hidden, depth, n_freq)

    def weights(self, t: Tensor) -> tuple[Tensor, Tensor]:
        u = 0.5 * math.pi * (self.env.sde.T - t) / self.env.sde.T
        return torch.cos(u), torch.sin(u)

    def denoised(self, t: Tensor, x: Tensor, cond: Any = None) -> Tensor:
        s = as_time(diffusion_time(as_time(t, x), self.env.sde.T), x)
        return tweedie(self.env.sde, s, x, self.env.pretrained_score(s, x, cond))

    def forward(self, t: Tensor, x: Tensor, cond: Any = None, skip: Tensor | None = None) -> Tensor:
        """V(t, x); ``skip`` = r(x0_hat(t, x)) when already known (see :func:`skip_on_rollout`)."""
        t = as_time(t, x)
        c_skip, c_out = self.weights(t)
        if skip is None:
            skip = self.env.reward(self.denoised(t, x, cond), cond)
        return c_skip * skip.to(x.dtype) + c_out * self.correction(t, x, cond)


def skip_on_rollout(value: nn.Module, batch) -> Tensor | None:
    """The fixed branch r(x0_hat(t_k, x_k)) of a structured value at every state of a rollout, shape (K+1, n).

    Uses the pretrained scores the rollout recorded, so it costs no score evaluation (for Stable Diffusion: a VAE
    decode and a reward per state, once per rollout instead of once per value evaluation); the terminal entry is the
    reward. None for other value networks.
    """
    if not isinstance(value, StructuredValue) or getattr(batch, "pre_scores", None) is None:
        return None
    K, n, ev = batch.K, batch.n, batch.xs.shape[2:]
    s = batch.grid.s.to(batch.xs)[:-1].repeat_interleave(n)
    x = batch.xs[:-1].reshape(K * n, *ev)
    with torch.no_grad():
        x0 = tweedie(value.env.sde, s, x, batch.pre_scores.reshape(K * n, *ev).to(x))
        r = value.env.reward(x0, _repeat_cond(batch.cond, K)).reshape(K, n)
    return torch.cat([r, batch.rewards[None].to(r)], 0)


VALUE_NETWORKS = {"mlp": MLPValue, "structured": StructuredValue}


def make_value(kind: str, env, **kw) -> nn.Module:
    if kind not in VALUE_NETWORKS:
        raise ValueError(f"unknown value network {kind!r}; choose one of {', '.join(VALUE_NETWORKS)}")
    return VALUE_NETWORKS[kind](env, **kw)


def value_on_rollout(value: nn.Module, batch, terminal_exact: bool = True, skip: Tensor | None = None,
                     chunk: int | None = None) -> Tensor:
    """V(t_k, x_k) for k = 0..K, shape (K+1, n); the terminal entry is the reward itself when terminal_exact.

    ``skip`` (K+1, n): a structured value's precomputed r(x0_hat) (:func:`skip_on_rollout`); ``chunk``: evaluate at
    most this many states per call (memory).
    """
    K, n = batch.K, batch.n
    t = batch.grid.t.to(batch.xs)
    flat_x = batch.xs.reshape((K + 1) * n, *batch.xs.shape[2:])
    flat_t = t.repeat_interleave(n)
    cond = _repeat_cond(batch.cond, K + 1)
    flat_skip = skip.reshape(-1) if skip is not None else None
    N = flat_x.shape[0]
    if not chunk or chunk >= N:
        kw = {"skip": flat_skip} if flat_skip is not None else {}
        v = value(flat_t, flat_x, cond, **kw).reshape(K + 1, n)
    else:
        parts = []
        for j in range(0, N, chunk):
            idx = torch.arange(j, min(j + chunk, N))
            kw = {"skip": flat_skip[idx]} if flat_skip is not None else {}
            parts.append(value(flat_t[idx], flat_x[idx], index_cond(cond, idx), **kw))
        v = torch.cat(parts).reshape(K + 1, n)
    if terminal_exact:
        v = torch.cat([v[:-1], batch.rewards[None].to(v)], dim=0)
    return v


def _repeat_cond(cond, times: int):
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.repeat(times, *([1] * (cond.ndim - 1)))
    if isinstance(cond, (list, tuple)):
        return list(cond) * times
    if isinstance(cond, dict):
        return {k: _repeat_cond(v, times) for k, v in cond.items()}
    raise TypeError(f"cannot repeat conditions of type {type(cond).__name__}")
