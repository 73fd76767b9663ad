"""Shared pieces of the toy benchmarks (chapters 8-10) and the ``deterministic`` benchmark.

* :func:`trained_run` trains (or loads from the cache) one run at the profile's default settings;
  :func:`tuned_lr` chooses its learning rate fairly (the same grid for every algorithm, on a separate seed).
* ``deterministic``: fine-tuning through the probability-flow ODE with explicit Gaussian exploration, against the
  closed-form optimum of that exploratory problem.

``toy-convergence`` and ``toy-recipe`` live in :mod:`sacode.bench.convergence`, ``discretization`` in
:mod:`sacode.bench.grids`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..dynamics.grid import TimeGrid
from ..dynamics.transition import Transition
from ..engine.evaluation import EVAL_SEED, evaluate
from ..engine.trainer import Trainer, evaluation_grid
from ..runs import make_config, make_trainer
from ..theory import optimal
from ..theory.presets import toy_preset
from .pool import config_key

ALGOS = ["ctpo", "ctpo-pathwise", "dpok", "ddpo", "backprop"]
LRS = [3e-4, 1e-3, 3e-3, 1e-2]
TUNE_PRESETS = ["gauss1d-linear", "mixture2d-linear"]
TUNE_SEED = 100                      # tuning runs use their own seed, never one of the reported seeds


def tuned_lr(algo: str, profile: str, cache: Path, lrs: list[float] | None = None) -> dict:
    """Fair tuning: the same learning-rate grid and budget for every algorithm, chosen on a separate seed.

    Score = mean over TUNE_PRESETS of the normalised final objective (J - J_pre) / (J* - J_pre) (1 = optimal).
    """
    lrs = lrs or LRS
    path = cache / f"tuned-{algo}-{profile}-{'_'.join(f'{v:g}' for v in lrs)}.json"
    if path.exists():
        return json.loads(path.read_text())
    scores = {}
    for lr in lrs:
        vals = []
        for name in TUNE_PRESETS:
            pr = toy_preset(name)
            obj = optimal.optimal_objective(pr)
            _, curve = trained_run(name, algo, TUNE_SEED, profile, cache, {"lr": lr}, eval_every=10**9)
            vals.append((curve[-1]["J"] - obj.expected_reward_pretrained) / (obj.J - obj.expected_reward_pretrained))
        scores[lr] = float(np.mean(vals))
    best = max(scores, key=scores.get)
    res = {"algo": algo, "lr": best, "scores": {str(k): v for k, v in scores.items()}, "presets": TUNE_PRESETS}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def _n_eval(profile: str) -> int:
    return {"ci": 512, "class": 4000, "full": 20000}[profile]


def _record(env, policy, grid: TimeGrid, transition: Transition, n: int, target_mean: torch.Tensor,
            beta: float, seed: int = EVAL_SEED) -> dict:
    """Terminal-mean error, J = E r - beta KL (with its standard error), reward and path KL of a policy."""
    return evaluate(env, policy, grid, transition, n, beta, seed).record(target_mean)


def _key(preset: str, algo: str, seed: int, profile: str, cfg) -> str:
    """Cache key of a run: its name and a hash of its resolved configuration (a changed default is a new run)."""
    h = config_key(cfg.to_dict())
    return f"{preset}-{algo}-seed{seed}-{profile}-{h}"


def trained_run(preset: str, algo: str, seed: int, profile: str, cache: Path, overrides: dict | None = None,
                eval_every: int = 1) -> tuple[Trainer, list[dict]]:
    """Train (or load from the cache) one run, evaluating the terminal law every ``eval_every`` iterations."""
    overrides = dict(overrides or {}) | {"progress": False}
    cfg = make_config(preset, algo, profile, seed, overrides)
    out = cache / _key(preset, algo, seed, profile, cfg)
    tr = make_trainer(cfg, out)
    curve_path = out / "curve.json"
    if curve_path.exists() and (out / "summary.json").exists():
        tr.load()
        return tr, json.loads(curve_path.read_text())
    pr = tr.task.preset
    target = optimal.optimal_terminal_law(pr).mean
    n_eval = min(_n_eval(profile), 4000)
    grid = evaluation_grid(cfg, tr.env)
    curve = []

    def point(t: Trainer):
        ev = _record(t.env, t.policy, grid, t.transition, n_eval, target, t.algo.beta)
        curve.append({"iteration": t.iteration, "samples_used": t.samples_used, "wall_s": t.wall} | ev)

    point(tr)
    tr.run(callback=lambda t: point(t) if t.iteration % eval_every == 0 or t.iteration == cfg.iterations else None)
    curve_path.write_text(json.dumps(curve))
    return tr, curve


def deterministic(profile: str, seeds: int, presets, algos, cache: Path, out: Path, lrs=None) -> dict:
    """Fine-tune through the PF-ODE (Heun) with exploration sigma_e, against the exploratory problem's optimum."""
    from ..theory.exploratory_optimum import exploratory_optimum

    torch.set_num_threads(1)         # many small tensor operations: one thread is fastest, and shares the cores
    presets = presets or ["gauss1d-linear", "gauss1d-linear-short"]
    algos = algos or ["ctpo", "ddpo"]
    explore = 0.5
    rows = []
    for name in presets:
        pr = toy_preset(name)
        target = exploratory_optimum(pr, explore)
        for algo in algos:
            for method in ("pf-euler", "pf-heun"):
                finals = []
                for seed in range(seeds):
                    tr, _ = trained_run(name, algo, seed, profile, cache,
                                        {"method": method, "eta": 0.0, "explore": explore,
                                         "lr": tuned_lr(algo, profile, cache, lrs)["lr"]})
                    ev = _record(tr.env, tr.policy, TimeGrid.uniform(pr.sde.T, tr.cfg.K), tr.transition,
                                 _n_eval(profile), torch.tensor(target["mean"]), pr.beta)
                    finals.append(ev)
                rows.append({"preset": name, "algo": algo, "method": method, "explore": explore,
                             "err_mean": float(np.mean([f["err_mean"] for f in finals])),
                             "J": float(np.mean([f["J"] for f in finals])), "J_opt": target["J"],
                             "target_mean": target["mean"]})
    lines = [f"{'preset':<24}{'algo':<8}{'method':<10}{'|Δmean|':>9}{'J':>9}{'J*':>9}"]
    for r in rows:
        lines.append(f"{r['preset']:<24}{r['algo']:<8}{r['method']:<10}{r['err_mean']:>9.3f}{r['J']:>9.3f}"
                     f"{r['J_opt']:>9.3f}")
    return {"profile": profile, "rows": rows, "table": "\n".join(lines)}
