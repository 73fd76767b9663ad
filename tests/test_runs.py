"""Runs that cannot mix, lose or silently corrupt data: run directories, resuming, atomic files, divergence,
validation and stop signals, each with the fault it guards against injected (the command line is called in-process
unless a separate process is the point)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sacode.cli.train import main as train_main
from sacode.engine.divergence import Diverged, FiniteWatch, RunError, StopSignals
from sacode.engine.files import atomic_write_text, json_line, non_finite_keys, strict_json, write_json
from sacode.engine.rundir import read_checkpoint, read_metrics, save_checkpoint
from sacode.runs import make_config, make_trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = {"iterations": 3, "batch": 16, "eval_batch": 32, "K": 4, "hidden": 8, "checkpoint_every": 1}


def sets(d: dict) -> list[str]:
    return sum([["--set", f"{k}={v}"] for k, v in d.items()], [])


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = train_main([str(a) for a in args] + ["--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def strict_load(text: str):
    """json.loads that refuses NaN and Infinity tokens (what strict JSON readers do)."""
    def bad(tok):
        raise ValueError(f"non-standard JSON token {tok}")
    return json.loads(text, parse_constant=bad)


def strip_wall(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k != "wall_s"} for ln in path.read_text().splitlines()]


def policy_state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=False)["policy"]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------------------
# run directories: a new run never merges into an old one
# ------------------------------------------------------------------------------------------------------------------
def test_new_run_refuses_a_directory_that_holds_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "gauss1d-linear", "--seed", 1, "--profile", "ci", "--out", run, *sets(SMALL))[0] == 0
    before = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "config.json", "summary.json", "checkpoint.pt")}
    rc, _, err = cli(capsys, "gauss1d-quadratic", "--seed", 7, "--profile", "ci", "--out", run, *sets(SMALL))
    msg = one_line_error(err)
    assert rc == 2 and "already holds a run (gauss1d-linear, ctpo, seed 1" in msg
    assert "--overwrite" in msg and f"--resume {run}" in msg
    assert {f: (run / f).read_bytes() for f in before} == before                # nothing touched
    # --overwrite replaces the whole run: only the new run's lines, files and checkpoints remain
    rc, _, _ = cli(capsys, "gauss1d-quadratic", "--seed", 7, "--profile", "ci", "--out", run, "--overwrite",
                   *sets(SMALL | {"iterations": 2}))
    assert rc == 0
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert strict_load((run / "summary.json").read_text())["preset"] == "gauss1d-quadratic"
    assert read_checkpoint(run)["preset"] == "gauss1d-quadratic"
    assert torch.load(run / "checkpoint.prev.pt", weights_only=False)["preset"] == "gauss1d-quadratic"


def test_repeating_a_command_refuses_its_default_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("gauss1d-linear", "--algo", "ddpo", "--profile", "ci", *sets(SMALL | {"iterations": 1}))
    assert cli(capsys, *args)[0] == 0
    assert (tmp_path / "runs" / "gauss1d-linear-ddpo-seed0" / "summary.json").exists()
    rc, _, err = cli(capsys, *args)
    msg = one_line_error(err)
    assert rc == 2 and "runs/gauss1d-linear-ddpo-seed0 already holds a run" in msg and "--overwrite" in msg
    assert "--resume runs/gauss1d-linear-ddpo-seed0" in msg


def test_resume_arguments_must_match_the_stored_run(tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert cli(capsys, "gauss1d-linear", "--profile", "ci", "--out", run, *sets(SMALL))[0] == 0
    rc, _, err = cli(capsys, "mixture2d-linear", "--algo", "ddpo", "--profile", "full",
                     "--out", elsewhere, "--resume", run)
    msg = one_line_error(err)
    assert rc == 2
    for part in ("PRESET mixture2d-linear (the run's: gauss1d-linear)", "--algo ddpo (the run's: ctpo)",
                 "--profile full (the run's: ci)", f"--out {elsewhere}"):
        assert part in msg, (part, msg)
    assert not elsewhere.exists()
    rc, _, err = cli(capsys, "--resume", run, "--seed", 4)
    assert rc == 2 and "--seed 4 (the run's: 0)" in err
    rc, _, err = cli(capsys, "--resume", run, "--set", "lr=1")                   # would change what was trained
    assert rc == 2 and "lr cannot change when resuming" in err and "iterations" in err
    rc, _, err = cli(capsys, "--resume", run, "--overwrite")
    assert rc == 2 and "give one of them" in err
    # the matching arguments and more iterations are fine
    rc, _, err = cli(capsys, "gauss1d-linear", "--algo", "ctpo", "--seed", 0, "--out", run, "--resume", run,
                     "--set", "iterations=4")
    assert rc == 0, err
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    rc, out, _ = cli(capsys, "--resume", run, "--show-config")
    assert rc == 0 and "stored run" in out


def test_a_checkpoint_of_another_run_is_refused(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cli(capsys, "gauss1d-linear", "--profile", "ci", "--out", a, *sets(SMALL))
    cli(capsys, "gauss1d-quadratic", "--profile", "ci", "--out", b, *sets(SMALL))       # same network shapes
    cli(capsys, "gauss1d-linear", "--profile", "ci", "--out", c, *sets(SMALL | {"lr": 0.01}))
    for other, diff in ((b, "preset 'gauss1d-quadratic' (checkpoint) vs 'gauss1d-linear' (run)"),
                        (c, "lr 0.01 (checkpoint) vs 0.003 (run)")):
        (a / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
        rc, _, err = cli(capsys, "--resume", a, "--set", "iterations=5")
        msg = one_line_error(err)
        assert rc == 2 and "belongs to another run" in msg and diff in msg, msg


# ------------------------------------------------------------------------------------------------------------------
# atomic, recoverable files
# ------------------------------------------------------------------------------------------------------------------
def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    p = tmp_path / "summary.json"
    write_json(p, {"a": 1})

    def half_then_fail(f):
        f.write(b'{"a": ')
        raise OSError(27, "File too large")

    from sacode.engine.files import atomic_write
    with pytest.raises(OSError):
        atomic_write(p, half_then_fail)
    assert strict_load(p.read_text()) == {"a": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["summary.json"]          # no temporary file left


def test_strict_json_maps_non_finite_numbers_to_null(tmp_path):
    rec = {"a": float("inf"), "b": [1.0, float("nan")], "c": {"d": -float("inf")}, "e": 2}
    assert non_finite_keys(rec) == ["a", "b[1]", "c.d"]
    assert strict_load(json_line(rec)) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2}
    assert strict_json(rec)["e"] == 2
    with pytest.raises(ValueError):                                   # the reader used by these tests is strict
        strict_load(json.dumps(rec))


def test_failed_checkpoint_write_keeps_the_previous_and_resume_is_exact(tmp_path, monkeypatch):
    """torch.save raises half-way through the second checkpoint: the first stays intact, the run stops with a
    message, and resuming from it gives exactly the uninterrupted run."""
    cfg = make_config("gauss1d-linear", "ctpo", "ci", 3, SMALL | {"iterations": 6, "checkpoint_every": 2,
                                                                    "progress": False})
    make_trainer(cfg, tmp_path / "a").run()
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RunError, match=r"could not write .*checkpoint.pt at iteration 4 .*No space left.*"
                                       r"checkpoint of iteration 2 is intact"):
        make_trainer(cfg, tmp_path / "b").run()
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint(tmp_path / "b")["iteration"] == 2
    assert not [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]     # no partial files
    c = make_trainer(cfg, tmp_path / "b")
    c.load()
    c.run()
    assert same_state(policy_state(tmp_path / "a"), policy_state(tmp_path / "b"))
    assert strip_wall(tmp_path / "a" / "metrics.jsonl") == strip_wall(tmp_path / "b" / "metrics.jsonl")


def test_a_file_size_limit_gives_one_line_and_leaves_no_partial_file(tmp_path, capsys):
    """The issue's `ulimit -f` case in a real process: the checkpoint write fails with EFBIG; the run stops with
    one line (rc 2), no partial checkpoint is left, and --resume says there is nothing to resume from."""
    import resource

    run = tmp_path / "run"
    limit = 8000                                    # bytes: config and metrics fit, a checkpoint (~18 kB) does not
    cmd = [sys.executable, "-m", "sacode", "train", "gauss1d-linear", "--algo", "ddpo", "--profile", "ci", "--out",
           str(run), "--no-progress", *sets(SMALL | {"iterations": 8, "checkpoint_every": 4})]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    msg = one_line_error(r.stderr)
    assert r.returncode == 2 and f"could not write {run / 'checkpoint.pt'} at iteration 4" in msg, r.stderr
    assert "File too large" in msg and "--overwrite" in msg
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl"]       # nothing partial
    rc, _, err = cli(capsys, "--resume", run)
    assert rc == 2 and "stopped before its first checkpoint" in one_line_error(err)


def test_save_checkpoint_keeps_the_previous_one(tmp_path):
    for it in (1, 2, 3):
        save_checkpoint({"iteration": it}, tmp_path / "checkpoint.pt")
    assert read_checkpoint(tmp_path)["iteration"] == 3
    assert torch.load(tmp_path / "checkpoint.prev.pt")["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_corrupted_checkpoint_names_the_file_and_the_fallback(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert cli(capsys, "gauss1d-linear", "--algo", "ddpo", "--profile", "ci", "--out", run, *sets(SMALL))[0] == 0
    ck = run / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    rc, _, err = cli(capsys, "--resume", run, "--set", "iterations=4")
    msg = one_line_error(err)
    assert rc == 2 and f"{ck} cannot be read" in msg
    assert f"{run / 'checkpoint.prev.pt'} (iteration 2) is intact" in msg and "mv " in msg
    os.replace(run / "checkpoint.prev.pt", ck)                       # what the message says to do
    rc, _, err = cli(capsys, "--resume", run, "--set", "iterations=4")
    assert rc == 0, err
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    # without a readable fallback the message says to start again
    ck.write_bytes(b"garbage")
    (run / "checkpoint.prev.pt").unlink()
    rc, _, err = cli(capsys, "--resume", run, "--set", "iterations=5")
    assert rc == 2 and "no previous checkpoint" in one_line_error(err) and "--overwrite" in err


def test_truncated_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    cfg = make_config("gauss1d-linear", "ddpo", "ci", 0, SMALL | {"iterations": 4, "progress": False})
    make_trainer(cfg, tmp_path / "a").run()
    run = tmp_path / "b"
    assert cli(capsys, "gauss1d-linear", "--algo", "ddpo", "--profile", "ci", "--out", run,
               *sets(SMALL | {"iterations": 2}))[0] == 0
    with open(run / "metrics.jsonl", "a") as f:                       # a crash in the middle of writing line 3
        f.write('{"iteration": 3, "samples_used": 48, "wall_s": 0.1, "rew')
    rc, _, err = cli(capsys, "--resume", run, "--set", "iterations=4")
    assert rc == 0, err
    assert "warning:" in err and "metrics.jsonl: dropped its truncated last line 3" in err
    assert strip_wall(tmp_path / "a" / "metrics.jsonl") == strip_wall(run / "metrics.jsonl")
    # an unreadable line that is not the last is an error naming the file and the line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rc, _, err = cli(capsys, "--resume", run, "--set", "iterations=5")
    msg = one_line_error(err)
    assert rc == 2 and f"{run / 'metrics.jsonl'} line 2 cannot be read" in msg


# ------------------------------------------------------------------------------------------------------------------
# divergence: stop at the first non-finite value, say where, keep the record strict
# ------------------------------------------------------------------------------------------------------------------
ALGOS = ["ctpo", "ctpo-pathwise", "ddpo", "dpok", "backprop"]


def _nan_rewards_from(trainer, start: int):
    """Make the environment's reward NaN for one sample from iteration ``start`` on (a fault in the data)."""
    env, orig = trainer.env, trainer.env.reward

    def reward(x, cond=None):
        r = orig(x, cond)
        if trainer.iteration + 1 >= start:
            r = r.clone()
            r.view(-1)[0] = float("nan")
        return r
    env.reward = reward


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_stops_at_the_first_non_finite_loss(tmp_path, algo):
    cfg = make_config("gauss1d-linear", algo, "ci", 0, SMALL | {"iterations": 4, "progress": False})
    tr = make_trainer(cfg, tmp_path)
    _nan_rewards_from(tr, 3)
    with pytest.raises(Diverged) as info:
        tr.run()
    e = info.value
    assert e.iteration == 3 and "loss" in e.quantity and "nan" in str(e)
    assert str(e).startswith("training diverged at iteration 3") and "try a smaller" in str(e)
    summary = strict_load((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["iteration"] == 3
    assert summary["last_finite_metrics"]["iteration"] == 2 and non_finite_keys(summary) == []
    assert [r["iteration"] for r in map(strict_load, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert read_checkpoint(tmp_path)["iteration"] == 2                           # finite parameters kept


@pytest.mark.parametrize("algo", ["ctpo", "ctpo-pathwise", "dpok", "backprop"])
def test_divergence_from_a_huge_learning_rate_is_one_line_and_strict_json(tmp_path, capsys, algo):
    """lr = 10 (the issue's reproduction): rc 3, one line naming the iteration, summary.json strict JSON. (ddpo's
    clipped, gradient-clipped steps keep it finite for these 8 iterations: its policy grows without overflowing; the
    final-evaluation check below and the injected faults above cover it.)"""
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "gauss1d-linear", "--algo", algo, "--profile", "ci", "--out", run,
                     *sets(SMALL | {"lr": 10, "batch": 32, "iterations": 8, "checkpoint_every": 4}))
    msg = one_line_error(err)
    assert rc == 3 and msg.startswith("error: training diverged at iteration") and "lr (now 10)" in msg, msg
    summary = strict_load((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["quantity"] in msg
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        strict_load(ln)


def test_a_non_finite_final_evaluation_is_divergence(tmp_path):
    """The issue's backprop run ended with objective_se = Infinity in summary.json: now status "diverged"."""
    cfg = make_config("gauss1d-linear", "ddpo", "ci", 0, SMALL | {"iterations": 2, "progress": False})
    tr = make_trainer(cfg, tmp_path)
    summary = tr.task.summary
    tr.task.summary = lambda ev: summary(ev) | {"objective_se": float("inf")}
    with pytest.raises(Diverged, match="at iteration 2: the final evaluation's objective_se is inf"):
        tr.run()
    s = strict_load((tmp_path / "summary.json").read_text())
    assert s["status"] == "diverged" and s["diverged"]["value"] is None and s["iterations"] == 2


def test_non_finite_parameters_and_rollouts_are_caught(tmp_path):
    """A parameter that becomes NaN: the next rollout's state is non-finite and the run stops there."""
    cfg = make_config("gauss1d-linear", "ddpo", "ci", 0, SMALL | {"iterations": 4, "progress": False})
    tr = make_trainer(cfg, tmp_path)

    def poison(t):
        if t.iteration == 1:
            with torch.no_grad():
                next(t.policy.parameters()).fill_(float("nan"))
    with pytest.raises(Diverged, match="at iteration 2: the rollout's state"):
        tr.run(callback=poison)


def test_finite_watch_checks_loss_gradient_and_parameters():
    w = FiniteWatch("policy")
    w.loss(torch.tensor(1.0))
    w.gradients(torch.tensor(0.5))                                  # all finite: nothing happens
    w.parameters([torch.ones(3)])
    w.loss(torch.tensor(float("inf")))
    with pytest.raises(Diverged, match="policy loss is inf"):
        w.gradients(torch.tensor(0.5))
    with pytest.raises(Diverged, match="policy gradient norm is nan"):
        w.gradients(torch.tensor(float("nan")))
    with pytest.raises(Diverged, match="policy parameters became non-finite"):
        w.parameters([torch.ones(3), torch.tensor([0.0, float("-inf")])])


# ------------------------------------------------------------------------------------------------------------------
# validation before anything is created
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,key", [("batch=0", "batch must be an integer >= 1"),
                                     ("batch=-3", "batch must be an integer >= 1"),
                                     ("checkpoint_every=0", "checkpoint_every must be an integer >= 1"),
                                     ("iterations=-2", "iterations must be an integer >= 1"),
                                     ("lr=-1", "lr must be a number > 0"),
                                     ("lr=nan", "lr must be a number > 0"),
                                     ("K=0", "K must be an integer >= 1"),
                                     ("beta=-1", "beta must be a number >= 0"),
                                     ("eval_batch=0", "eval_batch must be an integer >= 1"),
                                     ("options=x", "unknown config key 'options'"),
                                     ("batch=1.5", "batch must be an integer")])
def test_invalid_values_fail_before_anything_is_created(tmp_path, capsys, bad, key):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "gauss1d-linear", "--profile", "ci", "--out", run, "--set", bad)
    assert rc == 2 and key in one_line_error(err) and not run.exists()


def test_a_run_that_fails_in_its_first_iteration_leaves_no_directory(tmp_path):
    cfg = make_config("gauss1d-linear", "ddpo", "ci", 0, SMALL | {"progress": False})
    tr = make_trainer(cfg, tmp_path / "run")

    def broken(batch, gen):
        raise RuntimeError("a bug in the update")
    tr.algo.update = broken
    with pytest.raises(RuntimeError, match="a bug"):
        tr.run()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------------
# signals
# ------------------------------------------------------------------------------------------------------------------
def test_stop_signals_set_a_flag_and_a_second_ctrl_c_stops_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_writes_a_checkpoint_and_resume_equals_the_uninterrupted_run(tmp_path):
    over = SMALL | {"iterations": 40, "checkpoint_every": 1000}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sacode", "train", "gauss1d-linear", "--algo", "ddpo", "--profile", "ci",
           "--out", str(run), "--no-progress", *sets(over)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted by SIGTERM after iteration" in err and f"--resume {run}" in err
    stopped = read_checkpoint(run)["iteration"]
    assert 3 <= stopped < over["iterations"]
    assert [r["iteration"] for r in read_metrics(metrics)] == list(range(1, stopped + 1))
    r = subprocess.run([sys.executable, "-m", "sacode", "train", "--resume", str(run), "--no-progress"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    cfg = make_config("gauss1d-linear", "ddpo", "ci", 0, over | {"progress": False})
    make_trainer(cfg, tmp_path / "whole").run()
    assert same_state(policy_state(tmp_path / "whole"), policy_state(run))
    assert strip_wall(tmp_path / "whole" / "metrics.jsonl") == strip_wall(metrics)
    a, b = (strict_load((d / "summary.json").read_text()) for d in (tmp_path / "whole", run))
    assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}
