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
"""
from __future__ import annotations

from dataclasses import dataclass

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
    if name.startswith("gauss1d-linear"):
        return ToyPreset(name, sde, Gaussian.scalar(0.5, 0.8), LinearReward([1.0]), 0.5)
    if name.startswith("gauss1d-quadratic"):
        return ToyPreset(name, sde, Gaussian.scalar(0.5, 0.8), QuadraticReward(2.0, [2.0]), 1.0)
    if name == "mixture2d-linear":
        return ToyPreset(name, sde, ring_mixture(8, 2.0, 0.2), LinearReward([1.0, 0.0]), 0.5)
    raise KeyError(name)


TOY_PRESETS = ("gauss1d-linear", "gauss1d-linear-short", "gauss1d-quadratic", "gauss1d-quadratic-short",
               "mixture2d-linear")


def toy_preset(name: str) -> ToyPreset:
    """The toy preset ``name`` (one of :data:`TOY_PRESETS`)."""
    if name not in TOY_PRESETS:
        raise KeyError(f"unknown toy preset {name!r}; choose one of {', '.join(TOY_PRESETS)}")
    return _make(name)
