"""Measure how long each chapter takes to execute, and print a Markdown table.

    python scripts/time_chapters.py                      # every chapter, class profile
    python scripts/time_chapters.py --profile ci notebooks/03_scores_as_actions.md
    python scripts/time_chapters.py --write              # also rewrite figures/chapter-times.md

Each chapter is converted by jupytext and executed by nbclient in a fresh kernel, in `notebooks/` (as the
book build does), one chapter at a time. "wall" is the time from the start of the first cell to the end of
the last; "CPU" is the processor time of the kernel process (user + system, all threads), taken from the
operating system when the kernel exits. The table for the book is `figures/chapter-times.md`, included by
book/teaching.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "figures" / "chapter-times.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return ""


def time_chapter(path: Path, profile: str, timeout: int) -> dict:
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    env_before = os.environ.get("SACODE_PROFILE")
    os.environ["SACODE_PROFILE"] = profile          # the kernel inherits the environment
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except Exception as exc:                          # report the failure in the table, go on
        error = f"{type(exc).__name__}"
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if env_before is None:
        os.environ.pop("SACODE_PROFILE", None)
    else:
        os.environ["SACODE_PROFILE"] = env_before
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"chapter": path.stem, "title": _title(nb), "wall": wall, "cpu": cpu, "error": error}


def table(rows: list[dict], profile: str, command: str) -> str:
    lines = [
        "| chapter | wall (s) | CPU (s) |",
        "|---|---:|---:|",
    ]
    for r in rows:
        name = f"{r['chapter'][:2].lstrip('0')}. {r['title']}" if r["chapter"][:2].isdigit() else r["chapter"]
        status = f" **failed: {r['error']}**" if r["error"] else ""
        lines.append(f"| {name}{status} | {r['wall']:.0f} | {r['cpu']:.0f} |")
    total_wall = sum(r["wall"] for r in rows)
    total_cpu = sum(r["cpu"] for r in rows)
    lines.append(f"| all chapters | {total_wall:.0f} | {total_cpu:.0f} |")
    lines += [
        "",
        f"Profile `{profile}`; {os.cpu_count()} logical CPUs ({_cpu_model()}), Python {platform.python_version()}; "
        f"measured {datetime.date.today().isoformat()} with `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", type=Path, help="chapter .md files (default: every chapter)")
    parser.add_argument("--profile", default="class", help="SACODE_PROFILE to run with (default: class)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default: 1800)")
    parser.add_argument("--write", action="store_true", help=f"also write the table to {TABLE.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    chapters = args.chapters or sorted((ROOT / "notebooks").glob("[0-9]*.md"))
    rows = []
    for ch in chapters:
        row = time_chapter(Path(ch).resolve(), args.profile, args.timeout)
        print(f"{row['chapter']}: wall {row['wall']:.1f} s, CPU {row['cpu']:.1f} s {row['error']}",
              file=sys.stderr, flush=True)
        rows.append(row)
    command = "python scripts/time_chapters.py" + (f" --profile {args.profile}" if args.profile != "class" else "")
    text = table(rows, args.profile, command)
    print(text)
    if args.write:
        TABLE.write_text(text)
        print(f"wrote {TABLE.relative_to(ROOT)}", file=sys.stderr)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
