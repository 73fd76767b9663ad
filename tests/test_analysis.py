"""Helpers for the training chapters (sacode.analysis)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sacode.theory import optimal as opt
from sacode.analysis import (bench_path, load_bench, load_metrics, moving_average, repo_root, run_training,
                             value_input_grad)
from sacode.envs.toys import ToyEnv
from sacode.engine.value import StructuredValue
from sacode.theory.presets import toy_preset


def test_moving_average():
    assert np.allclose(moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    assert np.allclose(moving_average([5.0], 3), [5.0])
    with pytest.raises(ValueError, match="window"):
        moving_average([1, 2], 0)


def test_bench_paths(monkeypatch, tmp_path):
    assert bench_path("toy-convergence") == repo_root() / "figures" / "bench-toy-convergence.json"
    assert load_bench("no-such-benchmark-name") is None
    monkeypatch.setattr("sacode.analysis.repo_root", lambda: tmp_path)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "bench-x.json").write_text(json.dumps({"rows": [1], "command": "python -m sacode bench x"}))
    assert load_bench("x")["rows"] == [1]


def test_run_training_records_metrics_and_evaluation():
    run = run_training("gauss1d-linear", "ctpo", iterations=2, batch=16, K=5, n_eval=64, profile="ci")
    assert list(run.metrics["iteration"]) == [1.0, 2.0]
    assert run.evaluation.n == 64 and run.evaluation.beta == 0.5
    assert not run.trainer.out.exists()                  # the temporary run directory is removed
    J, se = run.evaluation.J
    assert np.isfinite(J) and se > 0
    assert torch.allclose(run.evaluation.objective, run.evaluation.reward - 0.5 * run.evaluation.kl)
    with pytest.raises(FileNotFoundError, match="metrics"):
        load_metrics(repo_root() / "no-such-run")


def test_value_input_grad_of_the_tweedie_branch_is_the_exact_optimal_gradient():
    """For a linear reward on Gaussian data, grad r(x0_hat) = grad V* exactly (chapter 9), so a structured value with
    its learned branch switched off has input gradient c_skip(t) grad V*(t, x)."""
    p = toy_preset("gauss1d-linear")
    v = StructuredValue(ToyEnv(p))
    for prm in v.correction.parameters():
        torch.nn.init.zeros_(prm)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        c_skip, _ = v.weights(torch.tensor(t, dtype=torch.float64))
        want = c_skip * opt.optimal_value_grad(p, t, x)
        assert torch.allclose(value_input_grad(v, t, x), want, rtol=0, atol=1e-12)
