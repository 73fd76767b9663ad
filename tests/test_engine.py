"""The fine-tuning engine: every algorithm on every toy preset, resume = uninterrupted, log-densities, errors."""
from __future__ import annotations

import json

import pytest
import torch

from sacode.engine.algos import ALGORITHMS, Transitions
from sacode.runs import make_config
from sacode.dynamics.transition import Transition
from sacode.theory.control import rollout
from sacode.engine.trainer import grid_end
from sacode.runs import make_trainer, train
from sacode.theory.presets import TOY_PRESETS
from sacode.dynamics.grid import TimeGrid
from sacode.dynamics.gaussian_step import gaussian_log_prob

TINY = {"iterations": 2, "batch": 32, "eval_batch": 64, "K": 8, "hidden": 16, "progress": False,
        "checkpoint_every": 1}


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("preset", TOY_PRESETS)
def test_every_algorithm_runs_on_every_preset(tmp_path, preset, algo):
    cfg = make_config(preset, algo, "ci", 0, TINY)
    summary = train(cfg, tmp_path)
    for key in ["preset", "algo", "samples_used", "wall_s", "terminal_mean", "terminal_var", "target_mean",
                "target_var", "objective", "objective_opt", "kl_path", "kl_path_opt"]:
        assert key in summary, key
    assert summary["samples_used"] == 2 * 32
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["iteration"] for ln in lines] == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["algo"] == algo


def _params(tr):
    return torch.cat([p.detach().reshape(-1) for p in tr.policy.parameters()])


@pytest.mark.parametrize("algo", ["ctpo", "ddpo"])
def test_resume_equals_uninterrupted_run(tmp_path, algo):
    cfg = make_config("gauss1d-linear", algo, "ci", 3, TINY | {"iterations": 4, "checkpoint_every": 2})
    a = make_trainer(cfg, tmp_path / "a")
    a.run()
    b = make_trainer(cfg.replace(iterations=2), tmp_path / "b")
    b.run()
    c = make_trainer(cfg, tmp_path / "b")           # a new process would do exactly this
    c.load()
    c.run()
    assert torch.equal(_params(a), _params(c))
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "wall_s"}
                       for ln in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "a") == strip(tmp_path / "b")


def test_same_seed_same_result(tmp_path):
    cfg = make_config("mixture2d-linear", "ctpo", "ci", 1, TINY)
    s1, s2 = train(cfg, tmp_path / "1"), train(cfg, tmp_path / "2")
    assert s1["terminal_mean"] == s2["terminal_mean"] and s1["objective"] == s2["objective"]


@pytest.mark.parametrize("method,eta,explore", [("em", 1.0, 0.0), ("ddim", 1.0, 0.0), ("ddim", 0.5, 0.0),
                                                ("pf-heun", 0.0, 0.3)])
def test_recomputed_log_prob_equals_stored(tmp_path, method, eta, explore):
    cfg = make_config("mixture2d-linear", "ctpo", "ci", 0, TINY | {"method": method, "eta": eta, "explore": explore})
    tr = make_trainer(cfg, tmp_path)
    torch.nn.init.normal_(tr.policy.net.net[-1].weight, std=0.1)   # a policy that differs from s_pre
    b = rollout(tr.env, tr.policy, TimeGrid.uniform(1.0, 6, grid_end(cfg, 1.0)), tr.transition, 16,
                torch.Generator().manual_seed(0))
    t = Transitions.from_rollout(b)
    lp = tr.transition.log_prob(tr.policy.score_fn(None), t.x, t.x_next, t.s_cur, t.s_next)
    assert torch.allclose(lp, t.logp_old, rtol=0, atol=1e-10)
    assert (b.kl_steps > 0).all()


def test_kl_of_pretrained_policy_is_zero(tmp_path):
    cfg = make_config("gauss1d-quadratic", "ctpo", "ci", 0, TINY)
    tr = make_trainer(cfg, tmp_path)
    b = rollout(tr.env, tr.policy, TimeGrid.uniform(1.0, 10), tr.transition, 64, torch.Generator().manual_seed(0))
    assert float(b.kl_path.abs().max()) == 0.0
    # the transition log-density is the Gaussian one, summed over dimensions
    mean, std = tr.transition.mean_std(tr.policy.score_fn(None), b.xs[0], b.grid.s[0], b.grid.s[1])
    ref = torch.distributions.Normal(mean, std[:, None] if mean.ndim > 1 else std).log_prob(b.xs[1])
    assert torch.allclose(b.log_probs[0], ref.reshape(64, -1).sum(1), atol=1e-12)


def test_bad_config_key_names_the_key():
    with pytest.raises(KeyError, match="unknown config key 'lrr'"):
        make_config("gauss1d-linear", "ctpo", "ci", 0, {"lrr": "1e-3"})
    with pytest.raises(ValueError, match="algo must be one of ctpo"):
        make_config("gauss1d-linear", "ppo", "ci", 0)


def test_deterministic_sampler_needs_exploration():
    from sacode.dynamics.sde import VPSDE
    with pytest.raises(ValueError, match="explore"):
        Transition(VPSDE(), "pf-heun", 0.0, 0.0)


def test_cli_train_and_resume(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "run"
    base = [sys.executable, "-m", "sacode", "train", "gauss1d-linear", "--algo", "ddpo", "--profile", "ci",
            "--out", str(out), "--no-progress"] + sum([["--set", f"{k}={v}"] for k, v in TINY.items()
                                                      if k != "progress"], [])
    r = subprocess.run(base, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "sacode", "train", "--resume", str(out), "--set", "iterations=3",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["samples_used"] == 3 * 32
    r = subprocess.run([sys.executable, "-m", "sacode", "train", "gauss1d-linear", "--set", "nope=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key 'nope'" in r.stderr


def test_loading_pretrained_models_does_not_consume_the_global_rng():
    """A run's result must not depend on whether a pretrained model was loaded earlier in the process."""
    from sacode.envs.digits.pretrain import load_classifier, load_score_model
    from sacode.envs.toys.pretrained import load_toy_score
    from sacode.theory.presets import toy_preset

    load_score_model.cache_clear()
    load_classifier.cache_clear()
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    load_score_model(), load_classifier(), load_toy_score(toy_preset("gauss1d-linear"))
    assert torch.equal(torch.rand(3), before)
