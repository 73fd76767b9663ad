"""The preset registry: every environment family registers its presets here; nothing else lists them.

A :class:`Preset` is a name, its family, the :class:`~sacode.engine.task.Task` class that builds it, a one-line
description, the preset's fixed parameters (``params``, handed to the task) and its configuration settings
(``config``: values of configuration keys, applied after the task's table entry ``task``). Environment packages (``sacode.envs.*``) call :func:`register` when
they are imported; :func:`presets` imports them on first use. This module imports nothing from sacode, so any layer
may register without depending on another.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

ENV_PACKAGES = ("sacode.envs.toys", "sacode.envs.digits", "sacode.envs.sd")
"""The environment packages discovered by default (a plug-in may call :func:`register` itself)."""


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    task: type
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


_PRESETS: dict[str, Preset] = {}
_discovered = False


def register(preset: Preset) -> Preset:
    """Add a preset (a name may be registered once)."""
    if preset.name in _PRESETS and _PRESETS[preset.name] != preset:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    _PRESETS[preset.name] = preset
    return preset


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for pkg in ENV_PACKAGES:
            importlib.import_module(pkg)


def presets(family: str | None = None) -> dict[str, Preset]:
    """All registered presets (of one family), in registration order."""
    _discover()
    return {k: p for k, p in _PRESETS.items() if family is None or p.family == family}


def get(name: str) -> Preset:
    """The preset ``name``; a KeyError lists the available ones."""
    all_ = presets()
    if name not in all_:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(all_)}")
    return all_[name]
