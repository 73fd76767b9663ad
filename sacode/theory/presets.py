"""The toy presets, with exact parameters (the book's appendix "How sacode is built" lists them too).

VP SDE with b(s) = b_min + (b_max - b_min) s / T, T = 1; the reverse sampler starts from N(0, I).

=========================  ============  ==========================  ===============  ====
preset                     b_min, b_max  data                        r(x)             beta
=========================  ============  ==========================  ===============  ====
gauss1d-linear             0.1, 20       N(0.5, 0.8^2)               x                0.5
gauss1d-linear-short       0.1, 2        N(0.5, 0.8^2)               x                0.5
gauss1d-quadratic          0.1, 20       N(0.5, 0.8^2)               -(x - 2)^2       1.0
gauss1d-quadratic-short    0.1, 2        N(0.5, 0.8^2)               -(x - 2)^2       1.0
mixture2d-linear           0.1, 20       8 Gaussians on radius 2,    x_1              0.5
                                         std 0.2, equal weights
=========================  ============  ==========================  ===============  ====

The d-dimensional Gaussian presets of the estimator chapter (chapter 7), :data:`DIMENSION_PRESETS`, are d independent
copies of a 1-D preset: ``gauss{d}d-linear`` has data N(0.5 1, 0.8^2 I_d), r(x) = sum_i x_i, beta = 0.5 (each
coordinate is ``gauss1d-linear``), and ``gauss{d}d-quadratic`` has r(x) = -||x - 2 1||^2, beta = 1 (each coordinate
is ``gauss1d-quadratic``), for d in {8, 32}. Their problems separate by coordinate (:func:`coordinate_presets`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import Gaussian, GaussianMixture, ring_mixture
from .rewards import LinearReward, QuadraticReward
from ..dynamics.sde import VPSDE


@dataclass(frozen=True)
class ToyPreset:
    name: str
    sde: VPSDE
    data: GaussianMixture
    reward: LinearReward | QuadraticReward
    beta: float

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.data.event_shape


def _make(name: str) -> ToyPreset:
    short = name.endswith("-short")
    sde = VPSDE(0.1, 2.0 if short else 20.0, 1.0)
    if name in DIMENSION_PRESETS:
        d = int(name[len("gauss"):name.index("d-")])
        data = GaussianMixture.isotropic([1.0], torch.full((1, d), 0.5, dtype=torch.float64), 0.8)
        if name.endswith("-linear"):
            return ToyPreset(name, sde, data, LinearReward(torch.ones(d, dtype=torch.float64)), 0.5)
        return ToyPreset(name, sde, data, QuadraticReward(2.0, torch.full((d,), 2.0, dtype=torch.float64)), 1.0)
    if name.startswith("gauss1d-linear"):
        return ToyPreset(name, sde, Gaussian.scalar(0.5, 0.8), LinearReward([1.0]), 0.5)
    if name.startswith("gauss1d-quadratic"):
        return ToyPreset(name, sde, Gaussian.scalar(0.5, 0.8), QuadraticReward(2.0, [2.0]), 1.0)
    if name == "mixture2d-linear":
        return ToyPreset(name, sde, ring_mixture(8, 2.0, 0.2), LinearReward([1.0, 0.0]), 0.5)
    raise KeyError(name)


TOY_PRESETS = ("gauss1d-linear", "gauss1d-linear-short", "gauss1d-quadratic", "gauss1d-quadratic-short",
               "mixture2d-linear")
"""The five toy presets of chapters 5-10."""

DIMENSION_PRESETS = ("gauss8d-linear", "gauss8d-quadratic", "gauss32d-linear", "gauss32d-quadratic")
"""d independent copies of gauss1d-linear / gauss1d-quadratic (chapter 7); d = 1 is the 1-D preset itself."""


def toy_preset(name: str) -> ToyPreset:
    """The toy preset ``name`` (one of :data:`TOY_PRESETS` or :data:`DIMENSION_PRESETS`)."""
    if name not in TOY_PRESETS and name not in DIMENSION_PRESETS:
        raise KeyError(f"unknown toy preset {name!r}; choose one of {', '.join(TOY_PRESETS + DIMENSION_PRESETS)}")
    return _make(name)


def gaussian_preset_name(reward: str, d: int) -> str:
    """The Gaussian preset with ``reward`` ("linear" or "quadratic") in d dimensions: gauss1d-* for d = 1."""
    name = f"gauss{d}d-{reward}"
    if name not in TOY_PRESETS and name not in DIMENSION_PRESETS:
        raise KeyError(f"no Gaussian preset {name!r}: d must be one of 1, 8, 32 and reward linear or quadratic")
    return name


def coordinate_presets(preset: ToyPreset) -> list[ToyPreset]:
    """The 1-D problems of a preset whose problem separates by coordinate (chapter 7), one per coordinate.

    Separation needs one Gaussian with a diagonal covariance (the VP SDE, the N(0, I) prior and the Girsanov KL act
    on each coordinate alone) and a linear or quadratic reward, which is a sum of 1-D rewards. A 1-D preset is its
    own single coordinate. Raises ValueError otherwise.
    """
    data, reward = preset.data, preset.reward
    if data.K != 1 or not torch.equal(data.covs[0], torch.diag(torch.diagonal(data.covs[0]))):
        raise ValueError(f"{preset.name}: the problem separates by coordinate only for one Gaussian with a diagonal "
                         "covariance")
    if data.d == 1 and preset.event_shape == ():
        return [preset]
    out = []
    for i in range(data.d):
        c = Gaussian.scalar(float(data.means[0, i]), math.sqrt(float(data.covs[0, i, i])))
        if isinstance(reward, LinearReward):
            r = LinearReward([float(reward.w[i])])
        elif isinstance(reward, QuadraticReward):
            r = QuadraticReward(reward.lam, [float(reward.center[i])])
        else:
            raise ValueError(f"{preset.name}: the reward {reward!r} is not a sum of 1-D rewards")
        out.append(ToyPreset(f"{preset.name}[{i}]", preset.sde, c, r, preset.beta))
    return out
