"""A small UNet noise predictor for 8x8 images and the score model built on it.

Architecture (about 0.45 M parameters, 1.8 MB in float32): conv 1->32 at 8x8, a residual block, a stride-2
downsampling to 4x4 with 64 channels, two residual blocks at 4x4 (optionally with self-attention over the 16
positions between them; off by default: it cost 40% more time and the digits did not need it), and the
mirror-image upsampling path (a transposed convolution back to 8x8) with skip connections. Time enters every residual block
through a sinusoidal embedding of s/T (Ho et al. 2020). The score is s_theta(s, x) = -eps_theta(s, x)/sigma(s)
(the epsilon parametrisation keeps the network's output O(1) at every noise level).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...dynamics.parameterisation import eps_to_score
from ...dynamics.shapes import as_time, expand_time
from ...dynamics.sde import LinearSDE


def sinusoidal(u: Tensor, dim: int) -> Tensor:
    """Transformer-style embedding of u in [0, 1] scaled to [0, 1000] (DDPM's convention), shape (n, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=u.device) / half)
    ang = 1000.0 * u.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int = 8):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t = nn.Linear(t_dim, c_out)
        self.n2, self.c2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.t(temb)[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the spatial positions (used at 4x4)."""

    def __init__(self, c: int, groups: int = 8):
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(groups, c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)        # (n, hw, hw)
        return x + self.out((v @ a.transpose(1, 2)).reshape(n, c, h, w))


class UNet8(nn.Module):
    """eps_theta(u, x) for x of shape (n, 1, 8, 8) and u = s / T in [0, 1]."""

    def __init__(self, ch: int = 32, ch2: int = 64, t_dim: int = 128, attention: bool = False):
        super().__init__()
        self.config = dict(ch=ch, ch2=ch2, t_dim=t_dim, attention=attention)
        self.t_dim = t_dim
        self.temb = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.d1 = ResBlock(ch, ch, t_dim)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.d2 = ResBlock(ch, ch2, t_dim)
        self.m1 = ResBlock(ch2, ch2, t_dim)
        self.attn = Attention(ch2) if attention else nn.Identity()
        self.m2 = ResBlock(ch2, ch2, t_dim)
        self.u2 = ResBlock(2 * ch2, ch2, t_dim)
        self.up = nn.ConvTranspose2d(ch2, ch, 2, stride=2)
        self.u1 = ResBlock(2 * ch, ch, t_dim)
        self.out_norm = nn.GroupNorm(8, ch)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        t = self.temb(sinusoidal(u, self.t_dim))
        h1 = self.d1(self.inp(x), t)                                       # (n, ch, 8, 8)
        h2 = self.d2(self.down(h1), t)                                     # (n, ch2, 4, 4)
        h = self.m2(self.attn(self.m1(h2, t)), t)
        h = self.u2(torch.cat([h, h2], 1), t)
        h = self.up(h)                                                     # (n, ch, 8, 8)
        h = self.u1(torch.cat([h, h1], 1), t)
        return self.out(F.silu(self.out_norm(h)))


class DigitsScoreModel(nn.Module):
    """s_theta(s, x) = -eps_theta(s/T, x) / sigma(s) for a linear SDE (float32 network, any input dtype)."""

    def __init__(self, sde: LinearSDE, **unet_kw):
        super().__init__()
        self.sde = sde
        self.eps = UNet8(**unet_kw)

    def eps_pred(self, s: Tensor, x: Tensor) -> Tensor:
        s = as_time(s, x)
        return self.eps((s / self.sde.T).float(), x.float()).to(x.dtype)

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        s = as_time(s, x)
        return eps_to_score(self.sde, s, self.eps_pred(s, x))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
