"""Closed-form data laws: Gaussians and Gaussian mixtures, exactly noised by any :class:`LinearSDE`.

If X_0 ~ sum_k w_k N(m_k, C_k) and X_s | X_0 ~ N(alpha X_0, sigma^2 I), then

    X_s ~ sum_k w_k N(alpha m_k, Sigma_k(s)),          Sigma_k(s) = alpha^2 C_k + sigma^2 I,
    score(s, x) = sum_k r_k(s, x) [-Sigma_k(s)^{-1} (x - alpha m_k)],   r_k = responsibilities,
    X_0 | X_s = x ~ sum_k r_k N(m_k + alpha C_k Sigma_k^{-1}(x - alpha m_k),  C_k - alpha^2 C_k Sigma_k^{-1} C_k),

and the Tweedie denoiser E[X_0 | X_s = x] = (x + sigma^2 score(s, x)) / alpha (Efron 2011) is the posterior mean.
C_k and Sigma_k(s) share eigenvectors, so everything is computed in the eigenbasis of C_k, batched over
samples, times and components. All computations run in the dtype of x (use float64 for checks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..dynamics.shapes import as_time
from ..dynamics.sde import LinearSDE


@dataclass
class MixturePosterior:
    """The exact law of X_0 given X_s = x: a Gaussian mixture per sample.

    weights (n, K), means (n, K, d), and covariances given in the eigenbasis of each component:
    cov_k = U_k diag(var_eig[:, k]) U_k^T with var_eig of shape (n, K, d).
    """

    weights: Tensor
    means: Tensor
    var_eig: Tensor
    U: Tensor
    event_shape: tuple[int, ...]

    def mean(self) -> Tensor:
        """E[X_0 | X_s = x], shape (n, *event)."""
        m = (self.weights.unsqueeze(-1) * self.means).sum(1)
        return m.reshape(m.shape[0], *self.event_shape)

    def cov(self) -> Tensor:
        """Cov[X_0 | X_s = x], shape (n, d, d) (law of total covariance)."""
        covk = torch.einsum("kij,nkj,klj->nkil", self.U, self.var_eig, self.U)
        m = (self.weights.unsqueeze(-1) * self.means).sum(1)
        dm = self.means - m.unsqueeze(1)
        within = (self.weights[..., None, None] * covk).sum(1)
        between = torch.einsum("nk,nki,nkj->nij", self.weights, dm, dm)
        return within + between

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One draw of X_0 per conditioning sample, shape (n, *event)."""
        n, K, d = self.means.shape
        k = torch.multinomial(self.weights, 1, generator=generator).squeeze(1)
        z = torch.randn(n, d, generator=generator, dtype=self.means.dtype, device=self.means.device)
        z = z * self.var_eig[torch.arange(n), k].sqrt()
        x = self.means[torch.arange(n), k] + torch.einsum("nij,nj->ni", self.U[k], z)
        return x.reshape(n, *self.event_shape)


class GaussianMixture:
    """p(x) = sum_k w_k N(x; m_k, C_k) on R^d, with exact scores of every noised marginal.

    ``event_shape`` is the shape of one sample: (d,) by default, () for a 1-D law used with x of shape (n,).
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, event_shape: tuple[int, ...] | None = None):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d); got {tuple(means.shape)}")
        K, d = means.shape
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},) to match means; got {tuple(weights.shape)}")
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}); got {tuple(covs.shape)}")
        if (weights < 0).any() or not math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must be non-negative and sum to 1; got {weights.tolist()}")
        lam, U = torch.linalg.eigh(covs)
        if (lam <= 0).any():
            raise ValueError("every component covariance must be positive definite")
        self.weights, self.means, self.covs = weights, means, covs
        self.lam, self.U = lam, U  # covs = U diag(lam) U^T
        self.K, self.d = K, d
        self.event_shape = (d,) if event_shape is None else tuple(event_shape)
        if math.prod(self.event_shape) != d:
            raise ValueError(f"event_shape {self.event_shape} does not hold d = {d} coordinates")

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def isotropic(cls, weights, means, stds, event_shape=None) -> "GaussianMixture":
        means = torch.as_tensor(means, dtype=torch.float64)
        K, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(K)
        covs = stds[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64)
        return cls(weights, means, covs, event_shape)

    # --- helpers ------------------------------------------------------------------------------
    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x must have shape (n, *{self.event_shape}); got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.d)

    def _unflat(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *self.event_shape)

    def _noised(self, sde: LinearSDE, s, x):
        """Eigen-coordinates of x under each noised component: (alpha, sigma, z, v)."""
        xf = self._flat(x)
        s = as_time(s, xf)
        a, sg = sde.alpha(s).to(xf), sde.sigma(s).to(xf)
        lam, U, m = self.lam.to(xf), self.U.to(xf), self.means.to(xf)
        v = a[:, None, None] ** 2 * lam[None] + sg[:, None, None] ** 2         # (n, K, d)
        z = torch.einsum("kji,nkj->nki", U, xf[:, None, :] - a[:, None, None] * m[None])  # U^T (x - a m)
        return a, sg, z, v

    def _component_logpdf(self, z: Tensor, v: Tensor) -> Tensor:
        return -0.5 * (z**2 / v).sum(-1) - 0.5 * torch.log(2 * math.pi * v).sum(-1)

    def responsibilities(self, sde: LinearSDE, s, x: Tensor) -> Tensor:
        """r_k(s, x) = P(component k | X_s = x), shape (n, K)."""
        _, _, z, v = self._noised(sde, s, x)
        logits = torch.log(self.weights.to(z)) + self._component_logpdf(z, v)
        return torch.softmax(logits, dim=1)

    # --- the noised law p_s ------------------------------------------------------------------
    def log_prob(self, sde: LinearSDE | None, s, x: Tensor) -> Tensor:
        """log p_s(x), shape (n,). ``sde=None`` (or s = 0) gives the data log-density."""
        if sde is None:
            sde, s = _Identity(), 0.0
        _, _, z, v = self._noised(sde, s, x)
        return torch.logsumexp(torch.log(self.weights.to(z)) + self._component_logpdf(z, v), dim=1)

    def score(self, sde: LinearSDE, s, x: Tensor) -> Tensor:
        """Exact score grad_x log p_s(x), shape like x."""
        _, _, z, v = self._noised(sde, s, x)
        logits = torch.log(self.weights.to(z)) + self._component_logpdf(z, v)
        r = torch.softmax(logits, dim=1)
        sk = -torch.einsum("kij,nkj->nki", self.U.to(z), z / v)               # (n, K, d)
        return self._unflat((r.unsqueeze(-1) * sk).sum(1))

    def score_fn(self, sde: LinearSDE):
        """The exact score as a ``score(s, x)`` callable, ready for the samplers."""
        return lambda s, x: self.score(sde, s, x)

    def posterior(self, sde: LinearSDE, s, x: Tensor) -> MixturePosterior:
        """The exact law of X_0 given X_s = x."""
        a, sg, z, v = self._noised(sde, s, x)
        lam, U = self.lam.to(z), self.U.to(z)
        logits = torch.log(self.weights.to(z)) + self._component_logpdf(z, v)
        r = torch.softmax(logits, dim=1)
        gain = a[:, None, None] * lam[None] / v                                # (n, K, d)
        means = self.means.to(z)[None] + torch.einsum("kij,nkj->nki", U, gain * z)
        var_eig = lam[None] * sg[:, None, None] ** 2 / v
        return MixturePosterior(r, means, var_eig, U, self.event_shape)

    def denoise(self, sde: LinearSDE, s, x: Tensor) -> Tensor:
        """Tweedie denoiser E[X_0 | X_s = x] (equals (x + sigma^2 score) / alpha)."""
        return self.posterior(sde, s, x).mean()

    def noised(self, sde: LinearSDE, s: float) -> "GaussianMixture":
        """p_s as a GaussianMixture object (for plotting and sampling at a fixed s)."""
        st = torch.tensor(float(s), dtype=torch.float64)
        a, sg = float(sde.alpha(st)), float(sde.sigma(st))
        covs = a**2 * self.covs + sg**2 * torch.eye(self.d, dtype=torch.float64)
        return GaussianMixture(self.weights, a * self.means, covs, self.event_shape)

    # --- moments and sampling ----------------------------------------------------------------
    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> Tensor:
        m = self.mean()
        dm = self.means - m
        return (self.weights[:, None, None] * (self.covs + dm[:, :, None] * dm[:, None, :])).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nij,nj->ni", self.U[k], z * self.lam[k].sqrt())
        return self._unflat(x).to(dtype)

    def nearest_component(self, x: Tensor) -> Tensor:
        """Index of the most likely component of the *data* law for each x (for mode weights)."""
        return self.responsibilities(_Identity(), 0.0, x).argmax(1)

    def __repr__(self):
        return f"{type(self).__name__}(K={self.K}, d={self.d}, event_shape={self.event_shape})"


class Gaussian(GaussianMixture):
    """A single Gaussian N(m, C) (a one-component mixture with the same API)."""

    def __init__(self, mean, cov, event_shape: tuple[int, ...] | None = None):
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        cov = torch.as_tensor(cov, dtype=torch.float64).reshape(1, mean.shape[1], mean.shape[1])
        super().__init__(torch.ones(1, dtype=torch.float64), mean, cov, event_shape)

    @classmethod
    def scalar(cls, mean: float, std: float) -> "Gaussian":
        """A 1-D Gaussian N(mean, std^2) for x of shape (n,)."""
        return cls([mean], [[std**2]], event_shape=())


def ring_mixture(n_modes: int = 8, radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """Equal-weight isotropic Gaussians with means on a circle at angles 2 pi k / n_modes (the ring mixture of the toy presets)."""
    ang = 2 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return GaussianMixture.isotropic(torch.full((n_modes,), 1.0 / n_modes, dtype=torch.float64), means, std)


class _Identity(LinearSDE):
    """The trivial SDE X_s = X_0 (alpha = 1, sigma = 0); lets s = 0 reuse the noised formulas."""

    T = 1.0

    def f_coef(self, s):
        return torch.zeros_like(s)

    def g(self, s):
        return torch.zeros_like(s)

    def alpha(self, s):
        return torch.ones_like(s)

    def sigma(self, s):
        return torch.zeros_like(s)

    def int_g2(self, s0, s1):
        return torch.zeros_like(s1)
