"""``python -m sacode bench toy-convergence`` and ``toy-recipe``: noise-limited training on the toys (chapter 8).

The question is how many trajectories each algorithm needs when every trajectory counts: **one optimiser step per
batch** (the policy's minibatch is the whole batch; the value network keeps its default regression), batches of
n in :data:`BATCHES` trajectories, and a learning rate tuned per algorithm *and* per batch size on a tuning seed
that is never reported.

**Evaluation.** After every iteration the policy is run on ``n_eval`` >= 4000 trajectories with common random
numbers: the same seed, so the same initial states and the same noise at every step, for every policy and for the
reference. The reference is the exact K-step optimum (dynamic programming, ``sacode.theory.discrete_optimum``) on the
Gaussian presets; on the mixture, where no closed form exists, a policy trained by reward backpropagation with
large batches (an unbiased, low-variance gradient of the same J_K; the same procedure lands within 0.1% of the
exact optimum on ``gauss1d-linear``, which the benchmark re-measures as ``reference_check``). Paired with the
reference, the errors e_J = (J - J_ref) / (J_ref - J_pre) and e_m = |E x_K - m_ref| / |m_ref - m_pre| are
measured with standard errors far below the tolerance.

**The rule** (:data:`RULE`): converged when |e_J| and e_m stay within 3% for 5 consecutive evaluations; the
samples to convergence are the samples used at the first evaluation of that streak. A run stops once it has
converged and used the largest budget of :data:`BUDGETS`, or at its iteration cap (not converged: censored). The
first evaluation within 3% (without staying) is kept as ``first_hit``; the J regret -e_J at fixed sample budgets
is reported too. Medians and interquartile ranges over seeds (a censored run counts as infinitely slow).

``toy-recipe`` runs the same protocol with the official code's recipe (:data:`OFFICIAL_RECIPE`) next to sacode's
defaults.
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

from ..dynamics.grid import TimeGrid
from ..dynamics.transition import Transition
from ..engine.config import FIELD_PARAMS
from ..engine.evaluation import EVAL_SEED, evaluate
from ..engine.policy import FixedScorePolicy
from ..envs.toys import ToyEnv
from ..runs import make_config, make_trainer
from ..theory import policy_eval
from ..theory.affine_policy import AffineScoreFamily
from ..theory.discrete_optimum import discrete_optimum
from ..theory.presets import TOY_PRESETS, toy_preset
from .pool import config_key, run_jobs
from .toys import TUNE_SEED

BATCHES = (8, 16, 32, 64, 256)
CONV_ALGOS = ("ctpo", "ddpo")

REF_SEED = 200                        # the mixture's backpropagation reference
K_TRAIN = 20


@dataclass(frozen=True)
class StayRule:
    """Converged: |e_J| <= tol and e_m <= tol at ``evals`` consecutive evaluations."""

    tol: float = 0.03
    evals: int = 5

    def within(self, p: dict) -> bool:
        return abs(p["e_J"]) <= self.tol and p["e_m"] <= self.tol

    def first_stay(self, points: list[dict]) -> int | None:
        """Index of the first evaluation that starts a streak of ``evals`` evaluations within tolerance."""
        run = 0
        for i, p in enumerate(points):
            run = run + 1 if self.within(p) else 0
            if run == self.evals:
                return i - self.evals + 1
        return None

    def first_hit(self, points: list[dict]) -> int | None:
        """Index of the first evaluation within tolerance (the old 'first hit' criterion)."""
        return next((i for i, p in enumerate(points) if self.within(p)), None)

    def describe(self) -> str:
        return (f"converged when |J - J_ref| and |E x_K - m_ref| both stay within {self.tol:.0%} of the "
                f"pretrained-to-reference gap for {self.evals} consecutive evaluations (one per iteration, "
                "common random numbers); samples counted at the first evaluation of the streak")


RULE = StayRule()


@dataclass(frozen=True)
class Settings:
    """Run sizes of one profile."""

    presets: tuple[str, ...]
    tune_presets: tuple[str, ...]
    batches: tuple[int, ...]
    recipe_batches: tuple[int, ...]
    lrs: tuple[float, ...]
    max_iters: dict
    budgets: tuple[int, ...]
    n_eval: int
    ref_batch: int
    ref_iters: int


CONV_SETTINGS = {
    "ci": Settings(("gauss1d-linear",), ("gauss1d-linear",), (8, 32), (32,), (3e-3,), {8: 8, 32: 6}, (32, 64), 256,
                   64, 3),
    "class": Settings(("gauss1d-linear", "gauss1d-quadratic", "mixture2d-linear"), ("gauss1d-linear",), BATCHES,
                      (32,), (1e-3, 3e-3, 1e-2), {8: 300, 16: 200, 32: 150, 64: 100, 256: 60}, (512, 2048),
                      4000, 1024, 80),
    "full": Settings(TOY_PRESETS, ("gauss1d-linear", "mixture2d-linear"), BATCHES, BATCHES, (3e-4, 1e-3, 3e-3, 1e-2),
                     {8: 600, 16: 400, 32: 300, 64: 200, 256: 120}, (512, 2048, 8192), 8000, 2048, 150),
}

OFFICIAL_RECIPE = {"adv_norm": "step", "adv_clip": 5.0, "logprob_mean": True, "weight_decay": 1e-4}
"""The official code's recipe (chapter 8): advantages standardised per time step and clamped to +-5, log-densities
averaged over dimensions with the PPO clip divided by the dimension (:func:`recipe_overrides`), AdamW with weight
decay 1e-4, and one optimiser step per 64 whole trajectories."""
OFFICIAL_TRAJECTORIES_PER_STEP = 64


def recipe_overrides(recipe: str, preset: str, batch: int, K: int = K_TRAIN) -> dict:
    """Config overrides of a recipe: ``sacode`` (the defaults, one step per batch) or ``official``."""
    if recipe == "sacode":
        return {"minibatch": 10**7}
    if recipe == "official":
        d = math.prod(toy_preset(preset).event_shape)
        per_step = min(batch, OFFICIAL_TRAJECTORIES_PER_STEP) * K
        return OFFICIAL_RECIPE | {"clip": FIELD_PARAMS["clip"].default / d, "minibatch": per_step}
    raise ValueError(f"unknown recipe {recipe!r}; use sacode or official")


# ----- the reference, with common random numbers -------------------------------------------------------------
def _ref_path(preset: str, profile: str, cache: Path) -> Path:
    return cache / "crn" / f"{preset}-K{K_TRAIN}-{profile}.pt"


def build_reference(preset: str, profile: str, cache: Path) -> dict:
    """The reference of ``preset`` evaluated with the evaluation seed (cached): per-trajectory objective and
    terminal state, J_ref, m_ref and the pretrained J_pre, m_pre on the K-step grid."""
    path = _ref_path(preset, profile, cache)
    if path.exists():
        return torch.load(path, weights_only=False)
    S = CONV_SETTINGS[profile]
    pr = toy_preset(preset)
    grid = TimeGrid.uniform(pr.sde.T, K_TRAIN)
    env, tr = ToyEnv(pr), Transition(pr.sde, "em", 1.0)
    check = None
    if pr.data.K == 1 and pr.data.d == 1:
        d = discrete_optimum(pr, grid)
        policy, kind = FixedScorePolicy(d.score_fn(pr)), f"exact {K_TRAIN}-step optimum"
        fam = AffineScoreFamily.from_preset(pr)
        pre = policy_eval.discrete_objective(fam, fam.zeros(), pr.reward, pr.beta, grid)
        J_ref, m_ref, J_pre, m_pre = float(d.J), [float(d.mean)], float(pre.objective), [float(pre.mean_T)]
        ev = evaluate(env, policy, grid, tr, S.n_eval, pr.beta, EVAL_SEED)
    else:
        policy = _backprop_reference(preset, profile, cache)
        kind = (f"reward backpropagation, {S.ref_iters} iterations of {S.ref_batch} trajectories (no closed form "
                "for the mixture)")
        ev = evaluate(env, policy, grid, tr, S.n_eval, pr.beta, EVAL_SEED)
        J_ref, m_ref = float(ev.objective.mean()), ev.terminal_mean.tolist()
        # the pretrained sampler of the symmetric ring has E x_K = 0 and KL = 0 on any grid, so J_pre = E r = 0
        J_pre, m_pre = 0.0, [0.0] * len(m_ref)
        check = reference_check(profile, cache)
    ref = {"preset": preset, "kind": kind, "obj": ev.objective, "x": ev.x.reshape(ev.n, -1), "J_ref": J_ref,
           "m_ref": m_ref, "J_pre": J_pre, "m_pre": m_pre, "n_eval": S.n_eval, "check": check}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    return ref


def _backprop_reference(preset: str, profile: str, cache: Path):
    from .toys import trained_run

    S = CONV_SETTINGS[profile]
    tr, _ = trained_run(preset, "backprop", REF_SEED, profile, cache,
                        {"batch": S.ref_batch, "iterations": S.ref_iters, "lr": 3e-3}, eval_every=10**9)
    return tr.policy


def reference_check(profile: str, cache: Path) -> dict:
    """The mixture's reference procedure run on ``gauss1d-linear``, measured against the exact optimum."""
    pr = toy_preset("gauss1d-linear")
    grid = TimeGrid.uniform(pr.sde.T, K_TRAIN)
    env, tr = ToyEnv(pr), Transition(pr.sde, "em", 1.0)
    ref = build_reference(pr.name, profile, cache)
    ev = evaluate(env, _backprop_reference(pr.name, profile, cache), grid, tr, CONV_SETTINGS[profile].n_eval, pr.beta,
                  EVAL_SEED)
    p = crn_point(ev, ref)
    return {"preset": pr.name, "e_J": p["e_J"], "e_m": p["e_m"], "se_J": p["se_J"], "se_m": p["se_m"]}


def crn_point(ev, ref: dict) -> dict:
    """Errors of an evaluation against the reference, paired over common random numbers (module docstring)."""
    n = ev.n
    dJ = ev.objective - ref["obj"]
    dx = ev.x.reshape(n, -1) - ref["x"]
    gap_J = ref["J_ref"] - ref["J_pre"]
    gap_m = float(np.linalg.norm(np.asarray(ref["m_ref"]) - np.asarray(ref["m_pre"])))
    mean_dx = dx.mean(0)
    return {"e_J": float(dJ.mean()) / gap_J, "e_m": float(mean_dx.norm()) / gap_m,
            "se_J": float(dJ.std()) / math.sqrt(n) / abs(gap_J),
            "se_m": float(dx.std(0).max()) / math.sqrt(n) / gap_m}


# ----- one run ---------------------------------------------------------------------------------------------
def noise_run(preset: str, algo: str, batch: int, lr: float, seed: int, profile: str, cache: str,
              recipe: str = "sacode", extra: str = "{}") -> dict:
    """Train one run in the noise-limited protocol, evaluating after every iteration; cached as JSON."""
    from ..analysis import load_metrics

    cache_p = Path(cache)
    S = CONV_SETTINGS[profile]
    overrides = {"batch": batch, "lr": lr, "iterations": S.max_iters[batch], "eval_batch": 16,
                 "checkpoint_every": 10**6, "progress": False,
                 "value_minibatch": FIELD_PARAMS["minibatch"].default} | recipe_overrides(recipe, preset, batch) \
        | json.loads(extra)
    cfg = make_config(preset, algo, profile, seed, overrides)
    # keyed by the resolved configuration: a changed default never reuses a stale run
    path = cache_p / "noise" / f"{preset}-{algo}-n{batch}-{recipe}-seed{seed}-{profile}-" \
                               f"{config_key(cfg.to_dict(), RULE.tol, RULE.evals, S.n_eval)}.json"
    if path.exists():
        return json.loads(path.read_text())
    ref = build_reference(preset, profile, cache_p)
    out = Path(tempfile.mkdtemp(prefix="sacode-noise-"))
    tr = make_trainer(cfg, out)
    pr = tr.task.preset
    grid = TimeGrid.uniform(pr.sde.T, K_TRAIN)
    points: list[dict] = []

    def point(t) -> None:
        ev = evaluate(t.env, t.policy, grid, t.transition, S.n_eval, t.algo.beta, EVAL_SEED)
        points.append({"iteration": t.iteration, "samples": t.samples_used} | crn_point(ev, ref))
        if RULE.first_stay(points) is not None and t.samples_used >= max(S.budgets):
            t.cfg.iterations = t.iteration           # early stop: converged and past the largest budget

    point(tr)
    try:
        tr.run(callback=point)
        metrics = load_metrics(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rec = {"preset": preset, "algo": algo, "batch": batch, "lr": lr, "seed": seed, "recipe": recipe,
           "max_iters": S.max_iters[batch], "points": points,
           "grad_clipped_frac": float(np.mean(metrics["grad_clipped_frac"])),
           "grad_norm_median": float(np.median(metrics["grad_norm"])), "wall_s": tr.wall}
    rec |= summarise_run(rec, S)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec


def summarise_run(rec: dict, S: Settings) -> dict:
    """Samples to convergence (None: censored), first hit, regret at the budgets, final errors."""
    pts = rec["points"]
    i_stay, i_hit = RULE.first_stay(pts), RULE.first_hit(pts)
    at = {b: next((p for p in pts if p["samples"] >= b), None) for b in S.budgets}
    return {"samples_to_stay": pts[i_stay]["samples"] if i_stay is not None else None,
            "first_hit": pts[i_hit]["samples"] if i_hit is not None else None,
            "regret_at": {str(b): (-p["e_J"] if p is not None else None) for b, p in at.items()},
            "final_e_J": pts[-1]["e_J"], "final_e_m": pts[-1]["e_m"], "cap_samples": rec["batch"] * rec["max_iters"],
            "max_se": max(max(p["se_J"], p["se_m"]) for p in pts)}


def tune_score(rec: dict) -> float:
    """Lower is better: the samples to convergence, or (censored) the cap times 1 + the final error."""
    if rec["samples_to_stay"] is not None:
        return float(rec["samples_to_stay"])
    return rec["cap_samples"] * (1.0 + min(1.0, max(abs(rec["final_e_J"]), rec["final_e_m"])))


# ----- the benchmark ---------------------------------------------------------------------------------------
def _stats(values: list) -> dict:
    """Median and interquartile range over seeds; None (censored) counts as +inf."""
    v = np.array([np.inf if x is None else float(x) for x in values])
    q25, med, q75 = np.percentile(v, [25, 50, 75], method="linear") if np.isfinite(v).all() else (
        _pct(v, 25), _pct(v, 50), _pct(v, 75))
    f = lambda a: float(a) if math.isfinite(a) else None
    return {"median": f(med), "q25": f(q25), "q75": f(q75), "n": len(values),
            "reached": int(np.isfinite(v).sum())}


def _pct(v: np.ndarray, q: float) -> float:
    """Percentile with +inf entries (sorted last): inf when the rank falls on them."""
    s = np.sort(v)
    pos = (len(s) - 1) * q / 100
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    if not (math.isfinite(s[lo]) and math.isfinite(s[hi])):
        return math.inf
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def _tune(algos, batches, profile, cache, recipe, extra, workers, lrs=None) -> dict:
    S = CONV_SETTINGS[profile]
    lrs = tuple(lrs or S.lrs)
    jobs = [(p, a, n, lr, TUNE_SEED, profile, str(cache), recipe, extra)
            for a in algos for n in batches for lr in lrs for p in S.tune_presets]
    recs = run_jobs(noise_run, jobs, workers) if len(lrs) > 1 else []
    tuning = {}
    for a in algos:
        for n in batches:
            scores = {lr: float(np.mean([tune_score(r) for r in recs
                                         if r["algo"] == a and r["batch"] == n and r["lr"] == lr]))
                      for lr in lrs} if recs else {lrs[0]: 0.0}
            best = min(scores, key=scores.get)
            tuning[f"{a}/{n}"] = {"lr": best, "scores": {f"{k:g}": v for k, v in scores.items()}}
    return tuning


def _convergence(profile, seeds, presets, algos, cache, out, recipes, overrides, workers, name, lrs,
                 batches) -> dict:
    torch.set_num_threads(1)         # many small tensor operations: one thread is fastest, and shares the cores
    S = CONV_SETTINGS[profile]
    presets = list(presets or S.presets)
    algos = list(algos or CONV_ALGOS)
    extra = json.dumps(dict(overrides or {}), sort_keys=True)
    for p in presets:                                   # references first (the mixture's trains a policy)
        build_reference(p, profile, Path(cache))
    tuning = {r: _tune(algos, batches, profile, cache, r, extra, workers, lrs) for r in recipes}
    jobs = [(p, a, n, tuning[r][f"{a}/{n}"]["lr"], s, profile, str(cache), r, extra)
            for r in recipes for p in presets for a in algos for n in batches for s in range(seeds)]
    recs = run_jobs(noise_run, jobs, workers)
    rows = []
    for r in recipes:
        for p in presets:
            for a in algos:
                for n in batches:
                    rs = [x for x in recs if (x["recipe"], x["preset"], x["algo"], x["batch"]) == (r, p, a, n)]
                    rows.append({
                        "recipe": r, "preset": p, "algo": a, "batch": n, "lr": rs[0]["lr"], "seeds": len(rs),
                        "samples_to_stay": _stats([x["samples_to_stay"] for x in rs]),
                        "first_hit": _stats([x["first_hit"] for x in rs]),
                        "regret_at": {b: _stats([x["regret_at"][b] for x in rs]) for b in rs[0]["regret_at"]},
                        "final_e_J": _stats([abs(x["final_e_J"]) for x in rs]),
                        "final_e_m": _stats([x["final_e_m"] for x in rs]),
                        "grad_clipped_frac": float(np.mean([x["grad_clipped_frac"] for x in rs])),
                        "grad_norm_median": float(np.median([x["grad_norm_median"] for x in rs])),
                        "cap_samples": rs[0]["cap_samples"], "max_se": max(x["max_se"] for x in rs),
                        "wall_s": float(np.sum([x["wall_s"] for x in rs]))})
    refs = {p: {k: v for k, v in build_reference(p, profile, Path(cache)).items() if k not in ("obj", "x")}
            for p in presets}
    curves = {f"{x['recipe']}/{x['preset']}/{x['algo']}/{x['batch']}/{x['seed']}":
              [[q["samples"], round(q["e_J"], 5), round(q["e_m"], 5)] for q in x["points"]] for x in recs}
    return {"profile": profile, "presets": presets, "algos": algos, "batches": list(batches),
            "budgets": list(S.budgets), "lrs": list(lrs or S.lrs), "seeds": seeds, "n_eval": S.n_eval,
            "max_iters": {str(k): v for k, v in S.max_iters.items()}, "tune_presets": list(S.tune_presets),
            "tune_seed": TUNE_SEED, "rule": RULE.describe(), "rule_tol": RULE.tol, "rule_evals": RULE.evals,
            "overrides": dict(overrides or {}), "references": refs, "tuning": tuning, "rows": rows,
            "curves_format": "[samples, e_J, e_m] per evaluation", "curves": curves, "name": name}


def ratios(rows: list[dict], recipe: str = "sacode", key: str = "samples_to_stay") -> dict:
    """ddpo/ctpo ratio of median samples per preset and batch: a number, or a lower bound ``">= x"`` (ddpo censored
    at its cap), or None (ctpo did not converge in the median)."""
    out: dict = {}
    for r in rows:
        if r["recipe"] != recipe or r["algo"] != "ctpo":
            continue
        d = next((x for x in rows if (x["recipe"], x["preset"], x["algo"], x["batch"]) ==
                  (recipe, r["preset"], "ddpo", r["batch"])), None)
        if d is None:
            continue
        c, dd = r[key]["median"], d[key]["median"]
        val = None if c is None else (dd / c if dd is not None else f">= {d['cap_samples'] / c:.3g}")
        out.setdefault(r["preset"], {})[str(r["batch"])] = val
    return out


def target_check(ratio: dict, threshold: float = 3.0, max_batch: int = 32) -> dict:
    """The issue's target: ddpo/ctpo >= 3 at every batch <= 32, on at least two presets."""
    def ok(v):
        if v is None:
            return False
        return float(v.split()[-1]) >= threshold if isinstance(v, str) else v >= threshold
    per = {p: all(ok(v) for b, v in by.items() if int(b) <= max_batch) for p, by in ratio.items()}
    return {"per_preset": per, "met": sum(per.values()) >= 2, "rule": f"ratio >= {threshold:g} at every batch <= "
            f"{max_batch} on at least two presets"}


def _fmt_stats(s: dict, nd: int = 4) -> str:
    if s["median"] is None:
        return f"— ({s['reached']}/{s['n']})"
    iqr = "—" if s["q75"] is None else f"{s['q75']:.{nd}g}"
    return f"{s['median']:.{nd}g} [{s['q25']:.{nd}g}, {iqr}] ({s['reached']}/{s['n']})"


def _table(res: dict, recipes: list[str]) -> str:
    b_last = str(res["budgets"][-1])
    lines = [f"rule: {res['rule']}",
             f"{'recipe':<9}{'preset':<19}{'algo':<6}{'n':>5}{'lr':>8}{'samples to stay  median [IQR] (reached)':>42}"
             f"{'first hit':>12}{'regret@' + b_last:>12}{'clipped':>9}"]
    for r in res["rows"]:
        if r["recipe"] not in recipes:
            continue
        fh = r["first_hit"]["median"]
        rg = r["regret_at"][b_last]["median"]
        lines.append(f"{r['recipe']:<9}{r['preset']:<19}{r['algo']:<6}{r['batch']:>5}{r['lr']:>8.0e}"
                     f"{_fmt_stats(r['samples_to_stay']):>42}{'—' if fh is None else f'{fh:.4g}':>12}"
                     f"{'—' if rg is None else f'{rg:+.3f}':>12}{r['grad_clipped_frac']:>9.2f}")
    for rc in recipes:
        lines.append(f"ddpo/ctpo samples-to-stay ratio ({rc}): " + "; ".join(
            f"{p}: " + ", ".join(f"n={b} {v if isinstance(v, str) or v is None else f'{v:.2f}'}"
                                 for b, v in by.items()) for p, by in ratios(res["rows"], rc).items()))
    return "\n".join(lines)


def toy_convergence(profile: str, seeds: int, presets, algos, cache: Path, out: Path, lrs=None, overrides=None,
                    workers: int = 1) -> dict:
    """The noise-limited convergence benchmark (module docstring) with sacode's defaults; ``lrs`` replaces the
    profile's tuning grid (one value: no tuning runs)."""
    res = _convergence(profile, seeds, presets, algos, cache, out, ["sacode"], overrides, workers,
                       "toy-convergence", lrs, CONV_SETTINGS[profile].batches)
    res["ratio_ddpo_over_ctpo"] = ratios(res["rows"], "sacode")
    res["ratio_ddpo_over_ctpo_first_hit"] = ratios(res["rows"], "sacode", "first_hit")
    res["target"] = target_check(res["ratio_ddpo_over_ctpo"])
    res["table"] = _table(res, ["sacode"]) + f"\ntarget ({res['target']['rule']}): " + \
        ("met" if res["target"]["met"] else "not met")
    _plot(res, ["sacode"], out / "bench-toy-convergence.png")
    return res


def toy_recipe(profile: str, seeds: int, presets, algos, cache: Path, out: Path, lrs=None, overrides=None,
               workers: int = 1) -> dict:
    """The same protocol with the official recipe next to sacode's defaults (shares the cached runs)."""
    res = _convergence(profile, seeds, presets, algos, cache, out, ["sacode", "official"], overrides, workers,
                       "toy-recipe", lrs, CONV_SETTINGS[profile].recipe_batches)
    res["recipe"] = {"official": OFFICIAL_RECIPE | {"clip": "clip / dimension",
                                                    "trajectories_per_step": OFFICIAL_TRAJECTORIES_PER_STEP}}
    res["ratio_ddpo_over_ctpo"] = {rc: ratios(res["rows"], rc) for rc in ("sacode", "official")}
    res["table"] = _table(res, ["sacode", "official"])
    _plot(res, ["sacode", "official"], out / "bench-toy-recipe.png")
    return res


def _plot(res: dict, recipes: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import COLUMN_INCHES, color, setup
    setup()
    fig, axes = plt.subplots(3, 1, figsize=(COLUMN_INCHES, 11.5), layout="constrained")
    markers = dict(zip(res["presets"], "osd^v"))
    styles = {"sacode": "-", "official": ":"}
    b_last = str(res["budgets"][-1])
    for r in recipes:
        for p in res["presets"]:
            for a in res["algos"]:
                rows = [x for x in res["rows"] if (x["recipe"], x["preset"], x["algo"]) == (r, p, a)]
                n = np.array([x["batch"] for x in rows], dtype=float)
                for ax, get in ((axes[0], lambda x: x["samples_to_stay"]), (axes[2], lambda x: x["regret_at"][b_last])):
                    st = [get(x) for x in rows]
                    med = np.array([np.nan if s["median"] is None else s["median"] for s in st])
                    lo = np.array([np.nan if s["q25"] is None else s["q25"] for s in st])
                    hi = np.array([np.nan if s["q75"] is None else s["q75"] for s in st])
                    lab = f"{a}, {p}" + ("" if len(recipes) == 1 else f" ({r})")
                    ax.plot(n, med, marker=markers[p], ls=styles[r], color=color(a), ms=4, label=lab)
                    ax.fill_between(n, lo, hi, color=color(a), alpha=0.08)
        for p, by in ratios(res["rows"], r).items():
            b = [int(k) for k, v in by.items() if isinstance(v, (int, float))]
            v = [by[str(k)] for k in b]
            axes[1].plot(b, v, marker=markers[p], ls=styles[r], color="0.3", ms=5,
                         label=p + ("" if len(recipes) == 1 else f" ({r})"))
    axes[1].axhline(3.0, color=color("optimal"), ls="--", lw=1, label="target 3")
    axes[1].axhline(1.0, color="0.6", lw=0.8, label="equal")
    axes[1].set_ylim(0.1, 30)
    for ax in axes[:2]:                           # log scale where something converged (else nothing is drawn)
        ys = [np.asarray(ln.get_ydata(), dtype=float) for ln in ax.lines]
        if any((y[np.isfinite(y)] > 0).any() for y in ys if y.size):
            ax.set_yscale("log")
    axes[0].set(xscale="log", xlabel="batch n (trajectories per optimiser step)",
                ylabel="trajectories until converged", title="samples to stay within 3% (median, IQR)")
    axes[1].set(xscale="log", xlabel="batch n", ylabel="ddpo / ctpo",
                title="ratio of median samples (censored: not drawn)")
    axes[2].set(xscale="log", xlabel="batch n", ylabel="(J_ref − J) / (J_ref − J_pre)",
                title=f"J regret after {b_last} trajectories")
    axes[2].axhline(0, color="0.6", lw=0.8)
    for ax in axes:
        ax.set_xlim(min(res["batches"]) / 1.3, max(res["batches"]) * 1.3)
        ax.set_xticks(res["batches"], [str(b) for b in res["batches"]])
    axes[0].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Noise-limited training on the toys:\none optimiser step per batch, learning rate tuned per batch")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
