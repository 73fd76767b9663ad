"""The registry of closed-form checks behind ``python -m sacode verify``.

A check is a function returning one or more :class:`CheckResult` (computed value, closed form, tolerance).
Modules listed in ``CHECK_MODULES`` register their checks with the :func:`check` decorator; later chapters add
their own modules to the list. Tolerances are derived from Monte-Carlo standard errors (``z`` standard errors,
plus any exactly computed discretisation bias) or, for exact computations, from float64 rounding.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

CHECK_MODULES = [
    "sacode.verify.sde_checks",
    "sacode.verify.control_checks",
    "sacode.verify.optimal_checks",
    "sacode.verify.policy_checks",
]

Z = 4.0
"""Number of Monte-Carlo standard errors a statistical check allows (two-sided p ~ 6e-5 per check)."""

EPS = 2.0**-52
"""float64 machine epsilon (the unit of the rounding budgets of exact checks)."""


@dataclass
class CheckResult:
    name: str
    computed: float
    closed_form: float
    tol: float
    ok: bool
    note: str = ""

    @classmethod
    def compare(cls, name: str, computed: float, closed_form: float, tol: float, note: str = "") -> "CheckResult":
        computed, closed_form, tol = float(computed), float(closed_form), float(tol)
        return cls(name, computed, closed_form, tol, abs(computed - closed_form) <= tol, note)


_REGISTRY: dict[str, Callable[[], Iterable[CheckResult]]] = {}


def check(name: str):
    """Register a check function under ``name``; it returns a CheckResult or an iterable of them."""
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"check {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


def registry() -> dict[str, Callable[[], Iterable[CheckResult]]]:
    for mod in CHECK_MODULES:
        importlib.import_module(mod)
    return dict(_REGISTRY)


def run_checks(only: str | None = None, progress: Callable[[str], None] | None = None) -> list[CheckResult]:
    """Run every registered check whose name contains ``only`` (all when None)."""
    reg = registry()
    names = [n for n in reg if only is None or only in n]
    if not names:
        raise KeyError(f"no check matches {only!r}; available: {', '.join(reg)}")
    out: list[CheckResult] = []
    for n in names:
        if progress:
            progress(n)
        res = reg[n]()
        out.extend([res] if isinstance(res, CheckResult) else list(res))
    return out


def format_table(results: list[CheckResult]) -> str:
    w = max(len(r.name) for r in results)
    lines = [f"{'check':<{w}}  {'computed':>13}  {'closed form':>13}  {'tol':>10}  ok"]
    lines.append("-" * len(lines[0]))
    for r in results:
        lines.append(f"{r.name:<{w}}  {r.computed:>13.6g}  {r.closed_form:>13.6g}  {r.tol:>10.3g}  "
                     f"{'PASS' if r.ok else 'FAIL'}" + (f"  ({r.note})" if r.note else ""))
    n_ok = sum(r.ok for r in results)
    lines.append(f"{n_ok} passed, {len(results) - n_ok} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m sacode verify",
                                description="Run the closed-form theory checks and print a table.")
    p.add_argument("--json", action="store_true", help="print a JSON list of {name, computed, closed_form, tol, ok}")
    p.add_argument("--only", default=None, help="run only checks whose name contains this string")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)        # the checks are many small tensor operations: one thread is fastest
    t0 = time.perf_counter()
    try:
        results = run_checks(args.only, None if args.json else (lambda n: print(f"running {n} ...", file=sys.stderr)))
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != "note"} | {"note": r.note} for r in results],
                         indent=1))
    else:
        print(format_table(results))
        print(f"({time.perf_counter() - t0:.1f} s)")
    return 0 if all(r.ok for r in results) else 1
