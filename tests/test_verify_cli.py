"""The `python -m sacode verify` contract (README, the closed-form checks).

Only the fast `dsm` subset runs here as a subprocess; the full verify run is a separate step of `make test`.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sacode.verify as verify
from sacode.verify import CheckResult

REPO = Path(__file__).resolve().parents[1]
KEYS = {"name", "kind", "computed", "closed_form", "tol", "ok", "note"}
SUMMARY = r"\d+ verified \((\d+) exact, (\d+) monte-carlo, (\d+) order\), \d+ identities, \d+ failed"


def _run(*args: str) -> subprocess.CompletedProcess:
    # one intra-op thread, as in conftest: small tensor ops on a shared 2-core machine run faster that way
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sacode", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def dsm_json():
    return _run("verify", "--json", "--only", "dsm")


def test_verify_json_subset(dsm_json):
    assert dsm_json.returncode == 0, dsm_json.stderr
    rows = json.loads(dsm_json.stdout)
    assert isinstance(rows, list) and rows
    for r in rows:
        assert KEYS <= set(r), r
        assert "dsm" in r["name"]
        assert isinstance(r["ok"], bool) and r["ok"] is True
        for k in ("computed", "closed_form", "tol"):
            assert isinstance(r[k], float) and math.isfinite(r[k])
        assert r["tol"] > 0
        assert abs(r["computed"] - r["closed_form"]) <= r["tol"]
        assert r["kind"] == "monte-carlo"                  # the DSM loss of the exact score, sampled
        assert r["z"] <= 5 and r["tol"] <= r["z"] * r["se"] * (1 + 1e-12)


def test_verify_table_subset(dsm_json):
    res = _run("verify", "--only", "dsm")
    assert res.returncode == 0, res.stderr
    n_rows = len(json.loads(dsm_json.stdout))
    lines = res.stdout.strip().splitlines()
    summary = [ln for ln in lines if re.fullmatch(SUMMARY, ln.strip())]
    assert summary == [f"{n_rows} verified (0 exact, {n_rows} monte-carlo, 0 order), 0 identities, 0 failed"], \
        res.stdout
    # the summary closes the table: only the timing line may follow it
    after = lines[lines.index(summary[0]) + 1:]
    assert all(re.fullmatch(r"\(\d+(\.\d+)? s\)", ln.strip()) for ln in after), after
    assert sum("PASS" in ln for ln in lines) == n_rows


def test_verify_unknown_check_fails_with_message():
    res = _run("verify", "--only", "nonexistent")
    assert res.returncode != 0
    assert "no check matches 'nonexistent'" in res.stderr
    assert "available:" in res.stderr


def test_sacode_without_command_prints_usage(capsys):
    from sacode.cli import main
    assert main([]) != 0
    assert "usage: python -m sacode" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_failing_check_makes_exit_code_nonzero(monkeypatch, capsys):
    """In-process: a registered check whose value misses its closed form turns the exit code to 1."""
    verify.registry()                                  # import the check modules first
    monkeypatch.setitem(verify._REGISTRY, "zz-test-failing", lambda: CheckResult.compare("zz-test-failing",
                                                                                         1.0, 0.0, 0.5, kind="exact"))
    assert verify.main(["--only", "zz-test-failing"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "0 verified (0 exact, 0 monte-carlo, 0 order), 0 identities, 1 failed" in out


def test_check_result_compare():
    assert CheckResult.compare("a", 1.0, 1.2, 0.25, kind="exact").ok
    assert not CheckResult.compare("a", 1.0, 1.3, 0.25, kind="order").ok
    assert not CheckResult.compare("a", float("nan"), 1.0, 0.25, kind="exact").ok


def test_check_kinds():
    """Every row says what it is; a Monte-Carlo row's tolerance is z se and nothing else."""
    r = CheckResult.monte_carlo("a", 1.0, 1.1, 0.03)
    assert r.kind == "monte-carlo" and r.tol == verify.Z * 0.03 and r.ok and r.as_dict()["se"] == 0.03
    assert not CheckResult.monte_carlo("a", 1.0, 1.2, 0.03).ok
    assert "se" not in CheckResult.compare("a", 1.0, 1.0, 0.0, kind="exact").as_dict()
    with pytest.raises(ValueError, match="kind must be one of"):
        CheckResult.compare("a", 1.0, 1.0, 0.1, kind="approximate")
    with pytest.raises(ValueError, match="monte_carlo"):
        CheckResult.compare("a", 1.0, 1.0, 0.1, kind="monte-carlo")
    assert CheckResult.sampled("a", 1.0, 1.0, 0.0, 1e-12).kind == "exact"       # SE 0: every sample agrees
    rows = [CheckResult.compare("e", 0, 0, 1, kind="exact"), CheckResult.monte_carlo("m", 0, 0, 1),
            CheckResult.compare("o", 0, 0, 1, kind="order"), CheckResult.compare("i", 0, 0, 1, kind="identity"),
            CheckResult.compare("f", 0, 2, 1, kind="order")]
    assert verify.summary_line(rows) == "3 verified (1 exact, 1 monte-carlo, 1 order), 1 identities, 1 failed"
