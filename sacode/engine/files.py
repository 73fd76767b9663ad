"""How a run writes its files: atomically, and as strict JSON.

A file is written to a temporary file in the same directory, flushed and fsync'ed, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), and the directory is fsync'ed: a reader, or a run resumed after a
crash, a full disk or ``kill -9``, sees either the old file or the new one, never a part of one. JSON is written
strictly (RFC 8259: no ``NaN`` or ``Infinity`` tokens); non-finite numbers become ``null`` and
:func:`non_finite_keys` says which they were, so the writer can record why.
"""
from __future__ import annotations

import io
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable, IO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "write_json", "strict_json", "json_line",
           "non_finite_keys", "fsync_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in directory ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, fsync it and rename it to ``path``.

    If ``write`` raises (or the disk is full), ``path`` is untouched and the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:               # a new file with the usual permissions (mkstemp's are 0600)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, recursively (dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def non_finite_keys(obj: Any, prefix: str = "") -> list[str]:
    """The keys (dotted paths, ``[i]`` for list entries) of the non-finite floats in ``obj``."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix or "value"]
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in non_finite_keys(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in non_finite_keys(v, f"{prefix}[{i}]")]
    return []


def json_line(obj: Any) -> str:
    """One strict JSON line (no newline) of ``obj`` (non-finite numbers as null)."""
    return json.dumps(strict_json(obj), allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """``obj`` as strict JSON (non-finite numbers as null), written atomically."""
    buf = io.StringIO()
    json.dump(strict_json(obj), buf, indent=indent, allow_nan=False)
    return atomic_write_text(path, buf.getvalue() + "\n")
