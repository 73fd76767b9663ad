"""The training loop: rollouts -> algorithm updates, with metrics.jsonl, checkpoints and exact resume.

All randomness after initialisation comes from one ``torch.Generator`` whose state is checkpointed, so
``--resume DIR`` continues a run and yields the same result as an uninterrupted run with the same seed. The files of a
run are described in :mod:`sacode.engine.rundir` (written atomically, read back with one-line errors); a run stops at
the first non-finite value (:class:`~sacode.engine.divergence.Diverged`) and, when asked, at the first iteration
boundary after Ctrl-C or SIGTERM (:class:`~sacode.engine.divergence.Interrupted`). The trainer
is handed its task (:mod:`sacode.runs` builds one from a preset name); it knows nothing about toys, digits or
Stable Diffusion.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..dynamics.grid import TimeGrid, default_s_end
from ..dynamics.transition import Transition
from ..theory.control import Rollout, rollout
from .algos import make_algorithm
from .config import RESUME_KEYS, TrainConfig
from .divergence import Diverged, Interrupted, RunError, StopSignals
from .files import json_line, non_finite_keys, write_json
from .rundir import (CKPT, CONFIG, METRICS, SUMMARY, clear_run, holds_run, read_checkpoint, read_metrics, rewrite_metrics,
                     save_checkpoint, warn)
from .task import Task


def grid_end(cfg: TrainConfig, T: float) -> float:
    """The last diffusion time of the run's grids: ``cfg.s_end``, else the method's default (1e-3 T for ddim)."""
    return float(cfg.s_end) if cfg.s_end is not None else default_s_end(cfg.method, T)


def training_grid(cfg: TrainConfig, env, gen: torch.Generator, K: int | None = None) -> TimeGrid:
    """The grid of one training iteration (``cfg.grid``; ``random`` draws a fresh one from ``gen``, with a number of
    steps drawn from K..random_K_max when ``cfg.random_K_max > K``)."""
    if K is None and cfg.grid == "random" and cfg.random_K_max > cfg.K:
        K = int(torch.randint(cfg.K, cfg.random_K_max + 1, (1,), generator=gen))
    K, T = K or cfg.K, env.sde.T
    s_end = grid_end(cfg, T)
    if cfg.grid == "native":                 # the environment's own grid, e.g. a diffusers scheduler's timesteps
        grid = env.time_grid(K)
        if grid is None:
            raise ValueError("grid=native needs an environment with its own time grid (e.g. Stable Diffusion's "
                             "scheduler); use uniform, power or random")
        return grid
    if cfg.grid == "uniform":
        return TimeGrid.uniform(T, K, s_end)
    if cfg.grid == "power":
        return TimeGrid.power(T, K, s_end=s_end)
    if cfg.grid == "random":
        return TimeGrid.random(T, K, gen, s_end=s_end)
    raise ValueError(f"unknown grid {cfg.grid!r}; use uniform, power, random or native")


def evaluation_grid(cfg: TrainConfig, env, K: int | None = None) -> TimeGrid:
    """The grid evaluations use: the environment's own for ``grid=native``, else uniform with the run's s_end."""
    K = K or cfg.K
    if cfg.grid == "native":
        return env.time_grid(K)
    return TimeGrid.uniform(env.sde.T, K, grid_end(cfg, env.sde.T))


def make_accelerator(task: Task):
    """Hugging Face accelerate for tasks that ask for it (``task.accelerate`` holds Accelerator keyword arguments)
    and for any run started by ``accelerate launch`` or torchrun (WORLD_SIZE > 1); None otherwise, so single-process
    toy runs do not touch it."""
    kw = task.accelerate
    if kw is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(**(kw if kw is not None else {"cpu": True}))


RANK_SEED_STRIDE = 1_000_003     # rank r draws its rollouts from seed + 1 + r * stride (rank 0: seed + 1)


class Trainer:
    """One fine-tuning run of ``task`` (its configuration is ``task.cfg``) writing into ``out``.

    The policy and value networks are initialised from the global torch RNG: :func:`sacode.runs.make_trainer` seeds
    it with the run's seed before it builds the task, so a run is reproducible from its configuration.
    """

    def __init__(self, task: Task, out: str | Path):
        self.task, self.out = task, Path(out)
        self.env = task.env
        cfg = self.cfg = task.cfg.replace(beta=task.beta)
        self.policy = task.make_policy(cfg)
        self.transition = Transition(self.env.sde, cfg.method, cfg.eta, cfg.explore)
        self.algo = make_algorithm(cfg.algo, self.env, self.policy, cfg, self.transition)
        self.accelerator = make_accelerator(self.task)
        self.rank, self.world = 0, 1
        if self.accelerator is not None:
            self.algo.attach(self.accelerator)
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.gen = torch.Generator().manual_seed(cfg.seed + 1 + RANK_SEED_STRIDE * self.rank)
        self.iteration, self.samples_used, self.wall = 0, 0, 0.0
        self.saved_iteration = 0
        self.last_record: dict | None = None        # the last iteration's metrics (finite: they are checked)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _gather(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.world == 1 else self.accelerator.gather(v)

    # ----- persistence ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """What a checkpoint holds: progress, the policy (what :meth:`ScorePolicy.checkpoint_state` returns, e.g. only
        its LoRA matrices), the algorithm's optimisers and value network, the generator, and the run's identity
        (preset, algorithm and :meth:`TrainConfig.digest`, checked by :meth:`load`)."""
        cfg = self.cfg
        return {"iteration": self.iteration, "samples_used": self.samples_used, "wall": self.wall,
                "policy": self.policy.checkpoint_state(), "algo": self.algo.state_dict(), "gen": self.gen.get_state(),
                "preset": cfg.preset, "algo_name": cfg.algo, "digest": cfg.digest(), "config": cfg.to_dict()}

    def save(self) -> None:
        """checkpoint.pt (main process) and, when distributed, each other rank's generator in rng-rankR.pt; written
        atomically, the previous checkpoint kept as checkpoint.prev.pt (:func:`sacode.engine.rundir.save_checkpoint`).
        A failed write raises :class:`RunError` and leaves the previous checkpoint in place."""
        if self.world > 1:
            self.accelerator.wait_for_everyone()
        path = self.out / (CKPT if self.is_main else f"rng-rank{self.rank}.pt")
        state = (self.checkpoint_state() if self.is_main else
                 {"iteration": self.iteration, "gen": self.gen.get_state()})
        try:
            save_checkpoint(state, path)
        except (OSError, RuntimeError) as e:        # torch's zip writer turns a failed write into a RuntimeError
            cause = e
            while not isinstance(cause, OSError) and (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__
            raise self._write_failed(path, cause) from e
        self.saved_iteration = self.iteration

    def _write_failed(self, path: Path, e: BaseException) -> RunError:
        intact = (f"the checkpoint of iteration {self.saved_iteration} is intact: free the space and continue with "
                  f"--resume {self.out}" if self.saved_iteration else "no checkpoint was written yet: free the space and start "
                  "again with --overwrite")
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        return RunError(f"could not write {path} at iteration {self.iteration} ({type(e).__name__}: {why}); {intact}")

    def load(self) -> None:
        """Continue from the checkpoint in ``out`` (an unreadable one raises :class:`RunError` naming the fallback).
        The checkpoint must come from this run: same preset, algorithm and configuration digest (keys in
        ``RESUME_KEYS``, e.g. iterations, may differ). Metrics logged after the checkpoint are dropped: the resumed
        run writes them again, exactly."""
        ck = read_checkpoint(self.out)
        self._check_identity(ck)
        if ck["iteration"] > self.cfg.iterations:
            raise RunError(f"the run in {self.out} is at iteration {ck['iteration']}; iterations must be at least that "
                           f"(got {self.cfg.iterations})")
        self.policy.load_checkpoint_state(ck["policy"])
        self.algo.load_state_dict(ck["algo"])
        self.gen.set_state(ck["gen"] if self.is_main else read_checkpoint(self.out, f"rng-rank{self.rank}.pt")["gen"])
        self.iteration, self.samples_used, self.wall = ck["iteration"], ck["samples_used"], ck["wall"]
        self.saved_iteration = self.iteration
        if self.is_main:
            mpath = self.out / METRICS
            rows = read_metrics(mpath)
            keep = [r for r in rows if r["iteration"] <= self.iteration]
            if [r["iteration"] for r in keep] != list(range(1, self.iteration + 1)):
                warn(f"{mpath} does not hold one record for each of the checkpoint's {self.iteration} iterations "
                     f"(it has {len(keep)}); the resumed run appends after them")
            rewrite_metrics(mpath, keep)

    def _check_identity(self, ck: dict) -> None:
        path = self.out / CKPT
        stored = dict(ck.get("config") or {})
        digest = ck.get("digest")
        if digest is None:                                  # a checkpoint from before digests: compare the configs
            try:
                digest = TrainConfig(**stored).digest()
            except TypeError:
                digest = ""
        if digest == self.cfg.digest():
            return
        now = self.cfg.to_dict()
        diffs = [f"{k} {stored.get(k)!r} (checkpoint) vs {now.get(k)!r} (run)" for k in sorted(set(stored) | set(now))
                 if k not in RESUME_KEYS and stored.get(k) != now.get(k)]
        raise RunError(f"{path} belongs to another run than {self.out / CONFIG} describes: "
                       f"{'; '.join(diffs) or 'configuration digest differs'}. Resume the run the checkpoint came "
                       f"from, or start this one again with --overwrite")

    # ----- the loop ------------------------------------------------------------------------------
    def step(self) -> dict:
        """One iteration: a batch of rollouts, the algorithm's update, and the iteration's metrics record. Raises
        :class:`Diverged` at the first non-finite loss, gradient, parameter, state or logged metric."""
        cfg = self.cfg
        t0 = time.perf_counter()
        grid = training_grid(cfg, self.env, self.gen)
        try:
            batch = rollout(self.env, self.policy, grid, self.transition, cfg.batch, self.gen)
        except FloatingPointError as e:
            raise Diverged(f"the rollout's state ({str(e).split(';')[0]})") from e
        info = self.algo.update(batch, self.gen)
        rewards, kl_path = self._gather(batch.rewards), self._gather(batch.kl_path)   # all processes
        obj = rewards - self.algo.beta * kl_path
        rec = {"iteration": self.iteration + 1, "samples_used": self.samples_used + batch.n * self.world,
               "wall_s": self.wall + time.perf_counter() - t0,
               "reward": float(rewards.mean()), "kl_path": float(kl_path.mean()),
               "objective": float(obj.mean())}
        if batch.xs[-1][0].numel() <= 1024:                # not for image latents
            rec["terminal_mean"] = batch.xs[-1].reshape(batch.n, -1).mean(0).tolist()
        rec |= info
        bad = non_finite_keys(rec)
        if bad:
            raise Diverged(f"the logged {bad[0]}", _number(rec.get(bad[0])))
        self.iteration, self.samples_used, self.wall = rec["iteration"], rec["samples_used"], rec["wall_s"]
        rec |= self.task.iteration_metrics(batch)        # task hooks (no-ops by default): image quality,
        rec |= self.task.on_iteration(self, batch) or {}   # image grids, evaluations at other step counts
        return rec

    def run(self, callback=None, stop_on_signals: bool = False) -> dict:
        """Train to ``cfg.iterations``; ``callback(trainer)`` runs after every iteration (e.g. evaluations).

        A fresh trainer (iteration 0) starts a new run in ``out``: the files of any run there are replaced (the
        command line refuses such a directory unless ``--overwrite``). With ``stop_on_signals``, Ctrl-C or SIGTERM
        stops at the next iteration boundary after writing a checkpoint (:class:`Interrupted`). Divergence raises
        :class:`Diverged` after writing ``summary.json`` with ``"status": "diverged"``; a run that fails before its
        first iteration removes the directory it created.
        """
        cfg = self.cfg
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            if self.iteration == 0 and holds_run(self.out):      # a new run replaces the old one, never merges
                clear_run(self.out, tuple(self.task.artifacts))
            write_json(self.out / CONFIG, cfg.to_dict())
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not (cfg.progress and self.is_main),
                   desc=f"{cfg.algo} on {cfg.preset}")
        try:
            with StopSignals(stop_on_signals) as stop, \
                    open(self.out / (METRICS if self.is_main else os.devnull), "a") as mf:
                while self.iteration < cfg.iterations:
                    rec = self.step()
                    try:
                        mf.write(json_line(rec) + "\n")
                        mf.flush()
                    except OSError as e:
                        raise self._write_failed(self.out / METRICS, e) from e
                    self.last_record = rec
                    bar.update(1)
                    bar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl_path']:.3f}")
                    signame = self._stop_requested(stop) if stop_on_signals else None
                    if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations or signame:
                        self.save()
                    if signame:
                        raise Interrupted(signame, self.iteration, str(self.out / CKPT))
                    if callback is not None:
                        callback(self)
        except Diverged as e:
            self._diverged(e, self.iteration + 1)
            raise
        except BaseException:
            if created and self.iteration == 0 and self.is_main:
                shutil.rmtree(self.out, ignore_errors=True)        # a failed start leaves nothing behind
            raise
        finally:
            bar.close()
        return self.finish()

    def _stop_requested(self, stop: StopSignals) -> str | None:
        """The signal received by this process or, when distributed, by any process (all stop together)."""
        name = stop.received
        if self.world > 1:
            flag = torch.tensor([1.0 if name else 0.0], device=self.accelerator.device)
            if float(self.accelerator.reduce(flag, "sum")) > 0:
                name = name or "a signal to another process"
        return name

    def _diverged(self, e: Diverged, iteration: int) -> None:
        """Complete the error message (iteration, remedy) and write summary.json with status "diverged"."""
        e.iteration = iteration
        knobs = dict.fromkeys([e.knob, "lr"])             # the failing optimiser's rate first, then the policy's
        rates = " or ".join(f"{k} (now {getattr(self.cfg, k):g})" for k in knobs)
        e.args = (f"{e.describe()}; try a smaller {rates} with --set and start again with --overwrite; last finite "
                  f"metrics in {self.out / SUMMARY}",)
        if self.is_main:
            summary = self._identity() | {
                "status": "diverged", "samples_used": self.samples_used, "wall_s": self.wall,
                "iterations": self.iteration,
                "diverged": {"iteration": iteration, "quantity": e.quantity, "value": e.value, "message": str(e)},
                "last_finite_metrics": self.last_record}
            write_json(self.out / SUMMARY, summary)

    def _identity(self) -> dict:
        return {"preset": self.cfg.preset, "algo": self.cfg.algo, "seed": self.cfg.seed}

    @torch.no_grad()
    def evaluate(self, n: int | None = None, grid: TimeGrid | None = None, seed: int | None = None) -> Rollout:
        """A fresh rollout of the current policy (its own seeded generator, so evaluation never perturbs training)."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 10_000 if seed is None else seed)
        grid = evaluation_grid(self.cfg, self.env) if grid is None else grid
        return rollout(self.env, self.policy, grid, self.transition, n or self.cfg.eval_batch, gen)

    def finish(self) -> dict:
        """Evaluate the trained policy and write summary.json (``"status": "completed"``) and the task's artifacts. An
        evaluation with non-finite statistics counts as divergence (:class:`Diverged`, status "diverged")."""
        try:
            ev = self.evaluate()
        except FloatingPointError as e:
            err = Diverged(f"the final evaluation's state ({str(e).split(';')[0]})")
            self._diverged(err, self.iteration)
            raise err from e
        summary = self._identity() | {
            "status": "completed", "samples_used": self.samples_used, "wall_s": self.wall,
            "iterations": self.iteration, "K": self.cfg.K, "method": self.cfg.method, "eta": self.cfg.eta}
        summary |= self.task.summary(ev)
        bad = non_finite_keys(summary)
        if bad:
            err = Diverged(f"the final evaluation's {', '.join(bad)}", _number(summary.get(bad[0])))
            self._diverged(err, self.iteration)
            raise err
        if self.is_main:
            write_json(self.out / SUMMARY, summary)
            self.task.write_artifacts(self.out, ev)
        return summary


def _number(v) -> float | None:
    return v if isinstance(v, float) else None
