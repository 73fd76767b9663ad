"""``python -m sacode bench estimator``: the policy-gradient estimators side by side at fixed policies (chapter 7).

The estimators are those of :mod:`sacode.theory.estimators` (closed-form moments:
:func:`~sacode.theory.estimators.estimator_moments`). What is measured, and the fields of the result, are described
in ``_DEFINITIONS``, which the result carries as ``definitions``: plain text, since a chapter may print it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..dynamics.grid import TimeGrid
from ..dynamics.transition import Transition
from ..engine.affine import AffinePolicy
from ..engine.algos import make_algorithm
from ..engine.gradient_probe import trajectory_gradients, value_along_states
from ..engine.value import (IMPROVED_VALUE_LEARNING, PAPER_VALUE_LEARNING, ValueLearner, returns_to_go,
                            skip_on_rollout)
from ..envs.toys import ToyEnv
from ..runs import make_config, make_trainer
from ..theory import estimators as es
from ..theory.affine_policy import AffineScoreFamily
from ..theory.control import rollout
from ..theory.presets import coordinate_presets, gaussian_preset_name, toy_preset

REWARD_KINDS = ("linear", "quadratic")
DIMS = (1, 8, 32)
KS = (10, 20, 50, 100)
FRACS = (0.0, 0.5, 0.9)
N_KNOTS = 5
TRAIN_K, TRAIN_ITERS, TRAIN_BATCH, CURVE_ITERS = 20, 4, 256, 8
FIT_BATCHES, FIT_N = 12, 1024
ESTIMATORS = (("ddpo", "none"), ("ctpo", "exact-K"), ("ctpo", "exact-continuous"), ("ctpo-pathwise", "exact-K"),
              ("ctpo-pathwise", "exact-continuous"), ("dpok", "exact-K"), ("backprop", "none"))
DIGITS_PRESET, DIGITS_N, DIGITS_N_REF = "digits-class3", 256, 128

# the result's "definitions": plain text (no Sphinx markup), since a chapter may print it
_DEFINITIONS = """\
python -m sacode bench estimator: the policy-gradient estimators side by side at fixed policies
(chapter 7).

At fixed affine policies theta = f theta* (f in FRACS; theta* the optimal control of chapter 5 at the knots) on the
Gaussian presets gauss{d}d-{linear,quadratic} (d in DIMS) and uniform Euler-Maruyama grids of K steps (K in KS),
each estimator's per-trajectory gradient (sacode.theory.estimators) is sampled on the same n trajectories and
compared with the exact grad J_K:

* rel_var  E||g_i - E g||^2 / ||grad J_K||^2 for one trajectory's estimate g_i (with its standard error), next to
  the closed form rel_var_exact (sacode.theory.estimators.estimator_moments) and z = their difference in standard
  errors;
* cos      the cosine of the n-trajectory mean with grad J_K (cos_exact: of the exact mean; cos_b32 and cos_b256:
  the average cosine of the mean of batches of 32 and 256 trajectories);
* bias     ||mean - grad J_K|| / ||grad J_K||.

value says which value ctpo / ctpo-pathwise use: "exact-K" (the policy's K-step value), "exact-continuous" (the
continuous-time V^theta on the grid), "fitted" (the engine's value network fitted at theta on FIT_BATCHES x FIT_N
extra trajectories with the paper's learner, PAPER_VALUE_LEARNING; "fitted-improved" with IMPROVED_VALUE_LEARNING)
or "training" / "training-improved" (the network as it stands inside an engine ctpo run of the affine policy, with
the paper's value learner or with the improved one, one run per seed; theta_frac "pre" is the first iteration,
"iter4" the policy after 4 updates). dpok uses its exact reward critic (value "exact-K"); ddpo and backprop use
none. ratio_ddpo_over_ctpo[value][d][K][theta_frac] is rel_var(ddpo) / rel_var(ctpo) measured on the same
trajectories. value_learning follows the training runs for CURVE_ITERS iterations: the relative error of grad_x V
against the exact K-step grad V of the current policy, the cosine of ctpo's mean gradient and the variance ratio.
digits repeats the comparison on the 8x8 digits (d = 64) with the engine's MLP policy, against a backprop
reference.
"""


def _sizes(profile: str) -> dict:
    return {"ci": dict(n=256, dims=(1, 8), Ks=(10,), fracs=(0.0, 0.9), kinds=("linear",), train=True,
                       fit_batches=2, fit_n=128, train_batch=64, curve_iters=TRAIN_ITERS, digits=False),
            "class": dict(n=2048, dims=DIMS, Ks=KS, fracs=FRACS, kinds=REWARD_KINDS, train=True, fit_batches=FIT_BATCHES,
                          fit_n=FIT_N, train_batch=TRAIN_BATCH, curve_iters=CURVE_ITERS, digits=True),
            "full": dict(n=8192, dims=DIMS, Ks=KS, fracs=FRACS, kinds=REWARD_KINDS, train=True, fit_batches=FIT_BATCHES,
                         fit_n=FIT_N, train_batch=TRAIN_BATCH, curve_iters=CURVE_ITERS, digits=True)}[profile]


def _batch_cos(samples: torch.Tensor, grad: np.ndarray, B: int) -> float | None:
    s = samples.reshape(samples.shape[0], -1)
    m = s.shape[0] // B
    if m < 1:
        return None
    g = torch.as_tensor(grad, dtype=s.dtype).reshape(-1)
    means = s[: m * B].reshape(m, B, -1).mean(1)
    return float((means @ g / (means.norm(dim=1) * g.norm())).mean())


def _row(preset, d, K, frac, algo, value, samples, grad, moments=None, **extra) -> dict:
    r = es.relative_variance(samples, grad)
    row = {"preset": preset, "d": d, "K": K, "theta_frac": frac, "algo": algo, "value": value} | r
    row |= {"cos_b32": _batch_cos(samples, grad, 32), "cos_b256": _batch_cos(samples, grad, 256)}
    if moments is not None:
        g1 = np.asarray(grad).reshape(d, -1)[0]
        row |= {"rel_var_exact": moments.rel_var(g1, d), "cos_exact": moments.cos(g1), "bias_exact": moments.bias(g1)}
        row["z"] = (row["rel_var"] - row["rel_var_exact"]) / row["rel_var_se"] if row["rel_var_se"] > 0 else 0.0
    return row | extra


def _family(kind: str):
    p1 = toy_preset(gaussian_preset_name(kind, 1))
    return p1, AffineScoreFamily.from_preset(p1, N_KNOTS)


def _values(steps, fam, thetas, rewards, beta, grid, paths) -> dict:
    """(values, grads) along ``paths`` of the exact values: exact-K, exact-continuous, and dpok's critic."""
    VK = es.discrete_value(steps)
    VC = es.continuous_value(fam, thetas, rewards, beta, grid)
    return {"exact-K": es.quadratic_values(VK, paths), "exact-continuous": es.quadratic_values(VC, paths),
            "dpok": es.quadratic_values(es.discrete_value(steps, with_kl=False), paths), "VK": VK, "VC": VC}


def _exact_rows(sz: dict, seed: int, log) -> list[dict]:
    rows = []
    for kind in sz["kinds"]:
        p1, fam = _family(kind)
        th_star = es.optimal_theta(fam, p1.reward, p1.beta)
        for K in sz["Ks"]:
            grid = TimeGrid.uniform(p1.sde.T, K)
            for frac in sz["fracs"]:
                th = frac * th_star
                st1 = es.grid_steps(fam, th, p1.reward, p1.beta, grid)
                VK1, VC1 = es.discrete_value(st1), es.continuous_value(fam, th, p1.reward, p1.beta, grid)
                mom = {(a, v): es.estimator_moments(st1, a, {"exact-K": VK1, "exact-continuous": VC1}.get(v)
                                                    if a in ("ctpo", "ctpo-pathwise") else None)
                       for a, v in ESTIMATORS}
                for d in sz["dims"]:
                    name = gaussian_preset_name(kind, d)
                    thetas = np.tile(th, (d, 1))
                    st = es.grid_steps(fam, thetas, p1.reward, p1.beta, grid)
                    g = es.discrete_gradient(st)
                    paths = es.sample_paths(st, sz["n"], torch.Generator().manual_seed(seed + 7919 * K + d))
                    vals = _values(st, fam, thetas, p1.reward, p1.beta, grid, paths)
                    for algo, value in ESTIMATORS:
                        v, gr = vals["dpok"] if algo == "dpok" else vals.get(value, (None, None))
                        s = es.estimator_samples(st, paths, algo, v, gr)
                        rows.append(_row(name, d, K, frac, algo, value, s, g, mom[(algo, value)],
                                         grad_norm=float(np.linalg.norm(g)), group=f"exact/{name}/{K}/{frac}"))
                log(f"exact {kind} K={K} f={frac}")
    return rows


def _toy_env(name: str):
    p = toy_preset(name)
    cps = coordinate_presets(p)
    fam = AffineScoreFamily.from_preset(cps[0], N_KNOTS)
    return p, cps, fam, ToyEnv(p), Transition(p.sde, "em", 1.0)


def _learned_rows(name, d, frac, label, thetas, value, fam, cps, p, grid, n, seed, extra, group: str,
                  reference: bool = True) -> list[dict]:
    """ctpo and ctpo-pathwise with a value network and, with ``reference``, ddpo and ctpo with the exact-K value at the
    same theta, all on the same n fresh paths (rows of one ``group``)."""
    rewards = [c.reward for c in cps]
    st = es.grid_steps(fam, thetas, rewards, p.beta, grid)
    g = es.discrete_gradient(st)
    paths = es.sample_paths(st, n, torch.Generator().manual_seed(seed))
    vn, gn = value_along_states(value, grid, paths.xs.reshape(grid.K + 1, n, *p.event_shape))
    gn = gn.reshape(grid.K + 1, n, d)
    ve, ge = es.quadratic_values(es.discrete_value(st), paths)
    err = float(((gn[:-1] - ge[:-1]) ** 2).sum() / (ge[:-1] ** 2).sum()) ** 0.5
    K, extra = grid.K, extra | {"group": group}
    out = [_row(name, d, K, frac, "ctpo", label, es.estimator_samples(st, paths, "ctpo", vn), g, grad_v_err=err,
                **extra),
           _row(name, d, K, frac, "ctpo-pathwise", label, es.estimator_samples(st, paths, "ctpo-pathwise", None, gn),
                g, grad_v_err=err, **extra)]
    if reference:
        out += [_row(name, d, K, frac, "ddpo", "none", es.estimator_samples(st, paths, "ddpo"), g, **extra),
                _row(name, d, K, frac, "ctpo", "exact-K", es.estimator_samples(st, paths, "ctpo", ve), g, **extra)]
    return out


def _fitted_rows(sz: dict, seed: int, log) -> list[dict]:
    rows = []
    for kind in sz["kinds"]:
        for d in sz["dims"]:
            name = gaussian_preset_name(kind, d)
            p, cps, fam, env, tr = _toy_env(name)
            th_star = es.optimal_theta(fam, cps[0].reward, p.beta)
            grid = TimeGrid.uniform(p.sde.T, TRAIN_K)
            for label, over in (("fitted", PAPER_VALUE_LEARNING), ("fitted-improved", IMPROVED_VALUE_LEARNING)):
                cfg = make_config(name, "ctpo", "class", 0, {"progress": False, **over}).replace(beta=p.beta)
                for frac in sz["fracs"]:
                    thetas = np.tile(frac * th_star, (d, 1))
                    torch.manual_seed(seed)
                    learner = ValueLearner.from_config(env, cfg)
                    pol = AffinePolicy(env, fam.basis, thetas)
                    gen = torch.Generator().manual_seed(seed + 1)
                    for _ in range(sz["fit_batches"]):
                        b = rollout(env, pol, grid, tr, sz["fit_n"], gen)
                        learner.fit(b, returns_to_go(b, p.beta), gen, skip_on_rollout(learner.value, b))
                    rows += _learned_rows(name, d, frac, label, thetas, learner.value, fam, cps, p, grid, sz["n"],
                                          seed + 2, {"value_samples": sz["fit_batches"] * sz["fit_n"]},
                                          f"fitted/{name}/{frac}", reference=label == "fitted")
            log(f"fitted {name}")
    return rows


def _training_rows(sz: dict, seeds: int, log) -> tuple[list[dict], dict]:
    rows, curves = [], {}
    for kind in sz["kinds"]:
        for d in sz["dims"]:
            name = gaussian_preset_name(kind, d)
            for seed in range(seeds):
                for label, over in (("training", PAPER_VALUE_LEARNING),
                                    ("training-improved", IMPROVED_VALUE_LEARNING)):
                    rs, curve = _training_run(name, d, label, over, sz, seed)
                    rows += rs
                    curves[f"{name}/{label}/seed{seed}"] = curve
            log(f"training {name}")
    return rows, curves


def _training_run(name: str, d: int, label: str, over: dict, sz: dict, seed: int) -> tuple[list[dict], dict]:
    """One engine ctpo run of the affine policy; after each update, the value network as the update used it."""
    p, cps, fam, env, tr = _toy_env(name)
    cfg = make_config(name, "ctpo", "class", seed,
                      {"progress": False, "K": TRAIN_K, "batch": sz["train_batch"], **over}).replace(beta=p.beta)
    torch.manual_seed(seed)
    pol = AffinePolicy(env, fam.basis)
    algo = make_algorithm("ctpo", env, pol, cfg, tr)
    gen = torch.Generator().manual_seed(seed + 1)
    grid = TimeGrid.uniform(p.sde.T, TRAIN_K)
    curve: dict = {k: [] for k in ("iteration", "samples_used", "grad_v_err", "cos", "bias", "rel_var", "ratio")}
    rows = []
    for it in range(max(sz["curve_iters"], TRAIN_ITERS) + 1):
        thetas = pol.thetas()
        batch = rollout(env, pol, grid, tr, cfg.batch, gen)
        algo.update(batch, gen)                    # fits the value on this batch, then moves theta
        frac = "pre" if it == 0 else f"iter{it}"
        rs = _learned_rows(name, d, frac, label, thetas, algo.value, fam, cps, p, grid, sz["n"],
                           1000 * seed + 100 + it, {"samples_used": (it + 1) * cfg.batch, "run": label,
                                                    "seed": seed}, f"{label}/{name}/seed{seed}/{frac}")
        c, dd = rs[0], rs[2]
        for k, v in (("iteration", it), ("samples_used", (it + 1) * cfg.batch), ("grad_v_err", c["grad_v_err"]),
                     ("cos", c["cos"]), ("bias", c["bias"]), ("rel_var", c["rel_var"]),
                     ("ratio", dd["rel_var"] / c["rel_var"])):
            curve[k].append(v)
        if it in (0, TRAIN_ITERS):
            rows += rs
    return rows, curve


def _digits_rows(profile: str, seed: int, log) -> dict:
    """The estimator comparison on the digits (d = 64, the engine's MLP policy and value network) at theta_pre and
    after a ctpo run of the profile's length. No exact gradient exists here: the reference is the mean of
    DIGITS_N_REF backprop estimates (unbiased for grad J_K), and ||grad J_K||^2 is estimated without the reference's own
    noise, ||mean||^2 - tr Cov / n. The value is the training-time one: the run's network fitted once more on the
    probe batch (as the update at that policy would), then restored so that the probe does not change training."""
    import copy
    import shutil
    import tempfile

    from ..engine.trainer import training_grid

    out = {"preset": DIGITS_PRESET, "rows": []}
    cfg = make_config(DIGITS_PRESET, "ctpo", profile, seed, {"progress": False})
    tmp = Path(tempfile.mkdtemp(prefix="sacode-estimator-digits-"))
    trainer = make_trainer(cfg, tmp)
    env, pol, trn, beta = trainer.env, trainer.policy, trainer.transition, trainer.algo.beta
    learner = trainer.algo.value_learner

    def probe(stage: str) -> None:
        gen = torch.Generator().manual_seed(seed + 5)
        grid = training_grid(trainer.cfg, env, gen)
        batch = rollout(env, pol, grid, trn, DIGITS_N, gen)
        saved = copy.deepcopy(learner.state_dict())
        learner.fit(batch, returns_to_go(batch, beta), gen, skip_on_rollout(learner.value, batch))
        ref = trajectory_gradients("backprop", env, pol, trn, rollout(env, pol, grid, trn, DIGITS_N_REF, gen), beta)
        m = ref.mean(0)
        noise = float(((ref - m) ** 2).sum(1).mean()) / (ref.shape[0] - 1)
        norm2 = float(m @ m) - noise
        h1, h2 = ref[: ref.shape[0] // 2].mean(0), ref[ref.shape[0] // 2:].mean(0)
        out[f"reference_half_cos_{stage}"] = float(h1 @ h2 / (h1.norm() * h2.norm()))
        res = {}
        for algo in ("ddpo", "ctpo", "ctpo-pathwise"):
            s = trajectory_gradients(algo, env, pol, trn, batch, beta, learner.value)
            mean = s.mean(0)
            sq = ((s - mean) ** 2).sum(1) * s.shape[0] / (s.shape[0] - 1)
            res[algo] = {"preset": DIGITS_PRESET, "d": 64, "K": grid.K, "theta_frac": stage, "algo": algo,
                         "value": "none" if algo == "ddpo" else "training", "n": s.shape[0],
                         "rel_var": float(sq.mean()) / norm2, "rel_var_se": float(sq.std()) / math.sqrt(s.shape[0])
                         / norm2, "cos": float(mean @ m / (mean.norm() * m.norm())), "n_ref": ref.shape[0],
                         "ref_noise_fraction": noise / float(m @ m), "iterations": trainer.iteration,
                         "samples_used": trainer.samples_used}
            out["rows"].append(res[algo])
        out[f"ratio_ddpo_over_ctpo_{stage}"] = res["ddpo"]["rel_var"] / res["ctpo"]["rel_var"]
        learner.load_state_dict(saved)
        log(f"digits {stage}")

    try:
        probe("pre")
        trainer.run()
        probe(f"iter{trainer.iteration}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["iterations"] = trainer.iteration
    return out


def _pairs(rows: list[dict], exact: bool = False) -> list[tuple[float, dict]]:
    """(rel_var(ddpo) / rel_var(ctpo), ctpo row) for every ctpo row, against the ddpo row of its group (same paths)."""
    key = "rel_var_exact" if exact else "rel_var"
    ddpo = {r["group"]: r for r in rows if r["algo"] == "ddpo"}
    return [(ddpo[r["group"]][key] / r[key], r) for r in rows
            if r["algo"] == "ctpo" and r["group"] in ddpo and r.get(key) is not None]


def _ratios(rows: list[dict]) -> dict:
    """ratio_ddpo_over_ctpo[value][d][K]["kind/theta_frac"] (measured on the same paths)."""
    out: dict = {}
    for ratio, r in _pairs(rows):
        kind = r["preset"].split("-")[1]
        source = r["group"].split("/")[0]
        value = r["value"] if r["value"] != "exact-K" or source == "exact" else f"exact-K ({source})"
        key = f"{kind}/{r['theta_frac']}" + (f"/seed{r['seed']}" if "seed" in r else "")
        out.setdefault(value, {}).setdefault(str(r["d"]), {}).setdefault(str(r["K"]), {})[key] = ratio
    return out


def _targets(rows: list[dict]) -> dict:
    out = {}
    measured, closed = _pairs(rows), _pairs(rows, exact=True)
    for value in ("exact-K", "exact-continuous"):
        sel = lambda r: r["value"] == value and r["theta_frac"] == 0.0 and r["group"].startswith("exact")
        v = [(x, r) for x, r in measured if sel(r)]
        ve = [x for x, r in closed if sel(r)]
        worst = min(v, key=lambda t: t[0]) if v else None
        out[f"exact value ({value}): ratio >= 3 at theta_pre, every d and K"] = {
            "met": bool(v) and worst[0] >= 3, "min_measured": worst[0] if worst else None,
            "at": [worst[1]["preset"], worst[1]["K"]] if worst else None, "min_closed_form": min(ve) if ve else None}
    for label in ("training", "training-improved"):
        for frac, thr in (("pre", 3.0), (f"iter{TRAIN_ITERS}", 2.0)):
            v = [(x, r) for x, r in measured if r["value"] == label and r["theta_frac"] == frac and r["d"] >= 8]
            out[f"{label} value: ratio >= {thr:g} at {frac}, d >= 8"] = {
                "met": bool(v) and min(x for x, _ in v) >= thr, "min_measured": min(x for x, _ in v) if v else None,
                "values": [[r["preset"], r.get("seed", 0), round(x, 2)] for x, r in v]}
    return out


def _table(rows: list[dict], targets: dict, digits: dict | None) -> str:
    lines = ["relative variance per trajectory (MC, closed form) and cosine with grad J_K, theta_pre and 0.9 theta*"]
    lines.append(f"{'preset':<20}{'K':>4}{'f':>5}  {'algo':<14}{'value':<18}{'rel_var':>10}{'exact':>10}{'cos':>7}"
                 f"{'cos_ex':>8}")
    for r in rows:
        if r["K"] == 20 and r["theta_frac"] in (0.0, 0.9, "pre", f"iter{TRAIN_ITERS}") and r.get("seed", 0) == 0:
            ex = r.get("rel_var_exact")
            lines.append(f"{r['preset']:<20}{r['K']:>4}{str(r['theta_frac']):>5}  {r['algo']:<14}{r['value']:<18}"
                         f"{r['rel_var']:>10.3g}{(f'{ex:.3g}' if ex is not None else '-'):>10}{r['cos']:>7.3f}"
                         f"{(format(r['cos_exact'], '.3f') if 'cos_exact' in r else '-'):>8}")
    lines.append("targets:")
    for k, v in targets.items():
        lines.append(f"  {k}: {'MET' if v['met'] else 'NOT MET'} (min measured {v['min_measured']})")
    if digits:
        lines.append("digits (d = 64): " + ", ".join(f"{k}: {v:.3g}" for k, v in digits.items()
                                                   if k.startswith("ratio")))
    return "\n".join(lines)


def _plot(rows: list[dict], curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import COLUMN_INCHES, color, setup
    setup()
    fig, axes = plt.subplots(3, 1, figsize=(COLUMN_INCHES, 11.5), layout="constrained")
    marks = {1: "o", 8: "s", 32: "^"}
    ax = axes[0]
    for d in sorted({r["d"] for r in rows if isinstance(r["theta_frac"], float)}):
        for value, ls in (("exact-K", "-"), ("exact-continuous", "--")):
            pts = []
            for K in sorted({r["K"] for r in rows}):
                c = [r for r in rows if r["algo"] == "ctpo" and r["value"] == value and r["d"] == d and r["K"] == K
                     and r["theta_frac"] == 0.0 and "linear" in r["preset"] and r["group"].startswith("exact")]
                dd = [r for r in rows if r["algo"] == "ddpo" and r["d"] == d and r["K"] == K
                      and r["theta_frac"] == 0.0 and "linear" in r["preset"] and r["group"].startswith("exact")]
                if c and dd:
                    pts.append((K, dd[0]["rel_var"] / c[0]["rel_var"]))
            if pts:
                ax.loglog(*zip(*pts), ls, marker=marks.get(d, "o"), color=color("ctpo" if value == "exact-K" else
                                                                                "ctpo-pathwise"),
                          label=f"d = {d}, {value}")
    ax.axhline(3, color="k", ls=":", lw=1)
    Ks = sorted({r["K"] for r in rows})
    ax.set_xticks(Ks, [str(k) for k in Ks])
    ax.minorticks_off()
    ax.set(xlabel="steps K", ylabel="rel. variance ddpo / ctpo", title="exact value, theta_pre (linear)")
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax = axes[1]
    for d in sorted({r["d"] for r in rows if isinstance(r["theta_frac"], float)}):
        pts = []
        for f in sorted({r["theta_frac"] for r in rows if isinstance(r["theta_frac"], float)}):
            c = [r for r in rows if r["algo"] == "ctpo" and r["value"] == "exact-K" and r["d"] == d and r["K"] == 20
                 and r["theta_frac"] == f and "linear" in r["preset"] and r["group"].startswith("exact")]
            dd = [r for r in rows if r["algo"] == "ddpo" and r["d"] == d and r["K"] == 20 and r["theta_frac"] == f
                  and "linear" in r["preset"] and r["group"].startswith("exact")]
            if c and dd:
                pts.append((f, dd[0]["rel_var"] / c[0]["rel_var"]))
        if pts:
            ax.semilogy(*zip(*pts), "-", marker=marks.get(d, "o"), color=color("ctpo"), label=f"d = {d}")
    ax.axhline(1, color="k", ls=":", lw=1)
    ax.set(xlabel="theta / theta*", ylabel="rel. variance ddpo / ctpo", title="exact-K value, K = 20 (linear)")
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax = axes[2]
    groups: dict = {}
    for key, cv in curves.items():
        name, label = key.split("/")[:2]
        groups.setdefault((name, label), []).append(cv)
    for (name, label), cvs in groups.items():
        if "quadratic" not in name:
            continue
        err = np.mean([cv["grad_v_err"] for cv in cvs], axis=0)
        ax.plot(cvs[0]["samples_used"], err, "-" if label == "training" else "--",
                marker=marks.get(int(name[5:name.index("d-")]), "o"),
                color=color("ddpo" if label == "training" else "ctpo"), label=f"{name}, {label}")
    ax.set(xlabel="trajectories sampled", ylabel="relative error of grad_x V (mean over seeds)",
           title="value learning during ctpo")
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("bench estimator: likelihood-ratio (ddpo)\nvs advantage-rate (ctpo) gradients")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def estimator_benchmark(profile: str, seeds: int = 1, presets=None, algos=None, cache: Path = Path("runs/bench-cache"),
                        out: Path = Path("figures"), **_) -> dict:
    """The benchmark of the module docstring (``presets``: restrict the kinds, e.g. ["linear"], or ["digits"] /
    ["no-digits"] to run only / skip the digits part)."""
    torch.set_num_threads(1)             # small tensors: one thread is faster and shares the cores (as the chapters)
    sz = _sizes(profile)
    if presets:
        kinds = [k for k in presets if k in REWARD_KINDS]
        if kinds:
            sz["kinds"] = tuple(kinds)
        if "no-digits" in presets:
            sz["digits"] = False
        if presets == ["digits"]:
            sz["kinds"], sz["digits"] = (), True
    t0 = time.perf_counter()
    timing: dict = {}

    def log(msg):
        timing[msg] = round(time.perf_counter() - t0, 1)
        print(f"[{timing[msg]:7.1f} s] {msg}", flush=True)

    seed = 0
    rows = _exact_rows(sz, seed, log)
    rows += _fitted_rows(sz, seed, log) if sz["train"] and sz["kinds"] else []
    train_rows, curves = _training_rows(sz, max(1, seeds), log) if sz["train"] and sz["kinds"] else ([], {})
    rows += train_rows
    digits = _digits_rows(profile, seed, log) if sz["digits"] else None
    targets = _targets(rows) if rows else {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        _plot(rows, curves, out / "bench-estimator.png")
    return {"profile": profile, "rows": rows, "ratio_ddpo_over_ctpo": _ratios(rows), "value_learning": curves,
            "digits": digits, "targets": targets, "improved_value_learner": IMPROVED_VALUE_LEARNING, "timing": timing,
            "definitions": _DEFINITIONS, "table": _table(rows, targets, digits)}
