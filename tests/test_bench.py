"""The benchmarks' pieces: the convergence rule, paired errors, regrets against the exact K-step optimum, the CLI.

The numbers the benchmarks report are not asserted here (they are measurements); the pieces that compute them are,
against closed forms or constructed cases where the right answer is known.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import Z
from sacode.bench.convergence import RULE, StayRule, crn_point, ratios, target_check
from sacode.bench.grids import eval_grid, off_grid
from sacode.dynamics.grid import TimeGrid
from sacode.dynamics.transition import Transition
from sacode.engine.evaluation import EVAL_SEED, evaluate
from sacode.engine.policy import FixedScorePolicy
from sacode.envs.toys import ToyEnv
from sacode.theory import optimal
from sacode.theory import policy_eval as pe
from sacode.theory.affine_policy import AffineScoreFamily
from sacode.theory.discrete_optimum import discrete_optimum
from sacode.theory.presets import toy_preset


def _pts(errs):
    return [{"samples": 8 * (i + 1), "e_J": e, "e_m": abs(e)} for i, e in enumerate(errs)]


def test_stay_rule_on_synthetic_curves():
    rule = StayRule(tol=0.03, evals=5)
    # within at 2..6: the streak starts at index 2 (the first hit is index 2 as well)
    pts = _pts([0.5, 0.1, 0.02, -0.01, 0.0, 0.025, -0.02, 0.2])
    assert rule.first_stay(pts) == 2 and rule.first_hit(pts) == 2
    # four within, one out, then five within: the streak is the second one; the first hit stays early
    pts = _pts([0.5, 0.01, 0.01, 0.01, 0.01, 0.04, 0.01, 0.0, 0.0, 0.0, 0.0])
    assert rule.first_stay(pts) == 6 and rule.first_hit(pts) == 1
    # the mean error alone can break the streak
    pts = _pts([0.0] * 6)
    pts[3]["e_m"] = 0.031
    assert rule.first_stay(pts) is None
    # never five in a row: censored
    assert rule.first_stay(_pts([0.0, 0.0, 0.0, 0.0, 0.5] * 3)) is None


def test_ratio_and_target_bookkeeping():
    def row(algo, batch, med, cap=1000):
        return {"recipe": "sacode", "preset": "p", "algo": algo, "batch": batch, "cap_samples": cap,
                "samples_to_stay": {"median": med}}
    rows = [row("ctpo", 8, 100), row("ddpo", 8, 400), row("ctpo", 32, 200), row("ddpo", 32, None),
            row("ctpo", 256, None), row("ddpo", 256, 50)]
    r = ratios(rows)["p"]
    assert r["8"] == 4.0 and r["32"] == ">= 5" and r["256"] is None
    assert target_check({"p": r, "q": {"8": 3.5, "32": 2.9}})["per_preset"] == {"p": True, "q": False}
    assert not target_check({"p": r, "q": {"8": 3.5, "32": 2.9}})["met"]


def test_crn_point_measures_paired_errors():
    pr = toy_preset("gauss1d-linear")
    grid = TimeGrid.uniform(pr.sde.T, 20)
    env, tr = ToyEnv(pr), Transition(pr.sde, "em", 1.0)
    d = discrete_optimum(pr, grid)
    ev = evaluate(env, FixedScorePolicy(d.score_fn(pr)), grid, tr, 500, pr.beta, EVAL_SEED)
    ref = {"obj": ev.objective, "x": ev.x.reshape(ev.n, -1), "J_ref": d.J, "m_ref": [d.mean], "J_pre": 0.5,
           "m_pre": [0.5]}
    p = crn_point(ev, ref)
    assert p["e_J"] == 0 and p["e_m"] == 0 and p["se_J"] == 0          # the same policy, the same noise
    shifted = type(ev)(ev.x + 0.1, ev.reward + 0.1, ev.kl, ev.beta)     # terminal states moved by 0.1
    p = crn_point(shifted, ref)
    assert abs(p["e_m"] - 0.1 / (d.mean - 0.5)) < 1e-12 and abs(p["e_J"] - 0.1 / (d.J - 0.5)) < 1e-12


@pytest.mark.parametrize("preset", ["gauss1d-linear", "gauss1d-quadratic"])
def test_regret_against_the_exact_grid_optimum(preset):
    """The benchmark's paired regret of the continuous control a* equals its exact regret J*_K - J_K(a*) on
    uniform and power grids (policy_eval), within Z paired standard errors."""
    pr = toy_preset(preset)
    fam = AffineScoreFamily.from_preset(pr)
    star = pe.optimal_family(fam, pr.reward, pr.beta)
    env, tr = ToyEnv(pr), Transition(pr.sde, "em", 1.0)
    n = 3000
    for kind, K in [("uniform", 5), ("power", 5), ("uniform", 20)]:
        grid = eval_grid(kind, K, pr.sde.T)
        exact = discrete_optimum(pr, grid).J - pe.discrete_objective(star, star.zeros(), pr.reward, pr.beta,
                                                                     grid).objective
        d = discrete_optimum(pr, grid)
        ref = evaluate(env, FixedScorePolicy(d.score_fn(pr)), grid, tr, n, pr.beta, EVAL_SEED)
        ev = evaluate(env, FixedScorePolicy(optimal.optimal_score(pr)), grid, tr, n, pr.beta, EVAL_SEED)
        diff = ref.objective - ev.objective
        est, se = float(diff.mean()), float(diff.std()) / math.sqrt(n)
        assert abs(est - exact) <= Z * se + 1e-12, (kind, K, est, exact, se)
        unpaired = math.sqrt(float(ref.objective.var() + ev.objective.var()) / n)
        assert se < 0.5 * unpaired                                       # common random numbers pay off


def test_off_grid_skips_the_training_grid():
    reg = {"uniform-K5": (1.0, 0.0), "uniform-K20": (100.0, 0.0), "power-K20": (3.0, 0.0)}
    assert off_grid(reg) == 2.0


def test_rule_constants():
    assert RULE.tol == 0.03 and RULE.evals == 5


def test_bench_toy_convergence_cli_tiny(tmp_path):
    """End to end in the ci profile with one learning rate (no tuning runs): JSON keys, figure, command."""
    args = ["--profile", "ci", "--seeds", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "fig"),
            "--lrs", "3e-3"]
    r = subprocess.run([sys.executable, "-m", "sacode", "bench", "toy-convergence", *args], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "fig" / "bench-toy-convergence.json").read_text())
    assert res["command"].startswith("python -m sacode bench toy-convergence")
    assert res["rule"] and set(res["ratio_ddpo_over_ctpo"]["gauss1d-linear"]) == {"8", "32"}
    assert {r_["algo"] for r_ in res["rows"]} == {"ctpo", "ddpo"}
    assert all("grad_clipped_frac" in r_ for r_ in res["rows"])
    assert (tmp_path / "fig" / "bench-toy-convergence.png").exists()


@pytest.mark.slow
def test_bench_discretization_cli_tiny(tmp_path):
    args = ["--profile", "ci", "--seeds", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "fig"),
            "--lrs", "3e-3", "--algos", "ctpo"]
    r = subprocess.run([sys.executable, "-m", "sacode", "bench", "discretization", *args], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "fig" / "bench-discretization.json").read_text())
    assert {r_["variant"] for r_ in res["rows"]} == set(res["variants"])
    assert res["exact"]["gauss1d-linear"]["a* (continuous optimum)"]["regret"]["uniform-K200"] < 1e-3


def test_bench_estimator_tiny(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sacode", "bench", "estimator", "--profile", "ci", "--out",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "bench-estimator.json").read_text())
    keys = {"preset", "d", "K", "theta_frac", "algo", "value", "rel_var", "cos", "n"}
    assert res["rows"] and all(keys <= set(row) for row in res["rows"])
    assert {row["value"] for row in res["rows"]} >= {"exact-K", "exact-continuous", "fitted", "training", "none"}
    assert all(abs(row["z"]) < 6 for row in res["rows"] if "z" in row)        # closed forms vs Monte Carlo
    assert "exact-K" in res["ratio_ddpo_over_ctpo"] and (tmp_path / "bench-estimator.png").exists()
