"""A run directory: the files one run writes, and how they are read back safely.

===================  =====================================================================================
``config.json``      the resolved configuration (:class:`~sacode.engine.config.TrainConfig`)
``metrics.jsonl``    one strict JSON line per iteration (a truncated last line is dropped with a warning)
``checkpoint.pt``    the state after the last checkpointed iteration (policy, optimiser, value network, RNG)
``checkpoint.prev.pt`` the checkpoint before it, kept until the new one is complete (a fallback)
``summary.json``     the final evaluation, with ``"status"``: ``completed`` or ``diverged``
``rng-rankR.pt``     the generator of rank R > 0 in multi-process runs
===================  =====================================================================================

Tasks add their own files (:attr:`sacode.engine.task.Task.artifacts`, e.g. image grids). Every file is written
atomically (:mod:`sacode.engine.files`); reading an unreadable file raises :class:`RunError` with one line that names
the file and what to do.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .divergence import RunError
from .files import atomic_write, atomic_write_text, fsync_dir, json_line

__all__ = ["CONFIG", "METRICS", "SUMMARY", "CKPT", "CKPT_PREV", "holds_run", "describe_run", "clear_run",
           "read_json", "read_metrics", "rewrite_metrics", "save_checkpoint", "read_checkpoint", "warn"]

CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
CKPT, CKPT_PREV = "checkpoint.pt", "checkpoint.prev.pt"
RUN_FILES = (CONFIG, METRICS, SUMMARY, CKPT, CKPT_PREV)
RNG_GLOB = "rng-rank*.pt*"


def warn(message: str) -> None:
    """A one-line warning on stderr (the command line's convention: ``warning: ...``)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def holds_run(out: str | Path) -> bool:
    """Whether ``out`` holds (part of) a run: its configuration, checkpoint, metrics or summary."""
    out = Path(out)
    return out.is_dir() and any((out / f).exists() for f in RUN_FILES)


def describe_run(out: str | Path) -> str:
    """A few words on the run in ``out`` for messages, e.g. ``gauss1d-linear, ctpo, seed 1, 4 of 4 iterations,
    completed`` (best effort: whatever its files say)."""
    out = Path(out)
    parts = []
    try:
        cfg = json.loads((out / CONFIG).read_text())
        parts += [str(cfg.get("preset")), str(cfg.get("algo")), f"seed {cfg.get('seed')}"]
        total = cfg.get("iterations")
    except (OSError, ValueError, AttributeError):
        total = None
    try:
        summary = json.loads((out / SUMMARY).read_text())
        parts.append(f"{summary.get('iterations')} iterations, {summary.get('status', 'completed')}")
    except (OSError, ValueError, AttributeError):
        try:
            done = sum(1 for ln in (out / METRICS).read_text().splitlines() if ln.strip())
            parts.append(f"{done} of {total} iterations logged")
        except OSError:
            pass
    return ", ".join(parts) if parts else "unreadable"


def clear_run(out: str | Path, artifacts: tuple[str, ...] = ()) -> None:
    """Remove the files of the run in ``out`` (and the task's ``artifacts``, files or folders in it); other files
    in ``out`` are left alone."""
    out = Path(out)
    for name in RUN_FILES + tuple(artifacts):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for p in out.glob(RNG_GLOB):
        p.unlink()
    for p in out.glob(".*"):                       # temporary files of writes a crash interrupted
        if p.is_file() and any(p.name.startswith(f".{f}.") for f in RUN_FILES + ("rng-rank",)):
            p.unlink()


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file, or :class:`RunError` naming it (``what``: e.g. "the run's configuration")."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} not found ({what})") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({what}): {type(e).__name__}: {e}") from None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl``. A last line that does not parse (a write cut short by a crash or a full
    disk) is dropped with a warning; any other unreadable line raises :class:`RunError` naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path} cannot be read: {type(e).__name__}: {e}") from None
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    rows = []
    for j, (lineno, ln) in enumerate(numbered):
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int):
                raise ValueError("not a metrics record (no integer 'iteration')")
        except ValueError as e:
            if j == len(numbered) - 1:
                warn(f"{path}: dropped its truncated last line {lineno} ({e})")
                break
            raise RunError(f"{path} line {lineno} cannot be read ({e}); remove that line (or start the run again "
                           "with --overwrite)") from None
        rows.append(rec)
    return rows


def rewrite_metrics(path: str | Path, rows: list[dict]) -> None:
    """Replace ``metrics.jsonl`` atomically with ``rows``."""
    atomic_write_text(path, "".join(json_line(r) + "\n" for r in rows))


def save_checkpoint(state: dict, path: str | Path, keep_previous: bool = True) -> Path:
    """``torch.save(state)`` atomically. The new file is complete and on disk before anything else changes; then the
    checkpoint it replaces is kept as ``<name>.prev.pt`` (a fallback if this one is ever damaged) and the new one
    takes its name in one rename. A write that fails half-way leaves the old checkpoint as it was."""
    path = Path(path)
    new = path.with_name(f".{path.name}.new")
    atomic_write(new, lambda f: torch.save(state, f))
    if keep_previous and path.exists():
        prev = _previous(path)
        tmp = prev.with_name(f".{prev.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)                   # a second name for the old checkpoint, no copy
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, prev)
    os.replace(new, path)
    fsync_dir(path.parent)
    return path


def _previous(path: Path) -> Path:
    return path.with_name(path.name[: -len(".pt")] + ".prev.pt" if path.name.endswith(".pt") else path.name + ".prev")


def _load(path: Path) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or "iteration" not in ck:
        raise ValueError("not a sacode checkpoint (no 'iteration')")
    return ck


def read_checkpoint(out: str | Path, name: str = CKPT) -> dict:
    """The checkpoint ``name`` in ``out``. A missing or unreadable one raises :class:`RunError` that names the file
    and the fallback: the previous checkpoint when it is readable (how to use it), else starting again."""
    out = Path(out)
    path, prev = out / name, _previous(out / name)
    if path.exists():
        try:
            return _load(path)
        except Exception as e:       # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            problem = f"{path} cannot be read (truncated or corrupted: {type(e).__name__}: {first})"
    else:
        problem = f"{path} not found"
    try:
        it = _load(prev)["iteration"]
        fallback = (f"the previous checkpoint {prev} (iteration {it}) is intact: use it with "
                    f"`mv {prev} {path}` and resume again")
    except FileNotFoundError:
        fallback = (f"there is no previous checkpoint to fall back to; start the run again with --overwrite"
                    if path.exists() else "the run stopped before its first checkpoint; start it again with "
                    "--overwrite")
    except Exception as e:           # noqa: BLE001
        fallback = f"the previous checkpoint {prev} cannot be read either ({type(e).__name__}); start again with " \
                   "--overwrite"
    raise RunError(f"{problem}; {fallback}")
