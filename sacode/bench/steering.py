"""``python -m sacode bench steering``: fine-tune or steer? (chapter 13).

On every toy preset and on ``digits-class3``, the steering methods of :mod:`sacode.engine.steering` sample the frozen
pretrained model on the fine-tuning grid (same K, sampler and transition as ctpo's class-profile runs) and are compared
with ctpo:

* **rows**: per (preset, method, N), over seeds: the distance of the output law to the law the method converges to
  (``target``: "tilted" = p_out e^{r/beta}/Z, or "fixed-initial" = the optimum with the initial law fixed), E r, J and
  its error, a path-KL estimate, W2 (1-D) or the KL between mode weights (mixture), and the cost per sample.
  Gaussian presets use the exact K-step targets (:mod:`sacode.theory.steering_targets`), so errors are against the
  same discretised quantity; the mixture uses the continuous-time laws and a discretisation floor (the error of the
  exact optimal control on the same grid). ctpo's target is the exact K-step optimum (chapter 8).
* **break_even** per preset: a method *reaches* its target when its terminal mean and E r are within
  0.1 |target - pretrained| + floor + 3 SE (the toy-convergence rule); N_tol is the smallest N that does. Producing M
  aligned samples costs F + M c in score units (:class:`~sacode.engine.steering.Cost`): for ctpo F = the score
  passes of its training rollouts until it reaches its target, c = K; for a steering method c = its cost per sample
  at N_tol and F = 0 (or the value fit of the learned-value methods). The break-even M* = (F_ctpo - F_m) / (c_m - K)
  is where fine-tuning becomes cheaper, per seed (``M_star_wall``: the same with measured wall-clock times). On
  digits (no closed form) "aligned" means an objective J = E r - beta KL at least that of ctpo's fine-tuned sampler
  (same seed; the KL of resampling methods is the weights' estimate), and F_ctpo is its whole training budget.

Cost unit: one forward pass of the score network on one sample; a backward pass counts 2 (its FLOP count; the
digits section measures the wall-clock ratio). Reward and value-network passes are reported separately.
"""
from __future__ import annotations

import json
import math
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..dynamics.grid import TimeGrid
from ..dynamics.transition import Transition
from ..engine.evaluation import EVAL_SEED, evaluate
from ..engine.policy import FixedScorePolicy
from ..engine.soft_value import fit_soft_value
from ..engine.steering import (ClosedFormValue, Cost, LearnedValue, SteeredSamples, TweedieRewardValue, best_of_n,
                               guide, importance_resampling, sample_pretrained, smc)
from ..engine.trainer import evaluation_grid
from ..engine.value import StructuredValue
from ..envs.toys import ToyEnv
from ..runs import make_config, make_task, make_trainer
from ..theory import optimal
from ..theory import steering_targets as st
from ..theory.discrete_optimum import discrete_optimum
from ..theory.estimate import mean_se
from ..theory.presets import TOY_PRESETS, toy_preset

DIGITS = "digits-class3"
PRESETS = list(TOY_PRESETS) + [DIGITS]

SIZES = {
    "ci": dict(M=48, pool_ns=[1, 2, 4, 8, 16], smc_ns=[2, 8], n_guide=192, value_rollouts=256, value_batch=128,
               eval_every=1, d_M=8, d_pool_ns=[1, 2, 4], d_smc_ns=[2], d_guide=8, d_value_rollouts=32),
    "class": dict(M=400, pool_ns=[1, 2, 4, 8, 16, 32, 64, 128, 256], smc_ns=[2, 4, 8, 16, 32, 64], n_guide=1600,
                  value_rollouts=4096, value_batch=256, eval_every=1, d_M=48, d_pool_ns=[1, 2, 4, 8, 16],
                  d_smc_ns=[4, 16], d_guide=48, d_value_rollouts=512),
    "full": dict(M=2000, pool_ns=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], smc_ns=[2, 4, 8, 16, 32, 64, 128],
                 n_guide=8000, value_rollouts=15360, value_batch=512, eval_every=1, d_M=256,
                 d_pool_ns=[1, 2, 4, 8, 16, 32, 64], d_smc_ns=[4, 16, 64], d_guide=512, d_value_rollouts=4096),
}

COST_UNIT = ("one forward pass of the score network on one sample; a backward pass counts 2 (FLOPs); reward, "
             "reward-gradient and value-network passes are counted separately")
ORACLE_METHODS = ("guidance-exact", "smc-exact", "smc-exact-fixed", "importance-fixed")
"""Methods that need the exact value (a closed form no real model has): reported, but left out of the headline
break-even, which is against the methods a practitioner can run."""
TOLERANCE_RULE = ("reached: |E x - target mean| <= 0.1 |target - pretrained| + floor + 3 SE and the same for E r "
                  "(toy presets); digits: J = E r - beta KL >= J of ctpo's fine-tuned sampler (same seed)")



def _pool_methods(add, pool, t_pool: float, ns, M: int, beta: float, gen, exact_value=None) -> None:
    """Best-of-N and importance resampling (and, given the exact value, importance resampling with the fixed
    initial law) for every N in ``ns``, each on the first M N samples of one pretrained pool; the pool's sampling
    time is shared in proportion to N."""
    n_max = max(ns)
    for N in ns:
        sub = type(pool)(pool.x[: M * N], pool.rewards[: M * N], pool.K, pool.x0[: M * N], None)
        share = t_pool * N / n_max
        out, t = _timed(best_of_n, sub, N)
        add("best-of-n", N, "tilted", out, t + share)
        out, t = _timed(importance_resampling, sub, N, beta, gen)
        add("importance", N, "tilted", out, t + share)
        if exact_value is not None:
            out, t = _timed(importance_resampling, sub, N, beta, gen, initial_value=exact_value)
            add("importance-fixed", N, "fixed-initial", out, t + share)

def discretisation_floor(preset, K: int, n: int) -> float:
    """The error |E x_T - optimal mean| of the exact optimal control run on the K-step Euler-Maruyama grid (n
    samples, the evaluation seed): what a converged method cannot beat on that grid (the mixture's floor)."""
    grid = TimeGrid.uniform(preset.sde.T, K)
    ev = evaluate(ToyEnv(preset), FixedScorePolicy(optimal.optimal_score(preset)), grid,
                  Transition(preset.sde, "em", 1.0), n, preset.beta, EVAL_SEED)
    return ev.record(optimal.optimal_terminal_law(preset).mean)["err_mean"]


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------
def _w2_gaussian(x: torch.Tensor, mean: float, var: float) -> float:
    """W2 between the empirical law of 1-D samples and N(mean, var) (quantile coupling)."""
    from scipy.stats import norm

    xs = np.sort(x.reshape(-1).double().numpy())
    q = mean + math.sqrt(var) * norm.ppf((np.arange(xs.size) + 0.5) / xs.size)
    return float(np.sqrt(np.mean((xs - q) ** 2)))


def _mode_kl(x: torch.Tensor, preset, weights: torch.Tensor) -> float:
    """KL(mode histogram of x || target mode weights) with nearest-mode assignment."""
    k = preset.data.nearest_component(x)
    h = torch.bincount(k, minlength=preset.data.K).double() / k.numel()
    w = weights.double().clamp_min(1e-300)
    m = h > 0
    return float((h[m] * (h[m] / w[m]).log()).sum())


def _summary(out: SteeredSamples, target: dict, preset, beta: float) -> dict:
    n = out.M
    xf = out.x.reshape(n, -1).double()
    mean = xf.mean(0)
    r = out.reward.double()
    rec = {"mean": mean.tolist(), "se_mean": float(xf.std(0).max() / math.sqrt(n)),
           "err_mean": float((mean - target["mean"].reshape(-1)).norm()),
           "reward": float(r.mean()), "se_reward": float(r.std() / math.sqrt(n)),
           "err_reward": abs(float(r.mean()) - target["Er"])}
    if out.kl is not None:
        kl = out.kl_estimate()
        rec |= {"kl": kl, "J": float(r.mean()) - beta * kl}
        rec["err_J"] = abs(rec["J"] - target["value"])
    if preset.data.d == 1:
        rec["w2"] = _w2_gaussian(out.x, float(target["mean"][0]), float(target["var"]))
        rec["kl_or_w2"] = rec["w2"]
    else:
        rec["mode_weights"] = (torch.bincount(preset.data.nearest_component(out.x), minlength=preset.data.K).double()
                               / n).tolist()
        rec["kl_modes"] = _mode_kl(out.x, preset, target["weights"])
        rec["kl_or_w2"] = rec["kl_modes"]
    if out.ess is not None:
        rec["ess_min"] = float(out.ess.min(0).values.mean())
    if out.resamplings is not None:
        rec["resamplings"] = float(out.resamplings.double().mean())
    return rec


def _reached(rec: dict, tol: dict) -> bool:
    return (rec["err_mean"] <= tol["base_mean"] + 3 * rec["se_mean"]
            and rec["err_reward"] <= tol["base_reward"] + 3 * rec["se_reward"])


def _law(t) -> dict:
    return {"mean": t.mean.reshape(-1), "var": float(t.cov[0, 0]), "weights": t.weights, "Er": t.expected_reward,
            "value": t.value if hasattr(t, "value") else t.objective}


# ------------------------------------------------------------------------------------------------
# ctpo on the toys, evaluated at every iteration
# ------------------------------------------------------------------------------------------------
def _ctpo_curve(name: str, seed: int, profile: str, cache: Path, n_eval: int, grid, target: dict, preset,
                eval_every: int) -> tuple[list[dict], object]:
    cfg = make_config(name, "ctpo", profile, seed, {"progress": False})
    out = cache / f"steering-{name}-ctpo-seed{seed}-{profile}-n{n_eval}"
    tr = make_trainer(cfg, out)
    path = out / "steering-curve.json"
    if path.exists() and (out / "summary.json").exists():
        tr.load()
        return json.loads(path.read_text()), tr
    curve = []

    def point(t):
        ev = evaluate(t.env, t.policy, grid, t.transition, n_eval, t.algo.beta, seed=10_000 + seed)
        out_ = SteeredSamples("ctpo", ev.x, ev.reward, ev.kl, 1, Cost())
        curve.append({"iteration": t.iteration, "samples_used": t.samples_used, "wall_s": t.wall}
                     | _summary(out_, target, preset, t.algo.beta))

    point(tr)
    tr.run(callback=lambda t: point(t) if t.iteration % eval_every == 0 or t.iteration == cfg.iterations else None)
    path.write_text(json.dumps(curve))
    return curve, tr


def _ctpo_accounting(cfg) -> dict:
    K = cfg.K
    return {"score_fwd_per_trajectory": K,
            "note": "rollout: K policy steps, each one score pass (the KL reference and the PPO epochs re-use the "
                    "frozen score at the same states); the small networks are counted per trajectory below",
            "policy_correction_passes": K + cfg.inner_epochs * K * 3,
            "value_passes": (K + 1) + cfg.value_epochs * K * 3, "reward_evals": K + 1}


# ------------------------------------------------------------------------------------------------
# the toy presets
# ------------------------------------------------------------------------------------------------
def _timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def _toy(name: str, profile: str, seeds: int, cache: Path, sz: dict) -> tuple[list[dict], dict]:
    pr = toy_preset(name)
    env = ToyEnv(pr)
    cfg = make_config(name, "ctpo", profile, 0)
    grid = evaluation_grid(cfg, env)
    tr = Transition(env.sde, cfg.method, cfg.eta, cfg.explore)
    K, beta, M = grid.K, pr.beta, sz["M"]
    gauss = pr.data.K == 1
    if gauss:
        tilt, fixed = st.tilted_law(pr, grid), st.fixed_initial_law(pr, grid)
        dopt = discrete_optimum(pr, grid)
        f64 = torch.float64
        ctpo_t = {"mean": torch.tensor([dopt.mean], dtype=f64), "var": dopt.var, "weights": torch.ones(1, dtype=f64),
                  "Er": dopt.expected_reward, "value": dopt.J}
        ch = st.pretrained_chain(pr, grid)
        pre_mean = torch.tensor([ch.output_mean], dtype=f64)
        pre_Er = st.expected_reward_gaussian(pr.reward, pre_mean, torch.tensor([[ch.output_var]], dtype=f64))
        floor = 0.0
    else:
        tilt, fixed = st.tilted_law(pr), st.fixed_initial_law(pr)
        ctpo_t = None
        pre = optimal.pretrained_terminal_law(pr)
        pre_mean, pre_Er = pre.mean, st.expected_reward_gaussian(pr.reward, pre.mean, pre.cov)
        floor = discretisation_floor(pr, K, sz["n_guide"])
    targets = {"tilted": _law(tilt), "fixed-initial": _law(fixed)}
    targets["ctpo"] = ctpo_t if ctpo_t is not None else targets["fixed-initial"]

    def tol_of(t: dict) -> dict:
        return {"base_mean": 0.1 * float((t["mean"] - pre_mean.reshape(-1)).norm()) + floor,
                "base_reward": 0.1 * abs(t["Er"] - pre_Er) + floor * float(getattr(pr.reward, "w", torch.ones(1))
                                                                           .abs().max())}

    exact_value = (ClosedFormValue(st.DiscreteSoftValue(pr, grid), "exact K-step value") if gauss
                   else ClosedFormValue(partial(optimal.optimal_value, pr), "V* (chapter 5)"))
    vstar = ClosedFormValue(partial(optimal.optimal_value, pr), "V* (chapter 5)")
    tweedie = TweedieRewardValue(env)
    recs: dict = {}          # (method, N) -> list over seeds of records

    def add(method, N, kind, out, wall):
        rec = _summary(out, targets[kind if method != "ctpo" else "ctpo"], pr, beta)
        rec |= {"target": "fixed-initial" if kind == "ctpo" else kind, "cost": out.cost.as_dict(),
                "nfe_per_sample": out.cost.score_units(), "wall_per_sample": wall / out.M}
        recs.setdefault((method, N), []).append(rec)

    fixed_costs: dict = {}
    ctpo_runs = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(1000 * seed + 7)
        torch.manual_seed(seed)
        # pool-based methods (one pool serves every N)
        n_max = max(sz["pool_ns"])
        pool, t_pool = _timed(sample_pretrained, env, grid, tr, M * n_max, gen)
        _pool_methods(add, pool, t_pool, sz["pool_ns"], M, beta, gen, exact_value if gauss else None)
        # a value learned from the frozen sampler's own rollouts (the soft value of engine.soft_value)
        net = StructuredValue(env, hidden=cfg.hidden, depth=cfg.depth)
        fit, t_fit = _timed(fit_soft_value, env, net, grid, tr, sz["value_rollouts"], sz["value_batch"], gen,
                            cfg.value_lr, cfg.value_epochs)
        fixed_costs.setdefault("learned value", []).append({"score_units": fit.cost.score_units(), "wall_s": t_fit,
                                                             "cost": fit.cost.as_dict()})
        learned = LearnedValue(net)
        # SMC
        for N in sz["smc_ns"]:
            for method, val, ip in [("smc-exact", exact_value, True), ("smc-tweedie", tweedie, True),
                                    ("smc-learned", learned, True)] + ([("smc-exact-fixed", exact_value, False)]
                                                                       if gauss else []):
                out, t = _timed(smc, env, grid, tr, val, M, N, gen, initial_potential=ip)
                add(method, N, "tilted" if ip else "fixed-initial", out, t)
        # guidance (a control: the initial law stays fixed)
        for method, val in [("guidance-exact", vstar), ("guidance-tweedie", tweedie), ("guidance-learned", learned)]:
            out, t = _timed(guide, env, grid, tr, val, sz["n_guide"], gen)
            add(method, 1, "fixed-initial", out, t)
        # pretrained sampler (N = 1 of the pool)
        # ctpo, evaluated along training
        curve, trainer = _ctpo_curve(name, seed, profile, cache, M, grid, targets["ctpo"], pr, sz["eval_every"])
        ctpo_runs.append({"curve": curve, "samples_total": trainer.samples_used, "wall_total": trainer.wall})
        ev, t = _timed(evaluate, env, trainer.policy, grid, tr, sz["n_guide"], beta, 20_000 + seed)
        add("ctpo", 1, "ctpo", SteeredSamples("ctpo", ev.x, ev.reward, ev.kl, 1, Cost(score_fwd=K, reward=1)), t)

    rows = []
    for (method, N), rs in recs.items():
        row = {"preset": name, "method": method, "n_particles": N, "target": rs[0]["target"],
               "nfe_per_sample": rs[0]["nfe_per_sample"], "cost": rs[0]["cost"], "seeds": len(rs)}
        for key in ("err_mean", "err_J", "kl_or_w2", "reward", "err_reward", "kl", "J", "se_mean", "se_reward",
                    "ess_min", "resamplings", "wall_per_sample", "w2", "kl_modes"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key], row[key + "_sd"] = float(np.mean(vals)), float(np.std(vals))
        row["mean"] = np.mean([r["mean"] for r in rs], axis=0).tolist()
        t = targets["ctpo" if method == "ctpo" else row["target"]]
        row["reached"] = [_reached(r, tol_of(t)) for r in rs]
        row["per_seed"] = [{k: r.get(k) for k in ("err_mean", "err_reward", "se_mean", "se_reward", "reward", "J",
                                                   "wall_per_sample")} for r in rs]
        rows.append(row)

    # ctpo: samples until it reaches its own target, per seed
    tol_c = tol_of(targets["ctpo"])
    ctpo_fixed = []
    for run in ctpo_runs:
        hit = next((c for c in run["curve"] if _reached(c, tol_c)), None)
        ctpo_fixed.append({"samples_to_tol": hit["samples_used"] if hit else None,
                           "score_units": hit["samples_used"] * K if hit else math.inf,
                           "wall_s": hit["wall_s"] if hit else math.inf,
                           "score_units_full": run["samples_total"] * K, "wall_s_full": run["wall_total"]})
    be = _break_even(name, rows, ctpo_fixed, fixed_costs, K, seeds)
    be["targets"] = {k: {"mean": v["mean"].tolist(), "var": v["var"], "expected_reward": v["Er"], "value": v["value"]}
                     for k, v in targets.items()}
    be["tolerance"] = {k: tol_of(v) for k, v in targets.items()} | {"floor": floor}
    be["ctpo_accounting"] = _ctpo_accounting(cfg)
    be["ctpo_curves"] = [[{k: c[k] for k in ("samples_used", "wall_s", "err_mean", "err_reward", "reward", "J")}
                          for c in run["curve"]] for run in ctpo_runs]
    return rows, be


def _break_even(name: str, rows: list[dict], ctpo_fixed: list[dict], fixed_costs: dict, K: int, seeds: int) -> dict:
    """Per steering method and seed: N_tol, cost per sample there, fixed cost, and M* against ctpo (score units and
    wall-clock)."""
    c_ctpo = float(K)
    ctpo_row = next(r for r in rows if r["method"] == "ctpo")
    methods = sorted({r["method"] for r in rows} - {"ctpo"})
    per_method = {}
    for m in methods:
        mrows = sorted((r for r in rows if r["method"] == m), key=lambda r: r["n_particles"])
        learned = "learned" in m
        F_m = [fc["score_units"] for fc in fixed_costs["learned value"]] if learned else [0.0] * seeds
        W_m = [fc["wall_s"] for fc in fixed_costs["learned value"]] if learned else [0.0] * seeds
        entries = []
        for s in range(seeds):
            hit = next((r for r in mrows if s < len(r["reached"]) and r["reached"][s]), None)
            F_c = ctpo_fixed[s]["score_units"] if s < len(ctpo_fixed) else math.inf
            if hit is None:
                entries.append({"N_tol": None, "M_star": None, "verdict": "never reaches its target"})
                continue
            c_m, w_m = hit["nfe_per_sample"], hit["per_seed"][s]["wall_per_sample"]
            w_c = ctpo_row["per_seed"][s]["wall_per_sample"]
            entries.append({"N_tol": hit["n_particles"], "cost_per_sample": c_m, "fixed_cost": F_m[s],
                            "M_star": _m_star(F_c, c_ctpo, F_m[s], c_m),
                            "wall_per_sample": w_m, "fixed_wall_s": W_m[s],
                            "M_star_wall": _m_star(ctpo_fixed[s]["wall_s"], w_c, W_m[s], w_m)})
        ms = [e["M_star"] for e in entries if e["M_star"] is not None]
        mw = [e["M_star_wall"] for e in entries if e.get("M_star_wall") is not None]
        per_method[m] = {"per_seed": entries,
                         "M_star_median": float(np.median(ms)) if ms else None,
                         "M_star_min": float(np.min(ms)) if ms else None,
                         "M_star_max": float(np.max(ms)) if ms else None,
                         "M_star_wall_median": float(np.median(mw)) if mw else None}
    # the M after which fine-tuning beats every practical steering method that reaches its target (best-of-N converges
    # to no target: it can match a target's mean and E r at one N, not its law; oracle methods need the exact value)
    overall = []
    for s in range(seeds):
        vals = [per_method[m]["per_seed"][s]["M_star"] for m in methods
                if m != "best-of-n" and m not in ORACLE_METHODS and per_method[m]["per_seed"][s]["M_star"] is not None]
        overall.append(max(vals) if vals else None)
    ok = [v for v in overall if v is not None]
    return {"preset": name, "ctpo": {"per_seed": ctpo_fixed, "per_sample": c_ctpo,
                                     "wall_per_sample": [p["wall_per_sample"] for p in ctpo_row["per_seed"]]},
            "methods": per_method,
            "M_star_all_per_seed": overall,
            "M_star_all_median": float(np.median(ok)) if ok else None,
            "M_star_all_min": float(np.min(ok)) if ok else None, "M_star_all_max": float(np.max(ok)) if ok else None}


def _m_star(F_c: float, c_c: float, F_m: float, c_m: float) -> float:
    """M with F_c + M c_c = F_m + M c_m: fine-tuning is cheaper for more samples (inf: never; 0: always)."""
    if not math.isfinite(F_c):
        return math.inf
    if c_m <= c_c:
        return math.inf if F_m <= F_c else 0.0
    return max(0.0, (F_c - F_m) / (c_m - c_c))


# ------------------------------------------------------------------------------------------------
# digits-class3
# ------------------------------------------------------------------------------------------------
def _unet_backward_ratio(env, n: int = 128, reps: int = 3) -> float:
    """Wall-clock (forward + backward) / forward of the score network on a batch (the cost convention's check)."""
    x = torch.randn(n, *env.event_shape)
    s = torch.full((n,), 0.5)
    f, fb = [], []
    for _ in range(reps):
        with torch.no_grad():
            t0 = time.perf_counter()
            env.score_model(s, x)
            f.append(time.perf_counter() - t0)
        xg = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        torch.autograd.grad(env.score_model(s, xg).sum(), xg)
        fb.append(time.perf_counter() - t0)
    return float(np.median(fb) / np.median(f))


def _digits(profile: str, seeds: int, cache: Path, sz: dict) -> tuple[list[dict], dict]:
    from .digits import load_trainer, trained

    cfg = make_config(DIGITS, "ctpo", profile, 0)
    task = make_task(cfg)
    env = task.env
    grid = evaluation_grid(cfg, env)
    tr = Transition(env.sde, cfg.method, cfg.eta, cfg.explore)
    K, beta, M = grid.K, env.beta, sz["d_M"]
    recs: dict = {}
    outputs: dict = {}
    fixed_costs: dict = {}
    ctpo_fixed, ctpo_J, bounds = [], [], []

    def add(method, N, kind, out, wall):
        r, kl = out.reward.double(), None if out.kl is None else out.kl_estimate()
        rec = {"target": kind, "reward": float(r.mean()), "se_reward": float(r.std() / math.sqrt(out.M)),
               "kl": kl, "J": None if kl is None else float(r.mean()) - beta * kl,
               "nfe_per_sample": out.cost.score_units(), "cost": out.cost.as_dict(), "wall_per_sample": wall / out.M}
        if out.ess is not None:
            rec["ess_min"] = float(out.ess.min(0).values.mean())
        recs.setdefault((method, N), []).append(rec)
        outputs.setdefault((method, N), []).append(out.x.detach())

    for seed in range(seeds):
        gen = torch.Generator().manual_seed(1000 * seed + 11)
        torch.manual_seed(seed)
        run = trained(DIGITS, "ctpo", seed, profile, cache)
        s = run["summary"]
        ctpo_J.append(s["objective"])
        _, t_ctpo = _timed(load_trainer(run).evaluate, sz["d_guide"], None, 30_000 + seed)
        ctpo_fixed.append({"samples_to_tol": s["samples_used"], "score_units": s["samples_used"] * K,
                           "wall_s": s["wall_s"], "score_units_full": s["samples_used"] * K,
                           "wall_s_full": s["wall_s"]})
        rec = {"target": "fixed-initial", "reward": s["reward_final"], "se_reward": s["reward_final_se"],
               "kl": s["kl_path"], "J": s["objective"], "nfe_per_sample": float(K),
               "cost": Cost(score_fwd=K, reward=1).as_dict(), "wall_per_sample": t_ctpo / sz["d_guide"],
               "fd_target_class": s.get("fd_target_class_final"), "target_fraction": s.get("target_fraction_final"),
               "sample_quality": s.get("sample_quality_final")}
        recs.setdefault(("ctpo", 1), []).append(rec)
        n_max = max(sz["d_pool_ns"])
        pool, t_pool = _timed(sample_pretrained, env, grid, tr, M * n_max, gen)
        bounds.append(float(beta * (torch.logsumexp(pool.rewards.double() / beta, 0) - math.log(pool.x.shape[0]))))
        _pool_methods(add, pool, t_pool, sz["d_pool_ns"], M, beta, gen)
        tweedie = TweedieRewardValue(env)
        for N in sz["d_smc_ns"]:
            out, t = _timed(smc, env, grid, tr, tweedie, M, N, gen)
            add("smc-tweedie", N, "tilted", out, t)
        out, t = _timed(guide, env, grid, tr, tweedie, sz["d_guide"], gen)
        add("guidance-tweedie", 1, "fixed-initial", out, t)
        net = StructuredValue(env, hidden=cfg.hidden, depth=cfg.depth)
        fit, t_fit = _timed(fit_soft_value, env, net, grid, tr, sz["d_value_rollouts"], cfg.batch, gen,
                            cfg.value_lr, cfg.value_epochs, cfg.minibatch)
        fixed_costs.setdefault("learned value", []).append({"score_units": fit.cost.score_units(), "wall_s": t_fit,
                                                             "cost": fit.cost.as_dict()})
        learned = LearnedValue(net)
        out, t = _timed(smc, env, grid, tr, learned, M, max(sz["d_smc_ns"]), gen)
        add("smc-learned", max(sz["d_smc_ns"]), "tilted", out, t)
        out, t = _timed(guide, env, grid, tr, learned, sz["d_guide"], gen)
        add("guidance-learned", 1, "fixed-initial", out, t)

    bound = float(np.mean(bounds))
    rows = []
    for (method, N), rs in recs.items():
        row = {"preset": DIGITS, "method": method, "n_particles": N, "target": rs[0]["target"],
               "nfe_per_sample": rs[0]["nfe_per_sample"], "cost": rs[0]["cost"], "seeds": len(rs),
               "err_mean": None, "kl_or_w2": None}
        for key in ("reward", "se_reward", "kl", "J", "ess_min", "wall_per_sample", "fd_target_class",
                    "target_fraction", "sample_quality"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key], row[key + "_sd"] = float(np.mean(vals)), float(np.std(vals))
        if row.get("J") is not None:
            row["err_J"] = bound - row["J"]              # gap to beta log E e^{r/beta} (tilted value, an upper bound)
        if (method, N) in outputs:
            x = torch.cat(outputs[(method, N)])
            if x.shape[0] >= 100:
                m = task.image_metrics(x)
                row |= {"fd_target_class": m.get("fd_target_class"), "target_fraction": m.get("target_fraction"),
                        "sample_quality": m["sample_quality"], "class_entropy": m["class_entropy"]}
        row["reached"] = ([r["J"] is not None and r["J"] >= ctpo_J[i] for i, r in enumerate(rs)]
                          if method != "ctpo" else [True] * len(rs))
        row["per_seed"] = [{k: r.get(k) for k in ("reward", "J", "wall_per_sample")} for r in rs]
        rows.append(row)
    be = _break_even(DIGITS, rows, ctpo_fixed, fixed_costs, K, seeds)
    be["J_bound"] = bound
    be["ctpo_accounting"] = _ctpo_accounting(cfg)
    be["backward_over_forward_wall"] = _unet_backward_ratio(env)
    be["tolerance"] = {"rule": "J of the steered samples >= J of ctpo's fine-tuned sampler (same seed)",
                       "ctpo_J": ctpo_J}
    return rows, be


# ------------------------------------------------------------------------------------------------
# Monte-Carlo rates against the closed-form constants
# ------------------------------------------------------------------------------------------------
RATE_SIZES = {"ci": dict(particles=8192, ns=[16, 64], K=10), "class": dict(particles=262144, ns=[16, 64, 256, 1024],
                                                                             K=10),
              "full": dict(particles=1048576, ns=[16, 64, 256, 1024, 4096], K=10)}


def _rates(profile: str) -> dict:
    """N Var and N x bias of the population estimate of the target mean, and ESS/N, against their closed forms:
    importance resampling on a light- and a heavy-tailed case, SMC with the exact K-step potentials (resampling at
    every step), for N in a grid at a fixed number of particles (so M = particles / N populations)."""
    from ..theory.control import ScoreControlProblem

    rz = RATE_SIZES[profile]
    out = {"sizes": rz, "cases": []}

    def stats(est: torch.Tensor, N: int, mu: float) -> dict:
        M = est.numel()
        v = mean_se((est - est.mean()) ** 2 * N * M / (M - 1))
        b = mean_se((est - mu) * N)
        return {"N": N, "M": M, "n_var": v.mean, "n_var_se": v.se, "n_bias": b.mean, "n_bias_se": b.se}

    for name, method in (("gauss1d-quadratic-short", "importance"), ("gauss1d-linear-short", "importance"),
                         ("gauss1d-linear-short", "smc-exact")):
        pr = toy_preset(name)
        grid = TimeGrid.uniform(pr.sde.T, rz["K"])
        tr = Transition(pr.sde, "em", 1.0)
        prob = ScoreControlProblem(pr.sde, optimal.pretrained_score(pr), pr.reward, pr.beta, pr.event_shape)
        gen = torch.Generator().manual_seed(4242)
        case = {"preset": name, "method": method, "K": rz["K"], "points": []}
        if method == "importance":
            ch = st.pretrained_chain(pr, grid)
            th = st.importance_sampling_theory(ch.output_mean, ch.output_var, pr.reward, pr.beta)
            case["theory"] = {"target_mean": th.target_mean, "n_var": th.variance, "n_bias": th.bias,
                              "ess_fraction": th.ess_fraction}
            pool = sample_pretrained(prob, grid, tr, rz["particles"], gen)
            for N in rz["ns"]:
                res = importance_resampling(pool, N, pr.beta, gen)
                case["points"].append(stats(res.estimate(lambda x: x), N, th.target_mean)
                                      | {"ess": float(res.ess.mean())})
        else:
            th = st.smc_theory(pr, grid)
            case["theory"] = {"target_mean": th.target_mean, "n_var": th.variance,
                              "ess_fraction": float(th.ess_fraction.mean()), "variance_terms": th.variance_terms.tolist()}
            V = ClosedFormValue(st.DiscreteSoftValue(pr, grid))
            for N in rz["ns"]:
                res = smc(prob, grid, tr, V, rz["particles"] // N, N, gen, ess_threshold=None)
                case["points"].append(stats(res.estimate(lambda x: x), N, th.target_mean)
                                      | {"ess": float(res.ess[1:].mean())})
        out["cases"].append(case)
    return out


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def steering_benchmark(profile: str, seeds: int, presets, algos, cache: Path, out: Path, lrs=None) -> dict:
    """Every steering method against its closed-form target and against ctpo; break-even sample counts."""
    torch.set_num_threads(1)
    cpu0, load0 = time.process_time(), os.getloadavg()
    sz = SIZES[profile]
    presets = presets or PRESETS
    cache = Path(cache)
    rows, break_even, walls = [], {}, {}
    for name in presets:
        t0 = time.perf_counter()
        r, be = (_digits(profile, seeds, cache, sz) if name == DIGITS else _toy(name, profile, seeds, cache, sz))
        rows += r
        break_even[name] = be
        walls[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rates = _rates(profile)
    walls["rates"] = time.perf_counter() - t0
    res = {"profile": profile, "seeds": seeds, "sizes": sz, "cost_unit": COST_UNIT, "tolerance_rule": TOLERANCE_RULE,
           "rows": rows, "break_even": break_even, "rates": rates, "wall_per_preset_s": walls,
           "cpu_s": time.process_time() - cpu0, "load_average_start_end": [load0, os.getloadavg()]}
    res["table"] = _table(res)
    _plot(res, out / "bench-steering.png")
    return res


def _fmt(v, nd=3):
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return f"{v:.{nd}g}"


def _table(res: dict) -> str:
    lines = [f"cost unit: {res['cost_unit']}", f"tolerance: {res['tolerance_rule']}"]
    for name, be in res["break_even"].items():
        lines.append(f"\n{name}: ctpo reaches its target after "
                     + ", ".join(_fmt(c["score_units"], 4) for c in be["ctpo"]["per_seed"])
                     + f" score units (seeds), then {be['ctpo']['per_sample']:g} per sample")
        lines.append(f"  {'method':<18}{'N_tol':>10}{'units/sample':>14}{'fixed':>10}{'M* median':>11}"
                     f"{'[min, max]':>20}{'M* (wall)':>11}")
        for m, e in be["methods"].items():
            Ns = [p.get("N_tol") for p in e["per_seed"]]
            cs = [p.get("cost_per_sample") for p in e["per_seed"] if p.get("cost_per_sample") is not None]
            fs = [p.get("fixed_cost") for p in e["per_seed"] if p.get("fixed_cost") is not None]
            lines.append(f"  {m:<18}{','.join(_fmt(n) for n in Ns):>10}{_fmt(np.median(cs) if cs else None, 4):>14}"
                         f"{_fmt(np.median(fs) if fs else None, 3):>10}{_fmt(e['M_star_median'], 3):>11}"
                         f"{'[' + _fmt(e['M_star_min'], 3) + ', ' + _fmt(e['M_star_max'], 3) + ']':>20}"
                         f"{_fmt(e['M_star_wall_median'], 3):>11}")
        lines.append(f"  fine-tuning is cheaper than every practical steering method (no oracle value, not best-of-N) "
                     f"that reaches its target after M* = "
                     f"{_fmt(be['M_star_all_median'], 3)} samples (seeds: "
                     + ", ".join(_fmt(v, 3) for v in be["M_star_all_per_seed"]) + ")")
    for case in res.get("rates", {}).get("cases", []):
        th = case["theory"]
        lines.append(f"\nrate: {case['method']} on {case['preset']} (K = {case['K']}): N Var -> {th['n_var']:.3g}, "
                     f"ESS/N -> {th['ess_fraction']:.3g} (closed forms)")
        for pt in case["points"]:
            lines.append(f"  N = {pt['N']:>5}: N Var = {pt['n_var']:.3g} ± {pt['n_var_se']:.2g}, "
                         f"N bias = {pt['n_bias']:.3g} ± {pt['n_bias_se']:.2g}, ESS/N = {pt['ess']:.3g}")
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    """Amortised cost per aligned sample, (F + M c)/M in score units, for ctpo and the steering methods; a steering
    line below ctpo's curve is cheaper for that M."""
    from matplotlib.figure import Figure

    from ..plotting import COLUMN_INCHES, color, setup
    setup()
    names = list(res["break_even"])
    ncol = min(2, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig = Figure(figsize=(COLUMN_INCHES, 2.9 * nrow + 1.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrow, ncol, squeeze=False))
    Ms = np.logspace(0, 6, 200)
    handles = {}
    for ax, name in zip(axes.flat, names):
        be = res["break_even"][name]
        F = np.array([c["score_units"] for c in be["ctpo"]["per_seed"]], dtype=float)
        F = F[np.isfinite(F)]
        c = be["ctpo"]["per_sample"]
        if F.size:
            h, = ax.loglog(Ms, np.median(F) / Ms + c, color=color("ctpo"), lw=2.5)
            handles["ctpo: (training + M K) / M"] = h
            ax.fill_between(Ms, F.min() / Ms + c, F.max() / Ms + c, color=color("ctpo"), alpha=0.2)
        for m, e in be["methods"].items():
            ok = [p for p in e["per_seed"] if p.get("cost_per_sample") is not None]
            if not ok or m == "best-of-n":
                continue
            cm = np.median([p["cost_per_sample"] for p in ok])
            fm = np.median([p["fixed_cost"] for p in ok])
            h, = ax.loglog(Ms, fm / Ms + cm, color=color(m), lw=1.3, ls="--" if m in ORACLE_METHODS else "-")
            handles[m + (" (oracle)" if m in ORACLE_METHODS else "")] = h
        ax.set(title=name, xlabel="aligned samples M", ylabel="score units per sample")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=3, fontsize=9,
               frameon=False)
    fig.suptitle("Fine-tune or steer: score units per aligned sample at N_tol\n(median over seeds; band: ctpo's "
                 "seeds)", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
