"""sacode: Scores as Actions, derived and verified.

The package is layered; each layer imports only the ones above it in this list (the book's appendix "How sacode
is built" draws the import graph):

* :mod:`sacode.dynamics` — SDEs, time, time grids, the one Gaussian-step primitive, samplers (chapters 1-2);
* :mod:`sacode.theory`   — closed-form laws, the control problem and its rollout, KL, optimal control, exact policy
  evaluation, the K-step optimum (chapters 2-10);
* :mod:`sacode.engine`   — policies, value learning, algorithms, the trainer and its configuration (chapters 8-12);
* :mod:`sacode.envs`     — the environments (toys, digits, Stable Diffusion); they register their presets in
  :mod:`sacode.registry`;
* :mod:`sacode.bench`, :mod:`sacode.verify`, :mod:`sacode.cli` — benchmarks, closed-form checks, command line.
"""
from .dynamics.grid import TimeGrid
from .dynamics.samplers import Trajectory, propagate_gaussian, reverse_sde_sample
from .dynamics.sde import OUSDE, VESDE, VPSDE, LinearSDE, ReverseSDE
from .dynamics.time import diffusion_time, rl_time
from .profiles import profile
from .theory.data import Gaussian, GaussianMixture, ring_mixture

__all__ = ["Gaussian", "GaussianMixture", "ring_mixture", "TimeGrid", "Trajectory", "reverse_sde_sample",
           "propagate_gaussian", "VPSDE", "VESDE", "OUSDE", "LinearSDE", "ReverseSDE", "rl_time",
           "diffusion_time", "profile"]
__version__ = "0.2.0"
