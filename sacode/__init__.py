"""sacode: Scores as Actions, derived and verified.

The SDE layer (diffusion time s; s = 0 is data):
    :mod:`sacode.sde`        VPSDE, VESDE, OUSDE, their marginals and reverse-time dynamics
    :mod:`sacode.data`       Gaussian and GaussianMixture data with exact noised scores and posteriors
    :mod:`sacode.samplers`   TimeGrid and reverse_sde_sample (Euler-Maruyama, DDIM(eta), PF-ODE Euler/Heun)
    :mod:`sacode.dsm`        denoising score matching and its closed-form minimum
    :mod:`sacode.exact_laws` exact terminal laws of the reverse dynamics from the sampler's prior
"""
from .data import Gaussian, GaussianMixture, ring_mixture
from .profiles import profile
from .samplers import TimeGrid, Trajectory, propagate_gaussian, reverse_sde_sample
from .sde import OUSDE, VESDE, VPSDE, LinearSDE, ReverseSDE
from .time import diffusion_time, rl_time

__all__ = ["Gaussian", "GaussianMixture", "ring_mixture", "TimeGrid", "Trajectory", "reverse_sde_sample",
           "propagate_gaussian", "VPSDE", "VESDE", "OUSDE", "LinearSDE", "ReverseSDE", "rl_time",
           "diffusion_time", "profile"]
__version__ = "0.1.0"
