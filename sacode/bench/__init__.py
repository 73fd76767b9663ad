"""``python -m sacode bench NAME [--json] [--profile P] [--seeds N]``: comparisons measured side by side in one run.

Each benchmark prints a table (or JSON with ``--json``) and writes ``figures/bench-NAME.json`` (with the command
that produced it) and a figure ``figures/bench-NAME.png``. Trained policies are cached in ``runs/bench-cache`` so
that benchmarks sharing runs (toy-convergence and discretization) train each (preset, algorithm, seed) once.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path

BENCHMARKS = {
    "toy-convergence": "sacode.bench.convergence:toy_convergence",
    "toy-recipe": "sacode.bench.convergence:toy_recipe",
    "discretization": "sacode.bench.grids:discretization",
    "deterministic": "sacode.bench.toys:deterministic",
    "sd-throughput": "sacode.bench.sd:sd_throughput",
    "digits": "sacode.bench.digits:digits_benchmark",
    "estimator": "sacode.bench.estimator:estimator_benchmark",
    "steering": "sacode.bench.steering:steering_benchmark",
    "sd-cost": "sacode.bench.sd_cost:sd_cost",
}


def _resolve(spec: str):
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sacode bench", description=__doc__)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--profile", default=None, help="ci | class | full (default $SACODE_PROFILE or class)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--presets", default=None, help="comma-separated subset of presets")
    p.add_argument("--algos", default=None, help="comma-separated subset of algorithms")
    p.add_argument("--out", default="figures", help="where the JSON and the figure are written")
    p.add_argument("--cache", default="runs/bench-cache")
    p.add_argument("--lrs", default=None, help="comma-separated learning-rate grid for the fair tuning")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="configuration override applied to every run of the benchmark (toy benchmarks), e.g. the "
                        "value-learning options; repeatable")
    p.add_argument("--workers", type=int, default=None, help="worker processes for independent runs (toy "
                   "benchmarks; default 1)")
    args = p.parse_args(argv)
    from ..engine.config import parse_sets
    from ..profiles import profile
    prof = args.profile or profile()
    if not args.name.startswith("sd-"):
        # the toy and digits benchmarks are many small tensor operations: on a shared 2-core machine a second
        # intra-op thread only adds contention (measured: up to 10x slower under load), as in `verify` and the tests
        import torch
        torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    c_children = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])   # CPU of finished worker processes
    res = _resolve(BENCHMARKS[args.name])(profile=prof, seeds=args.seeds,
                                          presets=args.presets.split(",") if args.presets else None,
                                          algos=args.algos.split(",") if args.algos else None,
                                          cache=Path(args.cache), out=Path(args.out),
                                          **({"lrs": [float(v) for v in args.lrs.split(",")]} if args.lrs else {}),
                                          **({"overrides": parse_sets(args.set)} if args.set else {}),
                                          **({"workers": args.workers} if args.workers else {}))
    res["command"] = "python -m sacode bench " + " ".join(argv if argv is not None else sys.argv[2:])
    res["wall_s"] = time.perf_counter() - t0
    name = res.pop("output", f"bench-{args.name}.json")           # a benchmark may name its own file
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["cpu_s"] = time.process_time() - c0 + children.ru_utime + children.ru_stime - c_children
    res["load_avg"] = os.getloadavg()                 # the machine's load at the end (shared machines)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps(res, indent=1))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(res.pop("table", ""))
        print(f"written: {args.out}/{name} ({res['wall_s']:.0f} s)")
    return 0
