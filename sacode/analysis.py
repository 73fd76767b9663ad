"""Helpers for the chapters that train and compare fine-tuning runs (chapters 8-11).

* :func:`run_training` — one quiet :class:`~sacode.engine.trainer.Trainer` run in a temporary directory, with its
  per-iteration metrics loaded back (``metrics.jsonl``) and a seeded evaluation rollout
  (:class:`~sacode.engine.evaluation.Evaluation`).
* :func:`load_bench` — the result of ``python -m sacode bench NAME`` (``figures/bench-NAME.json``) if it exists.
* :func:`value_input_grad` — grad_x V(t, x) of a value network by autograd (chapter 9).
* :func:`discretization_bench_table` — the text table of ``figures/bench-discretization.json`` (chapter 10), lines of
  at most 88 columns, built from the JSON's structured fields.
* :func:`fit_to_column` — a stored text table made to fit the book's 88-column code column.
* :func:`digits_bench_table` — the text table of ``figures/bench-digits.json`` (chapter 11), lines of at most 88
  columns, built from the JSON's structured fields.
"""
from __future__ import annotations

import json
import math
import shutil
import re
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .engine.evaluation import Evaluation, evaluate_run
from .engine.rundir import read_metrics

__all__ = ["TrainedRun", "run_training", "load_metrics", "repo_root", "bench_path", "load_bench", "value_input_grad",
           "moving_average", "digits_bench_table", "fit_to_column",
           "discretization_bench_table"]


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


def _pm(m: float, sd: float, nd: int = 2) -> str:
    return f"{m:.{nd}f}±{sd:.{nd}f}" if math.isfinite(m) else "—"


def digits_bench_table(res: dict) -> str:
    """The text table of a ``python -m sacode bench digits --json`` result (chapter 11): the runs at the main beta
    (mean ± sd over the seeds, in two tables), samples to 90% of the improvement, the beta sweep and the time
    grids; every line at most 88 columns (the book's code column)."""
    p, a0 = res["pretrained"], res["algorithms"][0]
    lines = [f"digits-class3 (r = log p(3|x), beta = {a0['beta']:g}), {a0['samples_used']} trajectories per run,",
             f"{res['seeds']} seeds, profile {res['profile']}",
             f"pretrained: reward {p['reward']:.2f}, FD {p['sample_quality']:.1f}, "
             f"FD to 3s {p.get('fd_target_class', float('nan')):.0f}, "
             f"share of 3s {p.get('target_fraction', float('nan')):.2f}",
             f"bound J* = beta log E e^(r/beta) = {p['objective_opt_bound']:.2f}",
             f"{'algo':<14}{'reward':>13}{'path KL':>12}{'J':>13}{'share 3s':>12}{'wall s':>8}"]
    for r in res["algorithms"]:
        lines.append(f"{r['algo']:<14}{_pm(r['reward_final'], r['reward_final_sd']):>13}"
                     f"{_pm(r['kl_path'], r['kl_path_sd']):>12}{_pm(r['objective'], r['objective_sd']):>13}"
                     f"{_pm(r['target_fraction_final'], r['target_fraction_final_sd']):>12}{r['wall_s']:>8.0f}")
    lines.append(f"{'algo':<14}{'FD':>13}{'FD to 3s':>13}{'pair dist':>11}")
    for r in res["algorithms"]:
        lines.append(f"{r['algo']:<14}{_pm(r['sample_quality_final'], r['sample_quality_final_sd'], 0):>13}"
                     f"{_pm(r['fd_target_class_final'], r['fd_target_class_final_sd'], 0):>13}"
                     f"{r['pairwise_distance_final']:>11.2f}")
    s90 = res.get("samples_to_90") or {}
    if s90:
        lines.append(textwrap.fill(
            f"trajectories until the batch reward stays (for {s90['stay_iterations']} iterations) above "
            f"{s90['fraction']:.0%} of the improvement: median over seeds [per seed]; common reward target "
            f"{s90['common_reward_final']:.2f}", 88))
        fmt = lambda v: "—" if v is None else f"{v:.0f}"
        for a, d in s90["algos"].items():
            for i, (label, key) in enumerate((("own final reward", "reward_own"), ("own final J", "objective_own"),
                                               ("common target", "reward_common"))):
                lines.append(f"  {a if i == 0 else '':<6} {label:<17}{fmt(d[key + '_median']):>6} {d[key]}")
        if "ratio_ddpo_over_ctpo" in s90:
            lines.append(textwrap.fill("ddpo/ctpo: " + ", ".join(f"{k}: {'—' if v is None else f'{v:.2f}'}"
                                                                 for k, v in s90["ratio_ddpo_over_ctpo"].items()),
                                       88, initial_indent="  ", subsequent_indent="    "))
    lines.append("beta sweep (seed 0): algo beta -> reward, path KL, FD, FD to 3s")
    for r in res["beta_sweep"]:
        lines.append(f"  {r['algo']:<6} beta={r['beta']:<5g} reward {r['reward_final']:7.2f}  KL {r['kl_path']:6.2f}  "
                     f"FD {r['sample_quality_final']:6.0f}  FD-3s {r['fd_target_class_final']:6.0f}")
    lines.append(f"time grids (trained on K = {res.get('train_K')} ddim): J = E r - beta KL, mean over seeds")
    ks = res["eval_ks"]
    lines.append(f"  {'algo':<12}{'sampler':<8}" + "".join(f"{'K=' + str(k):>9}" for k in ks))
    for a in dict.fromkeys(g["algo"] for g in res["time_grids"]):
        for method in ("ddim", "em"):
            vals = [np.mean([g["J"] for g in res["time_grids"] if g["algo"] == a and g["method"] == method
                             and g["K"] == k]) for k in ks]
            lines.append(f"  {a:<12}{method:<8}" + "".join(f"{v:>9.2f}" for v in vals))
    return "\n".join(lines)


def discretization_bench_table(res: dict) -> str:
    """The text table of a ``python -m sacode bench discretization`` result (chapter 10): the regret on each
    evaluation grid (one block per grid kind and preset), the off-grid regrets and their ratios to fixed-grid
    training; every line at most 88 columns (the book's code column)."""
    short = {"uniform": "u", "power": "p"}
    fine = f"K >= {res['fine_K']}"
    pol_w = 2 + max(len(f"{r['algo']}, {r['variant']}") for r in res["rows"])
    pol_w = max([pol_w] + [2 + len("exact: " + lab) for ex in res["exact"].values() for lab in ex])
    lines = [textwrap.fill(
        "regret J*_grid - J_grid (median over seeds; u = uniform, p = power grid); off-grid = mean over all grids "
        "but u20, median [IQR] over seeds", 88)]

    def policies(p):
        for r in (r for r in res["rows"] if r["preset"] == p):
            yield f"{r['algo']}, {r['variant']}", r["regret"], r["off_grid"], r["off_grid_fine"]["median"]
        for lab, e in res["exact"].get(p, {}).items():
            yield "exact: " + lab, e["regret"], {"median": e["off_grid"]}, e["off_grid_fine"]

    presets = list(dict.fromkeys(r["preset"] for r in res["rows"]))
    for kind in res["grid_kinds"]:
        cols = [f"{kind}-K{K}" for K in res["eval_ks"]]
        for p in presets:
            lines.append(f"{p}, {kind} grids:")
            lines.append(f"  {'policy':<{pol_w - 2}}" + "".join(f"{short.get(kind, kind) + str(K):>7}"
                                                             for K in res["eval_ks"]))
            for lab, regret, _, _ in policies(p):
                lines.append(f"  {lab:<{pol_w - 2}}" + "".join(f"{regret[c]:>7.3f}" for c in cols))
    for p in presets:
        lines.append(f"{p}, off-grid regret:")
        lines.append(f"  {'policy':<{pol_w - 2}}{'all grids':>26}{fine:>10}")
        for lab, _, og, og_fine in policies(p):
            cell = f"{og['median']:.4f}" + (f" [{og['q25']:.4f}, {og['q75']:.4f}]" if "q25" in og else " " * 17)
            lines.append(f"  {lab:<{pol_w - 2}}{cell:>26}{og_fine:>10.4f}")
    for key, lab in (("ratio_over_fixed_off_grid", "all grids"), ("ratio_over_fixed_off_grid_fine", fine)):
        for p, by in res[key].items():
            lines.append(textwrap.fill(
                f"{p}: off-grid regret / fixed K=20's ({lab}): " + "; ".join(
                    f"{a}: " + ", ".join(f"{v} {x:.2f}" for v, x in d.items()) for a, d in by.items()),
                88, subsequent_indent="    "))
    return "\n".join(lines)


_GAP = re.compile(r"(?<=\S) {4,}(?=\S)")


def fit_to_column(text: str, width: int = 88) -> str:
    """``text`` with every line at most ``width`` columns where it can be done without losing a character: a block of
    aligned table rows (consecutive lines with inner runs of 3+ spaces) has every such run of 4+ spaces narrowed by
    the same number of spaces, which keeps its columns aligned; any other long line is wrapped, its continuation
    indented by 4 more spaces. For tables stored in benchmark results before their producers printed narrow ones."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        j = i
        while j < len(lines) and re.search(r"\S {3,}\S", lines[j]):
            j += 1
        block = lines[i:j] or [lines[i]]
        if any(len(ln) > width for ln in block) and j > i:
            gaps = [len(m.group()) for ln in block for m in _GAP.finditer(ln)]
            for k in range(1, (min(gaps) - 2 if gaps else 1) + 1):
                narrowed = [_GAP.sub(lambda m: m.group()[k:], ln) for ln in block]
                if all(len(ln) <= width for ln in narrowed):
                    block = narrowed
                    break
        for ln in block:
            indent = " " * (len(ln) - len(ln.lstrip()) + 4)
            out.append(ln if len(ln) <= width else textwrap.fill(ln, width, subsequent_indent=indent,
                                                                  break_on_hyphens=False))
        i = max(j, i + 1)
    return "\n".join(out)
