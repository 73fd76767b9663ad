"""The learned branch of the structured value network at Stable Diffusion scale (chapter 9).

The engine's :class:`sacode.engine.value.StructuredValue` computes

    V(t, x, c) = cos(pi/2 (T - t)/T) r(D(x0_hat(t, x, c)), c) + sin(pi/2 (T - t)/T) V_phi(t, x, c),

where x0_hat is the Tweedie prediction of the pretrained (guided) score and D the VAE decoder, so the first branch is
"the reward of the denoised image", exact at t = T. This module is V_phi for latents: a small convolutional network on
x, with Fourier time features and the pooled prompt embedding, whose output layer starts at zero (so V starts as the
zeroth-order guess r(D(x0_hat)) and learns only the correction). The paper's V_phi is instead a trainable copy of
ImageReward applied to the decoded noisy image D(x_t); ours is reward-agnostic and cheap.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...dynamics.shapes import as_time
from ...engine.nets import TimeEmbedding


class LatentValueCorrection(nn.Module):
    """V_phi(t, x, c): conv(x) -> global mean pool, concatenated with time features and a projection of the pooled
    prompt embedding, then a 2-layer head with a zero-initialised output."""

    def __init__(self, env, width: int = 64, depth: int = 2, n_freq: int = 4):
        super().__init__()
        self.env = env
        c = env.event_shape[0]
        groups = 8 if width % 8 == 0 else 1
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.SiLU()]
        for _ in range(max(depth, 1)):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        self.time = TimeEmbedding(n_freq)
        d_text = env.text_encoder.config.hidden_size
        self.text = nn.Linear(d_text, width)
        self.head = nn.Sequential(nn.Linear(width + self.time.dim + width, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.to(device=env.device, dtype=torch.float64 if env.dtype == torch.float64 else torch.float32)

    def forward(self, t: Tensor, x: Tensor, cond: Any = None) -> Tensor:
        dtype = self.head[-1].weight.dtype
        t = as_time(t, x).to(dtype)
        h = self.conv(x.to(dtype)).mean((2, 3))
        e = self.text(self.env.pooled_embedding(self.env.prompts_of(cond, x.shape[0])).to(dtype))
        out = self.head(torch.cat([h, self.time(t / self.env.sde.T), e], dim=1)).squeeze(1)
        return out.to(x.dtype)
