"""How a run stops when it cannot go on: its errors, the check for non-finite values, and stop signals.

* :class:`RunError` — a run cannot start or continue as asked (a directory that already holds a run, a resume
  that does not match the stored run, an unreadable checkpoint); the message says why and what to do.
* :class:`Diverged` — a loss, a gradient, a parameter or a rollout became NaN or infinite. Every optimiser step of
  every algorithm is checked (:class:`FiniteWatch`) *before* the parameters are updated, so the run stops at the
  first non-finite value and its last checkpoint holds finite parameters.
* :class:`Interrupted` — Ctrl-C or SIGTERM arrived (:class:`StopSignals`); the trainer stops at the next iteration
  boundary after writing a checkpoint.
"""
from __future__ import annotations

import math
import signal
import threading
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["RunError", "Diverged", "Interrupted", "FiniteWatch", "StopSignals"]


class RunError(RuntimeError):
    """A run cannot start or continue as asked; the message says why and what to do."""


class Diverged(RunError):
    """A non-finite value in training.

    Args:
        quantity: what became non-finite, e.g. ``"policy gradient norm"``.
        value: the offending value (NaN or +-inf), when it is one number.
        knob: the configuration key whose smaller value is the usual remedy (``lr``, ``value_lr``).
    """

    def __init__(self, quantity: str, value: float | None = None, knob: str = "lr"):
        self.quantity, self.value, self.knob = quantity, value, knob
        self.iteration: int | None = None
        super().__init__(self.describe())

    def describe(self) -> str:
        what = f"{self.quantity} is {self.value}" if self.value is not None else f"{self.quantity} became non-finite"
        at = f"at iteration {self.iteration}: " if self.iteration is not None else ""
        return f"training diverged {at}{what}"


class Interrupted(RunError):
    """Training was stopped by a signal (Ctrl-C, SIGTERM) after writing a checkpoint."""

    def __init__(self, signame: str, iteration: int, checkpoint: str):
        self.signame, self.iteration, self.checkpoint = signame, iteration, checkpoint
        super().__init__(f"interrupted by {signame} after iteration {iteration}; checkpoint written to {checkpoint}")


class FiniteWatch:
    """Checks one optimiser's steps: the losses that were backpropagated, the gradient norm before the step and
    the parameters after it. Raises :class:`Diverged` at the first non-finite value.

    The losses are collected as tensors and checked together at the step (one device synchronisation per step).
    """

    def __init__(self, name: str, knob: str = "lr"):
        self.name, self.knob = name, knob
        self._losses: list[Tensor] = []

    def loss(self, loss: Tensor) -> None:
        """Remember a loss that is about to be backpropagated."""
        self._losses.append(loss.detach().reshape(-1)[:1])

    def gradients(self, grad_norm: Tensor | float | None) -> None:
        """Before the optimiser step: the losses since the last step and the total gradient norm are finite."""
        losses, self._losses = self._losses, []
        if losses:
            ls = torch.cat([v.float().cpu() for v in losses])
            bad = ~torch.isfinite(ls)
            if bool(bad.any()):
                raise Diverged(f"{self.name} loss", float(ls[bad][0]), self.knob)
        gn = float(grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(gn):
            raise Diverged(f"{self.name} gradient norm", gn, self.knob)

    def parameters(self, params: Iterable[Tensor]) -> None:
        """After the optimiser step: every parameter is finite."""
        params = [p.detach() for p in params]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise Diverged(f"{self.name} parameters", None, self.knob)


class StopSignals:
    """Within ``with StopSignals():`` SIGINT and SIGTERM set :attr:`received` instead of stopping the process; the
    trainer checks it at each iteration boundary. A second Ctrl-C stops at once (KeyboardInterrupt). Outside the
    main thread (where handlers cannot be installed) it does nothing."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and name == "SIGINT":
            raise KeyboardInterrupt
        self.received = name

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
