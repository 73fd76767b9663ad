"""The affine policy family of chapter 6 as an engine policy, one chain per coordinate (chapter 7).

On a preset whose problem separates by coordinate (``gauss1d-*``, ``gauss{d}d-*``;
:func:`~sacode.theory.presets.coordinate_presets`) the policy

    s_theta(s, x)_i = s_pre(s, x)_i + theta0_i(t) + theta1_i(t) x_i,      t = T - s,

with each theta_i(t) a hat-basis expansion (:class:`~sacode.theory.affine_policy.HatBasis`), keeps every law Gaussian,
so the gradient of the K-step objective is exact (:func:`sacode.theory.estimators.discrete_gradient`) while the engine's
algorithms train it like any other policy. ``theta`` is a (d, 2 nb) parameter whose row i is coordinate i's parameter
vector of :class:`~sacode.theory.affine_policy.AffineScoreFamily` (zero: the pretrained sampler).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..dynamics.shapes import as_time
from ..dynamics.time import rl_time
from ..theory.affine_policy import HatBasis
from ..theory.conditions import Conditions
from .policy import ScorePolicy


class AffinePolicy(ScorePolicy):
    """s_pre + theta0(t) + theta1(t) x per coordinate (module docstring); x of shape (n,) or (n, d)."""

    def __init__(self, env, basis: HatBasis, theta: np.ndarray | Tensor | None = None):
        super().__init__()
        self.env, self.basis = env, basis
        self.d = int(np.prod(env.event_shape)) if env.event_shape else 1
        init = torch.zeros(self.d, 2 * basis.n, dtype=torch.float64)
        if theta is not None:
            init = torch.as_tensor(np.asarray(theta, dtype=np.float64)).reshape(self.d, 2 * basis.n).clone()
        self.theta = nn.Parameter(init)

    def correction(self, s: Tensor, x: Tensor) -> Tensor:
        """theta0(t) + theta1(t) x, shape like x."""
        s = as_time(s, x)
        phi = self.basis(rl_time(s, self.env.sde.T)).to(x.dtype)                 # (n, nb)
        nb = self.basis.n
        th0, th1 = phi @ self.theta[:, :nb].T.to(x.dtype), phi @ self.theta[:, nb:].T.to(x.dtype)   # (n, d)
        xf = x.reshape(x.shape[0], self.d)
        return (th0 + th1 * xf).reshape(x.shape)

    def forward(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        s = as_time(s, x)
        return self.env.pretrained_score(s, x, cond) + self.correction(s, x)

    def thetas(self) -> np.ndarray:
        """The parameters as a (d, 2 nb) array (row i: coordinate i's theta)."""
        return self.theta.detach().cpu().numpy().copy()
