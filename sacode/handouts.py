"""Make exercise handouts: generated notebooks with the solutions removed.

``python -m sacode.handouts SRC_DIR OUT_DIR`` reads every ``.ipynb`` in SRC_DIR (the chapters converted by
jupytext, see ``make handouts``) and writes copies without the gated solutions of sphinx-exercise, i.e.
everything from a ```` ```{solution-start} ```` fence to the end of the matching ```` ```{solution-end} ````
fence, across cells. A handout is therefore always generated from the chapter, never a copy to maintain.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_START = re.compile(r"^\s*(```+|:::+)\{solution-start\}")
_END = re.compile(r"^\s*(```+|:::+)\{solution-end\}")


def strip_solutions(nb: dict) -> tuple[dict, int]:
    """Return (notebook without solutions, number of solutions removed)."""
    cells, inside, removed = [], False, 0
    for cell in nb["cells"]:
        src = cell["source"]
        lines = (src if isinstance(src, list) else src.splitlines(keepends=True))
        if cell["cell_type"] != "markdown":
            if not inside:
                cells.append(cell)
            continue
        kept, i = [], 0
        while i < len(lines):
            line = lines[i]
            if not inside and _START.match(line):
                inside, removed = True, removed + 1
            elif inside and _END.match(line):
                inside = False
                fence = _END.match(line).group(1)
                i += 1
                # skip to the closing fence of the solution-end directive
                while i < len(lines) and lines[i].strip() != fence:
                    i += 1
            elif not inside:
                kept.append(line)
            i += 1
        if "".join(kept).strip():
            cells.append({**cell, "source": kept})
    if inside:
        raise ValueError("a {solution-start} has no matching {solution-end}; fix the chapter")
    return {**nb, "cells": cells}, removed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m sacode.handouts SRC_DIR OUT_DIR", file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.ipynb"))
    if not files:
        print(f"no .ipynb files in {src}; run `make notebooks` first", file=sys.stderr)
        return 2
    for f in files:
        nb, n = strip_solutions(json.loads(f.read_text()))
        (out / f.name).write_text(json.dumps(nb, indent=1))
        print(f"{f.name}: removed {n} solution(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
