"""Run independent benchmark jobs in worker processes (``--workers``), each writing its result to a cache file.

A job is a picklable tuple handed to a module-level function; the function caches its own result, so a bench that
is interrupted and started again only runs the jobs that are missing. Workers are spawned (a fresh interpreter,
one torch thread each); ``workers = 1`` runs everything in this process.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable


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
