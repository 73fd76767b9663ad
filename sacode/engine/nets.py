"""Small networks for score models and value functions on vectors (any event shape, flattened)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..dynamics.parameterisation import eps_to_score
from ..dynamics.shapes import as_time, flatten_event
from ..dynamics.sde import LinearSDE


class TimeEmbedding(nn.Module):
    """Fourier features of a scalar time u in [0, 1]: [sin(2 pi k u), cos(2 pi k u)] for k = 1..n_freq, and u."""

    def __init__(self, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32))
        self.dim = 2 * n_freq + 1

    def forward(self, u: Tensor) -> Tensor:
        ang = u[:, None] * self.freqs.to(u)
        return torch.cat([torch.sin(ang), torch.cos(ang), u[:, None]], dim=1)


class MLP(nn.Module):
    """h(u, x) -> R^out: time-embedded multilayer perceptron with SiLU activations."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 128, depth: int = 3, n_freq: int = 8):
        super().__init__()
        self.embed = TimeEmbedding(n_freq)
        layers, w = [], d_in + self.embed.dim
        for _ in range(depth):
            layers += [nn.Linear(w, hidden), nn.SiLU()]
            w = hidden
        layers.append(nn.Linear(w, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        return self.net(torch.cat([x, self.embed(u)], dim=1))


class ScoreMLP(nn.Module):
    """Score model s_theta(s, x) = -eps_theta(s, x) / sigma(s) with an MLP noise predictor eps_theta.

    The epsilon parametrisation keeps the network's output O(1) at every noise level (Ho et al. 2020);
    time enters as s / T. Works for x of shape (n,), (n, d) or (n, c, h, w) (flattened to d coordinates).
    """

    def __init__(self, sde: LinearSDE, d: int, hidden: int = 128, depth: int = 3, n_freq: int = 8):
        super().__init__()
        self.sde, self.d = sde, d
        self.eps = MLP(d, d, hidden, depth, n_freq)

    def eps_pred(self, s: Tensor, x: Tensor) -> Tensor:
        s = as_time(s, x)
        out = self.eps((s / self.sde.T).to(x.dtype), flatten_event(x))
        return out.reshape(x.shape)

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        return eps_to_score(self.sde, s, self.eps_pred(s, x))
