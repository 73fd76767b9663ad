"""The toy presets (1-D Gaussians, the 2-D ring mixture and d-dimensional Gaussians under VP SDEs) as environments of
the engine.

Their problems and closed forms live in :mod:`sacode.theory.presets` and :mod:`sacode.theory.optimal`; this package
adds the environment, the task and the DSM-trained pretrained scores, and registers the presets.
"""
from ... import registry
from ...theory.presets import DIMENSION_PRESETS, TOY_PRESETS, toy_preset
from .env import ToyEnv
from .task import ToyTask

for _name in TOY_PRESETS + DIMENSION_PRESETS:
    _p = toy_preset(_name)
    registry.register(registry.Preset(
        _name, "toys", ToyTask,
        f"{_p.data!r} under {_p.sde!r}, reward {_p.reward!r}, beta = {_p.beta:g} (closed-form optimum)"))

__all__ = ["ToyEnv", "ToyTask"]
