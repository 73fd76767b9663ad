"""Runs by preset name: resolve a configuration, build the task and its trainer (what the command line, the
benchmarks and the chapters use). The engine itself never looks a preset up: it is handed its task.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from . import registry
from .engine.config import ResolvedConfig, TrainConfig, resolve_config
from .engine.task import Task
from .engine.trainer import Trainer


def resolve(preset: str, algo: str = "ctpo", profile: str = "class", seed: int = 0,
            overrides: Mapping[str, Any] | None = None) -> ResolvedConfig:
    """The validated configuration of a run with the source of every value (``--show-config``)."""
    p = registry.get(preset)
    return resolve_config(preset, algo, profile, seed, p.task.config_table, p.task.options, overrides, p.config)


def make_config(preset: str, algo: str = "ctpo", profile: str = "class", seed: int = 0,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The validated configuration of a run (see :mod:`sacode.engine.config` for the order of defaults)."""
    return resolve(preset, algo, profile, seed, overrides).cfg


def make_task(cfg: TrainConfig) -> Task:
    """The task of ``cfg.preset`` built for ``cfg``."""
    p = registry.get(cfg.preset)
    return p.task(cfg, p.params)


def make_trainer(cfg: TrainConfig, out: str | Path) -> Trainer:
    """A trainer for ``cfg`` writing into ``out``. The global torch RNG is seeded with ``cfg.seed`` first: it
    initialises the networks, so a run is reproducible from its configuration."""
    torch.manual_seed(cfg.seed)
    return Trainer(make_task(cfg), out)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, stop_on_signals: bool = False) -> dict:
    """Train (or resume) one run and return its summary. A new run replaces any run in ``out`` (the command line
    asks for ``--overwrite`` first); ``stop_on_signals``: Ctrl-C/SIGTERM checkpoint and stop at the next iteration
    (:class:`~sacode.engine.divergence.Interrupted`)."""
    tr = make_trainer(cfg, out)
    if resume:
        tr.load()
    return tr.run(stop_on_signals=stop_on_signals)
