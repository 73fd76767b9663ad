"""Helpers for the chapters that train and compare fine-tuning runs (chapters 8-11).

* :func:`run_training` — one quiet :class:`~sacode.engine.trainer.Trainer` run in a temporary directory, with its
  per-iteration metrics loaded back (``metrics.jsonl``) and a seeded evaluation rollout
  (:class:`~sacode.engine.evaluation.Evaluation`).
* :func:`load_bench` — the result of ``python -m sacode bench NAME`` (``figures/bench-NAME.json``) if it exists.
* :func:`value_input_grad` — grad_x V(t, x) of a value network by autograd (chapter 9).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .engine.evaluation import Evaluation, evaluate_run
from .engine.rundir import read_metrics

__all__ = ["TrainedRun", "run_training", "load_metrics", "repo_root", "bench_path", "load_bench", "value_input_grad",
           "moving_average"]


def repo_root() -> Path:
    """The repository root (the folder holding ``sacode/`` and ``figures/``; the package is installed editable)."""
    return Path(__file__).resolve().parent.parent


def bench_path(name: str) -> Path:
    """Where ``python -m sacode bench NAME`` writes its JSON: ``figures/bench-NAME.json`` in the repository."""
    return repo_root() / "figures" / f"bench-{name}.json"


def load_bench(name: str) -> dict | None:
    """The stored benchmark result (with its ``command`` and ``table``), or None when it has not been produced."""
    p = bench_path(name)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def load_metrics(run_dir: str | Path) -> dict[str, np.ndarray]:
    """``metrics.jsonl`` as columns: key -> array over iterations (scalar keys; vectors as 2-D arrays)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {path}; is this a run directory written by the trainer?")
    rows = read_metrics(path)                     # a truncated last line (a crash mid-write) is dropped with a warning
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    return {k: np.asarray([r[k] for r in rows], dtype=np.float64) for k in keys}


@dataclass
class TrainedRun:
    """A finished training run: the trainer (policy, value network, config), its metrics and an evaluation."""

    trainer: object
    metrics: dict[str, np.ndarray]
    evaluation: Evaluation
    wall_s: float

    @property
    def policy(self):
        return self.trainer.policy

    @property
    def value(self):
        return self.trainer.algo.value

    @property
    def cfg(self):
        return self.trainer.cfg


def run_training(preset: str, algo: str, seed: int = 0, profile: str = "class", n_eval: int = 4000,
                 out: str | Path | None = None, **overrides) -> TrainedRun:
    """Train ``algo`` on ``preset`` with :func:`sacode.runs.make_config` (``overrides`` are config keys,
    e.g. ``iterations=30, batch=128, beta=0.1``), quietly, in ``out``. Without ``out`` the run lives in a temporary
    directory that is removed once its metrics are loaded (the trained networks stay in memory)."""
    from .runs import make_config, make_trainer

    cfg = make_config(preset, algo, profile, seed, {"progress": False, **overrides})
    keep = out is not None
    out = Path(out) if keep else Path(tempfile.mkdtemp(prefix=f"sacode-{preset}-{algo}-"))
    tr = make_trainer(cfg, out)
    tr.run()
    metrics = load_metrics(out)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return TrainedRun(tr, metrics, evaluate_run(tr, n_eval), float(tr.wall))


def value_input_grad(value: torch.nn.Module, t: float | Tensor, x: Tensor, cond=None) -> Tensor:
    """grad_x V(t, x) by autograd (the quantity the q-function needs, chapter 6), shape like x."""
    x = x.detach().clone().requires_grad_(True)
    t = torch.as_tensor(t, dtype=x.dtype)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    (g,) = torch.autograd.grad(value(t, x, cond).sum(), x)
    return g.detach()


def moving_average(v, window: int) -> np.ndarray:
    """Trailing moving average (the first window - 1 entries average what is available)."""
    v = np.asarray(v, dtype=np.float64)
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)
