"""Run independent benchmark jobs in worker processes (``--workers``), each writing its result to a cache file.

A job is a picklable tuple handed to a module-level function; the function caches its own result, so a bench that
is interrupted and started again only runs the jobs that are missing. Workers are spawned (a fresh interpreter,
one torch thread each); ``workers = 1`` runs everything in this process.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(fn: Callable, jobs: Iterable[tuple], workers: int = 1) -> list:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes when workers > 1 (results in job order)."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as ex:
        return list(ex.map(fn, *zip(*jobs)))


def config_key(*parts: Any, length: int = 10) -> str:
    """A short hash of a run's resolved configuration (``TrainConfig.to_dict()``) and any other inputs: the cache
    key of every benchmark run, so that a changed default (or code-level setting) never reuses a stale result."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]
