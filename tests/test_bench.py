"""The benchmark CLI runs end to end in a tiny setting and writes its JSON (numbers are not asserted here)."""
import json
import subprocess
import sys


def test_bench_toy_convergence_and_discretization_tiny(tmp_path):
    common = ["--profile", "ci", "--seeds", "1", "--presets", "gauss1d-linear", "--algos", "ctpo,ddpo",
              "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "fig"), "--lrs", "1e-3,3e-3"]
    for name in ["toy-convergence", "discretization"]:
        r = subprocess.run([sys.executable, "-m", "sacode", "bench", name, *common], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads((tmp_path / "fig" / f"bench-{name}.json").read_text())
        assert res["rows"] and res["command"].startswith("python -m sacode bench " + name)
        assert (tmp_path / "fig" / f"bench-{name}.png").exists()
    conv = json.loads((tmp_path / "fig" / "bench-toy-convergence.json").read_text())
    assert {r["algo"] for r in conv["rows"]} == {"ctpo", "ddpo"}
    assert all(t["lr"] in (1e-3, 3e-3) for t in conv["tuning"].values())


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
