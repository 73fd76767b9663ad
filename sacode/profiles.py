"""Run-size profiles read from ``SACODE_PROFILE`` (the book's appendix "How sacode is built").

``ci``: seconds, used by the tests; ``class``: the default, at most about 60 s per chapter on a 2-core laptop;
``full``: research-size runs.
"""
from __future__ import annotations

import os

PROFILES = ("ci", "class", "full")


def profile() -> str:
    """The active profile name (``class`` when SACODE_PROFILE is unset)."""
    p = os.environ.get("SACODE_PROFILE", "class").strip().lower()
    if p not in PROFILES:
        raise ValueError(f"SACODE_PROFILE={p!r} is not a profile; use one of {', '.join(PROFILES)}")
    return p


def pick(ci, klass, full):
    """Choose a run size by profile: ``pick(ci=200, klass=2000, full=20000)``."""
    return {"ci": ci, "class": klass, "full": full}[profile()]
