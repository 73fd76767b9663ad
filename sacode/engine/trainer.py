"""The training loop: rollouts -> algorithm updates, with metrics.jsonl, checkpoints and exact resume.

All randomness after initialisation comes from one ``torch.Generator`` whose state is checkpointed, so
``--resume DIR`` continues a run and yields the same result as an uninterrupted run with the same seed. The trainer
is handed its task (:mod:`sacode.runs` builds one from a preset name); it knows nothing about toys, digits or
Stable Diffusion.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..dynamics.grid import TimeGrid, default_s_end
from ..dynamics.transition import Transition
from ..theory.control import Rollout, rollout
from .algos import make_algorithm
from .config import TrainConfig
from .task import Task

CKPT = "checkpoint.pt"


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _gather(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.world == 1 else self.accelerator.gather(v)

    # ----- persistence ---------------------------------------------------------------------------
    def save(self) -> None:
        """checkpoint.pt (main process) and, when distributed, each other rank's generator in rng-rankR.pt. The
        policy stores what :meth:`ScorePolicy.checkpoint_state` returns (e.g. only its LoRA matrices)."""
        if self.world > 1:
            self.accelerator.wait_for_everyone()
            if not self.is_main:
                torch.save(self.gen.get_state(), self.out / f"rng-rank{self.rank}.pt")
                return
        torch.save({"iteration": self.iteration, "samples_used": self.samples_used, "wall": self.wall,
                    "policy": self.policy.checkpoint_state(), "algo": self.algo.state_dict(),
                    "gen": self.gen.get_state(), "config": self.cfg.__dict__}, self.out / CKPT)

    def load(self) -> None:
        path = self.out / CKPT
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}; start a new run without --resume")
        ck = torch.load(path, weights_only=False)
        self.policy.load_checkpoint_state(ck["policy"])
        self.algo.load_state_dict(ck["algo"])
        self.gen.set_state(ck["gen"] if self.is_main else torch.load(self.out / f"rng-rank{self.rank}.pt"))
        self.iteration, self.samples_used, self.wall = ck["iteration"], ck["samples_used"], ck["wall"]
        # metrics written after the checkpoint are rewritten by the resumed run
        mpath = self.out / "metrics.jsonl"
        if mpath.exists() and self.is_main:
            lines = [ln for ln in mpath.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln)["iteration"] <= self.iteration]
            mpath.write_text("".join(ln + "\n" for ln in keep))

    # ----- the loop ------------------------------------------------------------------------------
    def run(self, callback=None) -> dict:
        """Train to ``cfg.iterations``; ``callback(trainer)`` runs after every iteration (e.g. evaluations)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.out / "config.json").write_text(json.dumps(cfg.__dict__, indent=1))
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not (cfg.progress and self.is_main),
                   desc=f"{cfg.algo} on {cfg.preset}")
        with open(self.out / ("metrics.jsonl" if self.is_main else os.devnull), "a") as mf:
            while self.iteration < cfg.iterations:
                t0 = time.perf_counter()
                grid = training_grid(cfg, self.env, self.gen)
                batch = rollout(self.env, self.policy, grid, self.transition, cfg.batch, self.gen)
                info = self.algo.update(batch, self.gen)
                self.iteration += 1
                self.samples_used += batch.n * self.world
                self.wall += time.perf_counter() - t0
                rewards, kl_path = self._gather(batch.rewards), self._gather(batch.kl_path)   # all processes
                obj = rewards - self.algo.beta * kl_path
                rec = {"iteration": self.iteration, "samples_used": self.samples_used, "wall_s": self.wall,
                       "reward": float(rewards.mean()), "kl_path": float(kl_path.mean()),
                       "objective": float(obj.mean())}
                if batch.xs[-1][0].numel() <= 1024:                # not for image latents
                    rec["terminal_mean"] = batch.xs[-1].reshape(batch.n, -1).mean(0).tolist()
                rec |= info
                rec |= self.task.iteration_metrics(batch)        # task hooks (no-ops by default): image quality,
                rec |= self.task.on_iteration(self, batch) or {}   # image grids, evaluations at other step counts
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl_path']:.3f}")
                if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations:
                    self.save()
                if callback is not None:
                    callback(self)
        bar.close()
        return self.finish()

    @torch.no_grad()
    def evaluate(self, n: int | None = None, grid: TimeGrid | None = None, seed: int | None = None) -> Rollout:
        """A fresh rollout of the current policy (its own seeded generator, so evaluation never perturbs training)."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 10_000 if seed is None else seed)
        grid = evaluation_grid(self.cfg, self.env) if grid is None else grid
        return rollout(self.env, self.policy, grid, self.transition, n or self.cfg.eval_batch, gen)

    def finish(self) -> dict:
        ev = self.evaluate()
        summary = {"preset": self.cfg.preset, "algo": self.cfg.algo, "seed": self.cfg.seed,
                   "samples_used": self.samples_used, "wall_s": self.wall, "iterations": self.iteration,
                   "K": self.cfg.K, "method": self.cfg.method, "eta": self.cfg.eta}
        summary |= self.task.summary(ev)
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            self.task.write_artifacts(self.out, ev)
        return summary
