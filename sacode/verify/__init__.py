"""The registry of closed-form checks behind ``python -m sacode verify``.

A check is a function returning one or more :class:`CheckResult` (computed value, closed form, tolerance, kind).
Modules listed in ``CHECK_MODULES`` register their checks with the :func:`check` decorator. Every result says what
kind of comparison it is (``KINDS``):

* ``exact``: two exact computations of the same number (float64 rounding budget, or a quadrature/ODE error bound);
* ``monte-carlo``: a simulation against the *exact value of the same discretised quantity* (the exact law of the
  discrete chain, or a closed form with no discretisation), tolerance ``z * se`` and nothing else;
* ``order``: the gap between a discretised quantity (computed exactly) and the continuous closed form, tested by
  its convergence order, by a Richardson extrapolation that must land on the closed form, or by an a-priori
  quadrature bound;
* ``identity``: an algebraic sanity check that holds for any input (reported apart: it cannot catch a wrong
  closed form).

A Monte-Carlo tolerance is never widened by the discretisation gap: by the triangle inequality that would let any
closed form pass. Each check is deterministic given its seeds.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
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


KINDS = ("exact", "monte-carlo", "order", "identity")
"""What a check compares (module docstring)."""


@dataclass
class CheckResult:
    """One row of the table. ``se`` and ``z`` are set for Monte-Carlo rows only (their tolerance is ``z * se``)."""

    name: str
    computed: float
    closed_form: float
    tol: float
    ok: bool
    kind: str
    note: str = ""
    se: float | None = None
    z: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"check {self.name!r}: kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if (self.kind == "monte-carlo") != (self.se is not None):
            raise ValueError(f"check {self.name!r}: a monte-carlo row (and only it) gives its standard error")
        if self.kind == "monte-carlo" and not (self.z is not None and self.z <= 5 and self.tol <= self.z * self.se):
            raise ValueError(f"check {self.name!r}: a monte-carlo tolerance is z * se with z <= 5, nothing added")

    @classmethod
    def compare(cls, name: str, computed: float, closed_form: float, tol: float, note: str = "", *,
                kind: str) -> "CheckResult":
        """|computed - closed_form| <= tol, for the kinds ``exact``, ``order`` and ``identity``."""
        if kind == "monte-carlo":
            raise ValueError("use CheckResult.monte_carlo for a Monte-Carlo row (its tolerance is z * se)")
        computed, closed_form, tol = float(computed), float(closed_form), float(tol)
        return cls(name, computed, closed_form, tol, abs(computed - closed_form) <= tol, kind, note)

    @classmethod
    def monte_carlo(cls, name: str, computed: float, exact: float, se: float, note: str = "",
                    z: float | None = None) -> "CheckResult":
        """A simulation against the exact value of the same discretised quantity: |computed - exact| <= z se."""
        z = Z if z is None else float(z)
        computed, exact, se = float(computed), float(exact), float(se)
        tol = z * se
        return cls(name, computed, exact, tol, abs(computed - exact) <= tol, "monte-carlo", note, se, z)

    @classmethod
    def sampled(cls, name: str, computed: float, exact: float, se: float, rounding: float, note: str = "",
                z: float | None = None) -> "CheckResult":
        """A Monte-Carlo row, or an ``exact`` one when every sample gives the same number (se <= ``rounding``, the
        rounding budget of the comparison: e.g. the path KL of a control that does not depend on x)."""
        if float(se) <= rounding:
            return cls.compare(name, computed, exact, rounding, (note + "; " if note else "") +
                               "the same on every path (SE 0)", kind="exact")
        return cls.monte_carlo(name, computed, exact, se, note, z)

    def as_dict(self) -> dict:
        """The JSON row: name, kind, computed, closed_form, tol, ok, (se, z for monte-carlo), note."""
        d = {"name": self.name, "kind": self.kind, "computed": self.computed, "closed_form": self.closed_form,
             "tol": self.tol, "ok": self.ok}
        if self.kind == "monte-carlo":
            d |= {"se": self.se, "z": self.z}
        return d | {"note": self.note}


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


def summary_line(results: list[CheckResult]) -> str:
    """"N verified (E exact, M monte-carlo, O order), I identities, F failed"."""
    ok = [r for r in results if r.ok]
    counts = {k: sum(r.kind == k for r in ok) for k in KINDS}
    n = counts["exact"] + counts["monte-carlo"] + counts["order"]
    return (f"{n} verified ({counts['exact']} exact, {counts['monte-carlo']} monte-carlo, {counts['order']} order), "
            f"{counts['identity']} identities, {len(results) - len(ok)} failed")


def format_table(results: list[CheckResult]) -> str:
    w = max(len(r.name) for r in results)
    lines = [f"{'check':<{w}}  {'kind':<11}  {'computed':>13}  {'closed form':>13}  {'tol':>10}  ok"]
    lines.append("-" * len(lines[0]))
    for r in results:
        lines.append(f"{r.name:<{w}}  {r.kind:<11}  {r.computed:>13.6g}  {r.closed_form:>13.6g}  {r.tol:>10.3g}  "
                     f"{'PASS' if r.ok else 'FAIL'}" + (f"  ({r.note})" if r.note else ""))
    lines.append(summary_line(results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m sacode verify",
                                description="Run the closed-form theory checks and print a table.")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {name, kind, computed, closed_form, tol, ok, [se, z], note}")
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
        print(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        print(format_table(results))
        print(f"({time.perf_counter() - t0:.1f} s)")
    return 0 if all(r.ok for r in results) else 1
