"""The task interface: what the trainer needs from a preset family (toys, digits, Stable Diffusion).

A task turns a resolved :class:`~sacode.engine.config.TrainConfig` into an environment (a
:class:`~sacode.theory.control.ScoreControlProblem`) and a policy, and summarises an evaluation. Its configuration
defaults are one :class:`~sacode.engine.config.ConfigTable`. The hooks below have no-op defaults, so a task
overrides only what it needs; the trainer calls every hook unconditionally.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from .config import ConfigTable, Param, TrainConfig

if TYPE_CHECKING:                                   # imported for annotations only
    from ..theory.control import Rollout, ScoreControlProblem
    from .policy import ScorePolicy


class Task:
    """Base class of every task. Subclasses set :attr:`config_table` (and :attr:`options` for their own keys),
    build ``self.env`` and ``self.beta`` in ``__init__``, and implement :meth:`make_policy` and :meth:`summary`.

    Args:
        cfg: the resolved configuration of the run.
        params: the preset's fixed parameters (from the registry entry, e.g. the reward of a digits preset).
    """

    config_table: ClassVar[ConfigTable] = ConfigTable()
    options: ClassVar[Mapping[str, Param]] = {}
    artifacts: ClassVar[tuple[str, ...]] = ()
    """Files or folders (relative to the run directory) that :meth:`write_artifacts` and :meth:`on_iteration` write;
    a new run in the same directory removes them with the run's own files."""
    accelerate: dict | None = None
    """Keyword arguments of a Hugging Face ``Accelerator`` for tasks that train through accelerate (None: plain
    single-process training unless the run was started with ``accelerate launch``)."""

    def __init__(self, cfg: TrainConfig, params: Mapping[str, Any] | None = None):
        self.cfg = cfg
        self.params = dict(params or {})
        self.env: ScoreControlProblem
        self.beta: float

    # --- required -------------------------------------------------------------------------------------------
    def make_policy(self, cfg: TrainConfig) -> "ScorePolicy":
        """The trainable policy (a score network that starts as the pretrained score)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_policy")

    def summary(self, evaluation: "Rollout") -> dict:
        """Statistics of the final evaluation rollout for ``summary.json``."""
        raise NotImplementedError(f"{type(self).__name__} must implement summary")

    # --- optional hooks (no-ops) -------------------------------------------------------------------------------
    def iteration_metrics(self, batch: "Rollout") -> dict:
        """Extra metrics of one iteration's batch, logged to ``metrics.jsonl``."""
        return {}

    def on_iteration(self, trainer, batch: "Rollout") -> dict:
        """Called after every iteration with the trainer (image grids, evaluations at other step counts)."""
        return {}

    def write_artifacts(self, out: Path, evaluation: "Rollout") -> None:
        """Write task-specific files (sample grids, an exported LoRA) at the end of a run."""
        return None
