"""Order checks: how a discretised quantity, computed exactly, approaches its continuous closed form.

A Monte-Carlo check compares a simulation with the exact value X_K of the *same* discretised quantity (the exact
law of the K-step chain). Whether X_K is the discretisation of the right closed form X is a separate question,
answered here without any Monte Carlo:

* :func:`richardson_check`: for a scheme of order p, X_K = X + a K^-p + b K^-(p+1) + ..., so the extrapolations
  R_j = (2^p X_{2K_j} - X_{K_j}) / (2^p - 1) from successive doublings have error ~ b' K^-(p+1). The last one,
  R, must land on X within |R - R_prev| (+ rounding): with the next term of order p + 1 that is (2^(p+1) - 1) >= 3
  times the remaining error of R, while a wrong closed form (X off by delta) leaves R off by delta.
* :func:`order_check`: the slope of log|X_K - X| against log K must be -p within 0.1 (as the samplers' weak-order
  checks); a wrong closed form flattens the slope towards 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import EPS, CheckResult

ROUNDING = 2**12
"""Rounding budget of an exactly computed discretised value, in ulps of its scale per step of the chain (a sum of
K float64 terms carries at most ~K ulps; 4096 leaves room for the recursions' own operations)."""


def _doublings(Ks: Sequence[int]) -> None:
    if len(Ks) < 3 or any(b != 2 * a for a, b in zip(Ks[:-1], Ks[1:])):
        raise ValueError(f"a Richardson check needs >= 3 step counts, each twice the previous; got {list(Ks)}")


def richardson(Ks: Sequence[int], values: Sequence[float], order: float) -> tuple[float, float]:
    """(R, |R - R_prev|): the last Richardson extrapolation of ``values`` (at step counts ``Ks``, each twice the
    previous) for a scheme of the given order, and its difference from the previous extrapolation."""
    _doublings(Ks)
    v = np.asarray(values, dtype=np.float64)
    c = 2.0**order
    R = (c * v[1:] - v[:-1]) / (c - 1.0)
    return float(R[-1]), float(abs(R[-1] - R[-2]))


def rounding_budget(Ks: Sequence[int], values: Sequence[float], closed_form: float) -> float:
    """ROUNDING ulps per step of the largest chain, on the scale of the numbers compared."""
    scale = max(1.0, abs(float(closed_form)), float(np.max(np.abs(values))))
    return ROUNDING * EPS * max(Ks) * scale


def richardson_check(name: str, Ks: Sequence[int], values: Sequence[float], closed_form: float, order: float,
                     note: str = "", extra_tol: float = 0.0) -> CheckResult:
    """The extrapolated discrete values must land on the closed form (module docstring); kind ``order``.

    ``extra_tol`` adds an independent, stated error of the closed form itself (e.g. a finite-difference error).
    """
    R, dR = richardson(Ks, values, order)
    tol = dR + rounding_budget(Ks, values, closed_form) + extra_tol
    err = [float(x) - float(closed_form) for x in values]
    text = (f"Richardson (order {order:g}) of the exact discrete values, K={Ks[0]}..{Ks[-1]}; "
            f"X_K - X: {err[0]:+.2e} -> {err[-1]:+.2e}")
    return CheckResult.compare(name, R, closed_form, tol, text + (f"; {note}" if note else ""), kind="order")


def fitted_order(Ks: Sequence[int], errors: Sequence[float]) -> float:
    """-slope of log|error| against log K (least squares)."""
    e = np.abs(np.asarray(errors, dtype=np.float64))
    if not np.all(e > 0):
        return float("nan")
    return float(-np.polyfit(np.log(np.asarray(Ks, dtype=np.float64)), np.log(e), 1)[0])


def order_check(name: str, Ks: Sequence[int], values: Sequence[float], closed_form: float, order: float,
                note: str = "", tol: float = 0.1) -> CheckResult:
    """The fitted order of |X_K - X| must be ``order`` within ``tol``; kind ``order``."""
    errs = [float(x) - float(closed_form) for x in values]
    p = fitted_order(Ks, errs)
    text = f"K={Ks[0]}..{Ks[-1]}, |X_K - X| {abs(errs[0]):.2e} -> {abs(errs[-1]):.2e}"
    return CheckResult.compare(name, p, order, tol, text + (f"; {note}" if note else ""), kind="order")


__all__ = ["ROUNDING", "richardson", "rounding_budget", "richardson_check", "fitted_order", "order_check"]
