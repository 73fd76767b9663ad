"""The one place where diffusion time and RL time meet (see the notation page of the book).

* Diffusion time ``s`` in [0, T]: s = 0 is data, s = T is noise. SDEs, scores, schedules use it.
* RL time ``t`` in [0, T]: t = 0 is noise, t = T is the generated sample. The control problem uses it.

They are related by t = T - s. Every conversion in the package goes through these two functions.
"""
from __future__ import annotations

from torch import Tensor

Number = float | Tensor


def rl_time(s: Number, T: float) -> Number:
    """RL time t = T - s of diffusion time s."""
    return T - s


def diffusion_time(t: Number, T: float) -> Number:
    """Diffusion time s = T - t of RL time t."""
    return T - t
