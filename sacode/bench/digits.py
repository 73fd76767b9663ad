"""``python -m sacode bench digits``: fine-tuning the pretrained 8x8-digits UNet (chapter 11).

Three measurements on ``digits-class3`` (reward log p(3 | x), beta = 1), all at the run size of the profile:

* **algorithms**: ctpo and the baselines at an equal sample budget (iterations x batch trajectories), over
  several seeds: reward reached, path KL spent, objective J = E r - beta KL against the bound
  J* = beta log E_pre e^{r/beta}, sample quality (FD to held-out digits and to the digits 3) and diversity,
  along training and at the end.
* **beta sweep**: ctpo and ddpo with beta from 0 (pure reward maximisation: reward hacking) to 3, the
  reward-KL trade-off (a Pareto plot) with sample grids.
* **time grids**: policies trained on K = 10 DDIM steps evaluated with K in DIGITS_EVAL_KS steps (and with the
  Euler-Maruyama sampler): does the fine-tuned score transfer to other discretisations?
* **samples to 90%** (chapter 8): the trajectories each run needs until its batch reward (and its batch objective
  J) reaches 90% of the run's own final improvement over the pretrained model and stays there for
  STAY_ITERATIONS iterations; and, to compare ctpo with ddpo on one scale, until it reaches 90% of the smaller of
  the two algorithms' median final reward improvements.

Runs are cached in ``runs/bench-cache`` (so re-running with more seeds only trains what is missing).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..analysis import digits_bench_table
from ..dynamics.transition import Transition
from ..engine.trainer import Trainer, evaluation_grid
from ..envs.digits.data import decode_images, encode_images  # noqa: F401  (decode_images: for readers of the JSON)
from ..runs import make_config, make_trainer
from ..theory.control import rollout
from ..theory.estimate import mean_se
from .pool import config_key
from .toys import ALGOS

PRESET = "digits-class3"
SWEEP_ALGOS = ["ctpo", "ddpo"]
BETAS = [0.0, 0.1, 0.3, 1.0, 3.0]
DIGITS_EVAL_KS = [5, 10, 20, 40]
DIGITS_EVAL_SEED = 54321
N_IMAGES = 32                       # sample images stored per run for the chapter's grids
DIGITS_CURVE_KEYS = ("iteration", "samples_used", "wall_s", "reward", "kl_path", "objective", "fd_batch",
              "pairwise_distance", "class_entropy", "target_fraction", "fd_target_class")


def _key(preset: str, algo: str, seed: int, profile: str, cfg) -> str:
    return f"{preset}-{algo}-seed{seed}-{profile}-{config_key(cfg.to_dict())}"


def trained(preset: str, algo: str, seed: int, profile: str, cache: Path, overrides: dict | None = None) -> dict:
    """Train one run (or read it from the cache): its summary, its per-iteration curve and its directory."""
    overrides = dict(overrides or {}) | {"progress": False}
    cfg = make_config(preset, algo, profile, seed, overrides)
    out = Path(cache) / _key(preset, algo, seed, profile, cfg)
    if not ((out / "summary.json").exists() and (out / "checkpoint.pt").exists()):
        tr = make_trainer(cfg, out)
        if (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()         # an interrupted run starts over
        tr.run()
        torch.save(tr.evaluate(n=N_IMAGES, seed=DIGITS_EVAL_SEED).xs[-1], out / "images.pt")
    summary = json.loads((out / "summary.json").read_text())
    curve = [{k: r[k] for k in DIGITS_CURVE_KEYS if k in r}
             for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    return {"summary": summary, "curve": curve, "dir": str(out), "overrides": overrides, "profile": profile}


def load_trainer(run: dict) -> Trainer:
    s = run["summary"]
    cfg = make_config(s["preset"], s["algo"], run["profile"], s["seed"], run["overrides"])
    tr = make_trainer(cfg, run["dir"])
    tr.load()
    return tr


def _images(run: dict) -> list:
    return encode_images(torch.load(Path(run["dir"]) / "images.pt", weights_only=True))


@torch.no_grad()
def evaluate_on_grid(tr: Trainer, K: int, method: str, n: int, seed: int = DIGITS_EVAL_SEED) -> dict:
    """Reward, path KL, J and sample quality of a trained policy on a K-step uniform grid of ``method``."""
    cfg = tr.cfg.replace(K=K, method=method, s_end=None)
    b = rollout(tr.env, tr.policy, evaluation_grid(cfg, tr.env), Transition(tr.env.sde, method, cfg.eta), n,
                torch.Generator().manual_seed(seed))
    m = tr.task.image_metrics(b.xs[-1])
    J = mean_se(b.rewards.double() - tr.algo.beta * b.kl_path.double())
    return {"K": K, "method": method, "reward": float(b.rewards.mean()), "kl_path": float(b.kl_path.mean()),
            "J": J.mean, "J_se": J.se, "sample_quality": m["sample_quality"],
            "fd_target_class": m.get("fd_target_class"), "target_fraction": m.get("target_fraction")}


@torch.no_grad()
def pretrained_on_grid(tr: Trainer, K: int, method: str, n: int, seed: int = DIGITS_EVAL_SEED) -> dict:
    cfg = tr.cfg.replace(K=K, method=method, s_end=None)
    b = tr.task.pretrained_rollout(n, evaluation_grid(cfg, tr.env), Transition(tr.env.sde, method, cfg.eta), seed)
    m = tr.task.image_metrics(b.xs[-1])
    r = b.rewards.double()
    beta = tr.algo.beta
    return {"K": K, "method": method, "reward": float(r.mean()), "kl_path": 0.0, "J": float(r.mean()),
            "J_opt_bound": float(beta * (torch.logsumexp(r / beta, 0) - math.log(n))),
            "sample_quality": m["sample_quality"], "fd_target_class": m.get("fd_target_class"),
            "target_fraction": m.get("target_fraction")}


def _agg(vals: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in vals if v is not None], dtype=float)
    return (float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0) if a.size else (float("nan"), 0.0)


FRACTION = 0.9
STAY_ITERATIONS = 3


def samples_to_fraction(curve: list[dict], key: str, start: float, final: float, frac: float = FRACTION,
                        stay: int = STAY_ITERATIONS) -> int | None:
    """Samples used at the first iteration from which ``curve[key]`` stays >= start + frac (final - start) for
    ``stay`` iterations (None: never)."""
    target = start + frac * (final - start)
    run = 0
    for i, p in enumerate(curve):
        run = run + 1 if p[key] >= target else 0
        if run == stay:
            return curve[i - stay + 1]["samples_used"]
    return None


def samples_to_90(rows: list[dict], algos=("ctpo", "ddpo")) -> dict:
    """Per algorithm and seed: samples to 90% of the run's own final reward and objective improvements, and to 90%
    of a common reward target (the smaller of the algorithms' median final improvements); medians over seeds."""
    by = {r["algo"]: r for r in rows if r["algo"] in algos}
    if not by:
        return {}
    pre = next(iter(by.values()))["reward_pretrained"]
    final_median = {a: float(np.median([c[-1]["reward"] for c in r["curves"]])) for a, r in by.items()}
    common = min(r["reward_final"] for r in by.values())
    out = {"fraction": FRACTION, "stay_iterations": STAY_ITERATIONS, "reward_pretrained": pre,
           "common_reward_final": common, "final_batch_reward_median": final_median, "algos": {}}
    for a, r in by.items():
        finals_r = r["reward_final_per_seed"]
        finals_J = r["objective_per_seed"]
        own_r = [samples_to_fraction(c, "reward", pre, f) for c, f in zip(r["curves"], finals_r)]
        own_J = [samples_to_fraction(c, "objective", pre, f) for c, f in zip(r["curves"], finals_J)]
        com = [samples_to_fraction(c, "reward", pre, common) for c in r["curves"]]
        med = lambda v: (float(np.median([np.inf if x is None else x for x in v]))
                         if sum(x is not None for x in v) * 2 > len(v) else None)
        out["algos"][a] = {"reward_own": own_r, "objective_own": own_J, "reward_common": com,
                           "reward_own_median": med(own_r), "objective_own_median": med(own_J),
                           "reward_common_median": med(com), "samples_per_run": r["samples_used"]}
    if {"ctpo", "ddpo"} <= set(out["algos"]):
        c, d = out["algos"]["ctpo"], out["algos"]["ddpo"]
        out["ratio_ddpo_over_ctpo"] = {k: (d[k] / c[k] if c[k] and d[k] else None)
                                       for k in ("reward_own_median", "objective_own_median", "reward_common_median")}
    return out


def _n_eval(profile: str) -> int:
    return {"ci": 64, "class": 256, "full": 1000}[profile]


def digits_benchmark(profile: str, seeds: int, presets, algos, cache: Path, out: Path) -> dict:
    from ..envs.digits.quality import frechet_distance  # noqa: F401  (fail early if scipy is missing)

    torch.set_num_threads(1)         # small convolutions on a shared 2-core machine: one thread is fastest

    preset = (presets or [PRESET])[0]
    algos = algos or ALGOS
    sweep_algos = [a for a in SWEEP_ALGOS if a in algos]
    betas = BETAS if profile != "ci" else [0.0, 1.0]
    eval_ks = DIGITS_EVAL_KS if profile != "ci" else [5, 10]
    n_eval = _n_eval(profile)
    res: dict = {"profile": profile, "preset": preset, "seeds": seeds, "algos": algos, "betas": betas,
                 "eval_ks": eval_ks, "n_eval_grids": n_eval}

    # 1. algorithms at an equal sample budget ------------------------------------------------------------
    runs = {a: [trained(preset, a, s, profile, cache) for s in range(seeds)] for a in algos}
    first = runs[algos[0]][0]["summary"]
    res["pretrained"] = {k[: -len("_pretrained")]: first[k] for k in first if k.endswith("_pretrained")}
    res["pretrained"]["objective_opt_bound"] = first["objective_opt_bound"]
    res["pretrained_images"] = None
    rows = []
    for a in algos:
        ss = [r["summary"] for r in runs[a]]
        row = {"algo": a, "seeds": len(ss), "samples_used": ss[0]["samples_used"], "beta": ss[0]["beta"]}
        for k in ("reward_final", "kl_path", "objective", "sample_quality_final", "fd_target_class_final",
                  "target_fraction_final", "pairwise_distance_final", "class_entropy_final", "wall_s",
                  "objective_opt_bound", "reward_pretrained"):
            row[k], row[k + "_sd"] = _agg([s.get(k) for s in ss])
        row["curves"] = [r["curve"] for r in runs[a]]
        row["reward_final_per_seed"] = [s["reward_final"] for s in ss]
        row["objective_per_seed"] = [s["objective"] for s in ss]
        row["images"] = _images(runs[a][0])
        rows.append(row)
    res["algorithms"] = rows
    res["samples_to_90"] = samples_to_90(rows)

    # 2. beta sweep (reward-KL trade-off, reward hacking at beta = 0) ------------------------------------
    sweep = []
    for a in sweep_algos:
        for beta in betas:
            r = runs[a][0] if beta == runs[a][0]["summary"]["beta"] else trained(preset, a, 0, profile, cache,
                                                                                {"beta": beta})
            s = r["summary"]
            sweep.append({"algo": a, "beta": beta} | {k: s.get(k) for k in (
                "reward_final", "kl_path", "objective", "sample_quality_final", "fd_target_class_final",
                "target_fraction_final", "pairwise_distance_final", "class_entropy_final")} | {"images": _images(r)})
    res["beta_sweep"] = sweep

    # 3. time grids: trained on K = cfg.K (ddim), evaluated on other K and with em -----------------------
    grids = []
    robust_algos = [a for a in ("ctpo", "ddpo", "dpok") if a in algos]
    tr0 = None
    for a in robust_algos:
        for seed in range(seeds):
            tr = load_trainer(runs[a][seed])
            tr0 = tr0 or tr
            for method in ("ddim", "em"):
                for K in eval_ks:
                    grids.append({"algo": a, "seed": seed} | evaluate_on_grid(tr, K, method, n_eval))
    if tr0 is not None:
        for method in ("ddim", "em"):
            for K in eval_ks:
                grids.append({"algo": "pretrained", "seed": 0} | pretrained_on_grid(tr0, K, method, n_eval))
        res["train_K"] = tr0.cfg.K
        res["pretrained_images"] = encode_images(
            tr0.task.pretrained_rollout(N_IMAGES, evaluation_grid(tr0.cfg, tr0.env), tr0.transition, DIGITS_EVAL_SEED).xs[-1])
    res["time_grids"] = grids
    res["images_format"] = "hex strings of 64 uint8 grey levels, x = v/127.5 - 1; decode with decode_images"
    res["table"] = digits_bench_table(res)
    _plot(res, out / "bench-digits.png")
    _plot_samples(res, out / "digits-samples.png")
    return res


def _plot(res: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    from ..plotting import COLUMN_INCHES, color, setup
    setup()
    fig = Figure(figsize=(COLUMN_INCHES, 10.5), layout="constrained")
    ax = fig.subplots(3, 1)
    for r in res["algorithms"]:
        c = r["curves"]
        x = [p["samples_used"] for p in c[0]]
        y = np.mean([[p["reward"] for p in cv] for cv in c], axis=0)
        ax[0].plot(x, y, color=color(r["algo"]), label=r["algo"])
        ax[1].plot(x, np.mean([[p["kl_path"] for p in cv] for cv in c], axis=0), color=color(r["algo"]))
    ax[0].set(xlabel="trajectories sampled", ylabel="reward log p(3|x) (batch mean)", title="reward")
    ax[1].set(xlabel="trajectories sampled", ylabel="path KL (nats)", title="KL to the pretrained sampler")
    ax[0].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for a in dict.fromkeys(r["algo"] for r in res["beta_sweep"]):
        pts = sorted([r for r in res["beta_sweep"] if r["algo"] == a], key=lambda r: r["kl_path"])
        ax[2].plot([p["kl_path"] for p in pts], [p["reward_final"] for p in pts], "o-", color=color(a), label=a)
        for p in pts:
            ax[2].annotate(f"β={p['beta']:g}", (p["kl_path"], p["reward_final"]), fontsize=9)
    ax[2].set_xscale("log")
    ax[2].set(xlabel="path KL (nats, log scale)", ylabel="reward", title="reward–KL trade-off")
    ax[2].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _plot_samples(res: dict, path: Path) -> None:
    """Sample grids (same noise): pretrained, each algorithm at beta = 1, and the beta = 0 (reward-hacking) runs."""
    from matplotlib.figure import Figure

    from ..envs.digits.plots import show_grid
    from ..plotting import COLUMN_INCHES
    panels = [("pretrained", res["pretrained_images"])] if res.get("pretrained_images") else []
    panels += [(f"{r['algo']} (β = {r['beta']:g})", r["images"]) for r in res["algorithms"]]
    panels += [(f"{r['algo']} (β = 0)", r["images"]) for r in res["beta_sweep"] if r["beta"] == 0]
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(COLUMN_INCHES, 2.3 * nrow + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for ax, (title, codes) in zip(axes, panels):
        show_grid(ax, decode_images(codes)[:16], nrow=4, title=title)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{res['preset']}: samples after fine-tuning\n({res['profile']} profile, seed 0, same noise)",
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
