"""``python -m sacode bench discretization``: which training grid, and which parameterisation, make a policy good on
every grid (chapter 10).

Trained variants (:data:`VARIANTS`), each with ctpo and ddpo, on the Gaussian presets where every grid's exact
optimum is known:

* the score network (a function of continuous time) trained on the fixed uniform K = 20 grid;
* the same network trained on a fresh random grid every iteration (K drawn uniformly in 10..50, uniformly random
  interior times: ``grid=random, random_K_max=50``);
* the same network trained on the fixed K = 5 grid;
* the per-step control policy (``policy=per-step``: a separate network per step of the K = 20 grid, no time input;
  another grid uses the step that contains t) trained on the fixed K = 20 grid.

Every policy is evaluated on uniform and power grids with K in :data:`EVAL_KS`. Its regret on a grid is
J*_grid - J_grid(policy), with J*_grid the exact optimum of that grid's problem (dynamic programming,
``sacode.theory.discrete_optimum``), estimated with common random numbers against that optimum's own policy (the
same noise), so the Monte-Carlo error of the difference is small. The off-grid regret averages every evaluation grid
except the uniform K = 20 one. The exact regrets of the ideal limits (the continuous optimal control a*, the
20-step and 5-step optima extended by their step or by linear interpolation) are computed exactly
(``policy_eval.discrete_objective``) for comparison: they are where fixed-grid training ends up when it converges.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..analysis import discretization_bench_table
from ..dynamics.grid import TimeGrid
from ..dynamics.transition import Transition
from ..engine.evaluation import EVAL_SEED, evaluate
from ..engine.policy import FixedScorePolicy
from ..envs.toys import ToyEnv
from ..theory import policy_eval
from ..theory.affine_policy import AffineScoreFamily
from ..theory.discrete_optimum import discrete_optimum
from ..theory.presets import toy_preset
from .pool import config_key, run_jobs
from ..runs import make_config
from .toys import trained_run, tuned_lr

EVAL_KS = (5, 10, 20, 50, 100, 200)
GRID_KINDS = ("uniform", "power")
VARIANTS = {
    "fixed K=20": {},
    "random K=10..50": {"grid": "random", "K": 10, "random_K_max": 50},
    "fixed K=5": {"K": 5},
    "per-step, fixed K=20": {"policy": "per-step"},
}
GRID_PRESETS = {"ci": ("gauss1d-linear",), "class": ("gauss1d-linear", "gauss1d-quadratic"),
                "full": ("gauss1d-linear", "gauss1d-linear-short", "gauss1d-quadratic", "gauss1d-quadratic-short")}
GRID_ALGOS = ("ctpo", "ddpo")
TRAIN_GRID = ("uniform", 20)


def eval_grid(kind: str, K: int, T: float = 1.0) -> TimeGrid:
    """The evaluation grid of ``kind`` (uniform, or power: steps shrinking towards the data) with K steps."""
    return TimeGrid.uniform(T, K) if kind == "uniform" else TimeGrid.power(T, K)


def _n_eval(profile: str) -> int:
    return {"ci": 256, "class": 4000, "full": 8000}[profile]


def grid_reference(preset: str, kind: str, K: int, n: int, cache: Path) -> dict:
    """The exact optimum of one grid: J* and its policy's per-trajectory objective under the evaluation seed."""
    path = cache / "grid-ref" / f"{preset}-{kind}-K{K}-n{n}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    pr = toy_preset(preset)
    grid = eval_grid(kind, K, pr.sde.T)
    d = discrete_optimum(pr, grid)
    ev = evaluate(ToyEnv(pr), FixedScorePolicy(d.score_fn(pr)), grid, Transition(pr.sde, "em", 1.0), n, pr.beta,
                  EVAL_SEED)
    ref = {"J_opt": float(d.J), "obj": ev.objective}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    return ref


def regrets(policy, preset: str, n: int, cache: Path) -> dict:
    """Regret J*_grid - J_grid(policy) on every evaluation grid, paired with the optimum's own trajectories;
    ``{"uniform-K5": (regret, standard error), ...}``."""
    pr = toy_preset(preset)
    env, tr = ToyEnv(pr), Transition(pr.sde, "em", 1.0)
    out = {}
    for kind in GRID_KINDS:
        for K in EVAL_KS:
            ref = grid_reference(preset, kind, K, n, cache)
            ev = evaluate(env, policy, eval_grid(kind, K, pr.sde.T), tr, n, pr.beta, EVAL_SEED)
            d = ref["obj"] - ev.objective
            out[f"{kind}-K{K}"] = (float(d.mean()), float(d.std()) / math.sqrt(n))
    return out


def off_grid(reg: dict, K_min: int = 0) -> float:
    """Mean regret over the evaluation grids other than the training grid of the fixed-grid runs (and, with
    ``K_min``, only over grids with at least K_min steps)."""
    skip = f"{TRAIN_GRID[0]}-K{TRAIN_GRID[1]}"
    return float(np.mean([v[0] if isinstance(v, (tuple, list)) else v for k, v in reg.items()
                          if k != skip and int(k.split("-K")[1]) >= K_min]))


FINE_K = 10
"""The second average leaves out the K = 5 grids, on which no policy that is good elsewhere is good (even the
continuous optimum a* has a large regret there)."""


def grid_job(preset: str, algo: str, variant: str, seed: int, lr: float, profile: str, cache: str,
             extra: str = "{}") -> dict:
    """Train (cached) one variant and measure its regrets on every evaluation grid (cached as JSON)."""
    cache_p = Path(cache)
    overrides = VARIANTS[variant] | {"lr": lr} | json.loads(extra)
    cfg = make_config(preset, algo, profile, seed, dict(overrides) | {"progress": False})
    path = cache_p / "grid-runs" / f"{preset}-{algo}-{variant.replace(' ', '_')}-seed{seed}-{profile}-" \
                                   f"{config_key(cfg.to_dict())}.json"
    if path.exists():
        return json.loads(path.read_text())
    tr, _ = trained_run(preset, algo, seed, profile, cache_p, overrides, eval_every=10**9)
    reg = regrets(tr.policy, preset, _n_eval(profile), cache_p)
    rec = {"preset": preset, "algo": algo, "variant": variant, "seed": seed, "lr": lr, "regret": reg,
           "off_grid": off_grid(reg), "train_wall_s": tr.wall}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec


def exact_limits(preset: str) -> dict:
    """Exact regrets of the ideal limits on every evaluation grid (module docstring)."""
    pr = toy_preset(preset)
    fam = AffineScoreFamily.from_preset(pr)
    d20, d5 = (discrete_optimum(pr, TimeGrid.uniform(pr.sde.T, k)) for k in (20, 5))
    policies = {"a* (continuous optimum)": policy_eval.optimal_family(fam, pr.reward, pr.beta),
                "20-step optimum, by step": fam.with_offsets(*d20.offsets("previous")),
                "20-step optimum, interpolated": fam.with_offsets(*d20.offsets("linear")),
                "5-step optimum, by step": fam.with_offsets(*d5.offsets("previous"))}
    out = {}
    for label, f in policies.items():
        reg = {}
        for kind in GRID_KINDS:
            for K in EVAL_KS:
                g = eval_grid(kind, K, pr.sde.T)
                J = policy_eval.discrete_objective(f, f.zeros(), pr.reward, pr.beta, g).objective
                reg[f"{kind}-K{K}"] = float(discrete_optimum(pr, g).J - J)
        out[label] = {"regret": reg, "off_grid": off_grid(reg), "off_grid_fine": off_grid(reg, FINE_K)}
    return out


def _median_iqr(v: list[float]) -> dict:
    q25, med, q75 = np.percentile(np.asarray(v, dtype=float), [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "n": len(v)}


def discretization(profile: str, seeds: int, presets, algos, cache: Path, out: Path, lrs=None, overrides=None,
                   workers: int = 1) -> dict:
    torch.set_num_threads(1)         # many small tensor operations: one thread is fastest, and shares the cores
    presets = list(presets or GRID_PRESETS[profile])
    algos = list(algos or GRID_ALGOS)
    extra = json.dumps(dict(overrides or {}), sort_keys=True)
    n = _n_eval(profile)
    lr = {a: tuned_lr(a, profile, cache, lrs)["lr"] for a in algos}
    for p in presets:                                   # the grids' references once, before the workers start
        for kind in GRID_KINDS:
            for K in EVAL_KS:
                grid_reference(p, kind, K, n, cache)
    jobs = [(p, a, v, s, lr[a], profile, str(cache), extra) for p in presets for a in algos for v in VARIANTS
            for s in range(seeds)]
    recs = run_jobs(grid_job, jobs, workers)
    rows = []
    for p in presets:
        for a in algos:
            for v in VARIANTS:
                rs = [r for r in recs if (r["preset"], r["algo"], r["variant"]) == (p, a, v)]
                keys = list(rs[0]["regret"])
                rows.append({"preset": p, "algo": a, "variant": v, "lr": lr[a], "seeds": len(rs),
                             "off_grid": _median_iqr([r["off_grid"] for r in rs]),
                             "off_grid_fine": _median_iqr([off_grid(r["regret"], FINE_K) for r in rs]),
                             "regret": {k: float(np.median([r["regret"][k][0] for r in rs])) for k in keys},
                             "regret_se": {k: float(np.max([r["regret"][k][1] for r in rs])) for k in keys}})
    exact = {p: exact_limits(p) for p in presets}
    ratio, ratio_fine = {}, {}
    for p in presets:
        for a in algos:
            get = lambda v, key: next(r for r in rows if (r["preset"], r["algo"], r["variant"]) == (p, a, v))[key]
            for out_, key in ((ratio, "off_grid"), (ratio_fine, "off_grid_fine")):
                fixed = get("fixed K=20", key)["median"]
                out_.setdefault(p, {})[a] = {v: get(v, key)["median"] / fixed for v in VARIANTS if v != "fixed K=20"}
    target = {p: {a: ratio[p][a]["random K=10..50"] <= 1 / 3 for a in algos} for p in presets}
    res = {"profile": profile, "presets": presets, "algos": algos, "seeds": seeds, "n_eval": n,
           "eval_ks": list(EVAL_KS), "grid_kinds": list(GRID_KINDS), "variants": VARIANTS, "lrs": lr,
           "rows": rows, "exact": exact, "ratio_over_fixed_off_grid": ratio,
           "ratio_over_fixed_off_grid_fine": ratio_fine, "fine_K": FINE_K,
           "target": {"rule": "random-grid training's off-grid regret <= 1/3 of fixed-grid training's", "met": target},
           "per_run": recs}
    res["table"] = discretization_bench_table(res)
    _plot(res, out / "bench-discretization.png")
    return res


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import COLUMN_INCHES, color, setup
    setup()
    presets = res["presets"][:2]
    fig, axes = plt.subplots(len(presets) + 1, 1, figsize=(COLUMN_INCHES, 4.0 * (len(presets) + 1)), squeeze=False,
                             layout="constrained")
    axes = axes[:, 0]
    styles = dict(zip(res["variants"], [("-", "o"), ("--", "s"), (":", "^"), ("-.", "v")]))
    for ax, p in zip(axes, presets):
        for r in (r for r in res["rows"] if r["preset"] == p):
            ls, mk = styles[r["variant"]]
            ax.plot(res["eval_ks"], [max(r["regret"][f"uniform-K{K}"], 1e-4) for K in res["eval_ks"]], ls=ls,
                    marker=mk, ms=3, color=color(r["algo"]), label=f"{r['algo']}, {r['variant']}")
        a_star = res["exact"][p]["a* (continuous optimum)"]["regret"]
        ax.plot(res["eval_ks"], [max(a_star[f"uniform-K{K}"], 1e-4) for K in res["eval_ks"]], color=color("exact"),
                lw=1, label="a* (exact)")
        ax.axvline(20, color="0.8", lw=3, zorder=0)
        ax.set(xscale="log", yscale="log", xlabel="evaluation steps K (uniform grid)",
               ylabel="regret J*_K − J_K", title=p)
    axes[0].legend(fontsize=9, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax = axes[-1]
    labels = list(res["variants"])
    x = np.arange(len(labels))
    for j, a in enumerate(res["algos"]):
        for i, p in enumerate(presets):
            og = [next(r for r in res["rows"] if (r["preset"], r["algo"], r["variant"]) == (p, a, v))["off_grid"]
                  for v in labels]
            med = np.array([o["median"] for o in og])
            err = np.array([[o["median"] - o["q25"] for o in og], [o["q75"] - o["median"] for o in og]])
            off = (j * len(presets) + i) * 0.2 - 0.3
            ax.bar(x + off, med, 0.18, yerr=err, color=color(a), alpha=1.0 if i == 0 else 0.5,
                   label=f"{a}, {p}")
    ax.set_xticks(x, [v.replace(", ", ",\n") for v in labels], fontsize=9)
    ax.set(yscale="log", ylabel="mean off-grid regret (median, IQR)", title="off-grid regret by training variant")
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Training grid and parameterisation:\nregret on other grids against each grid's exact optimum")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
