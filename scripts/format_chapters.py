"""Format the code cells of the MyST chapters so that they fit the book's code column; leave the prose alone.

    python scripts/format_chapters.py                    # every chapter in notebooks/, rewritten in place
    python scripts/format_chapters.py notebooks/03_scores_as_actions.md
    python scripts/format_chapters.py --check            # change nothing; exit 1 if a chapter would change

`make format-chapters` runs the first form. Only the text between a ```` ```{code-cell} ```` fence (after its
options) and the closing fence changes; every other byte of the file is kept. For each code cell:

1. a trailing comment that makes its line too long is moved to a line of its own just above, with the same
   indentation, and a comment line that is still too long is wrapped (ruff never moves or wraps comments);
2. a string literal that runs past the line length is cut, after a space or between two f-string fields, into
   adjacent literals (Python joins them into the same string; ruff never splits strings);
3. ruff's formatter (``ruff format --isolated``, ruff's own defaults) reformats the code to the line length.

Steps 1-3 are repeated until the cell no longer changes. A cell that is not Python (IPython magics) is left
alone. The line length is 88 columns: at the book's code font (14 px monospace, about 8.4 px a character,
16 px padding each side) 88 characters fill 775 px of the 780 px code box at a 1400 px window. A cell inside a solution (between ``{solution-start}`` and
``{solution-end}``) sits in a narrower box (758 px), so it gets 84 columns.

The result is checked before anything is written: the file read back by jupytext has the same cells, the same
cell metadata and the same markdown, and every code cell parses to the same Python syntax tree as before
(comments and layout are not in the tree). Lines that are still too long (a docstring, a string without a place
to cut) are listed with their line numbers, to be shortened by hand; ``tests/test_chapter_layout.py``
fails while any is left.
"""
from __future__ import annotations

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE_LENGTH = 88
SOLUTION_LINE_LENGTH = 84

_FENCE_OPEN = re.compile(r"^(`{3,})\{code-cell\}")
_SOLUTION_START = re.compile(r"^`{3,}\{solution-start\}")
_SOLUTION_END = re.compile(r"^`{3,}\{solution-end\}")


@dataclass
class CodeCell:
    """A code cell of a MyST file: the lines ``[start, end)`` of the file hold its source."""

    start: int
    end: int
    in_solution: bool

    @property
    def limit(self) -> int:
        return SOLUTION_LINE_LENGTH if self.in_solution else LINE_LENGTH


def code_cells(lines: list[str]) -> list[CodeCell]:
    """The code cells of a MyST file given as lines (without line ends): where each one's source is."""
    cells, i, in_solution = [], 0, False
    while i < len(lines):
        line = lines[i]
        if _SOLUTION_START.match(line):
            in_solution = True
        elif _SOLUTION_END.match(line):
            in_solution = False
        m = _FENCE_OPEN.match(line)
        if not m:
            i += 1
            continue
        fence = m.group(1)
        i += 1
        if i < len(lines) and lines[i] == "---":                       # a YAML options block
            i += 1
            while i < len(lines) and lines[i] != "---":
                i += 1
            i += 1
        else:
            while i < len(lines) and lines[i].startswith(":") and re.match(r"^:[\w-]+:", lines[i]):
                i += 1                                                  # `:tags: [...]` style options
        start = i
        while i < len(lines) and lines[i].rstrip() != fence:
            i += 1
        if i >= len(lines):
            raise ValueError(f"code cell opened on line {start} is never closed")
        cells.append(CodeCell(start, i, in_solution))
        i += 1
    return cells


def _physical_lines_inside_tokens(source: str) -> set[int]:
    """1-based numbers of the lines that begin inside a token opened on an earlier line (a multi-line string)."""
    inside: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NL, tokenize.NEWLINE):
            continue
        for row in range(tok.start[0] + 1, tok.end[0] + 1):
            inside.add(row)
    return inside


def move_long_comments(source: str, limit: int) -> str:
    """Put each trailing comment of a too-long line on its own line above; wrap comment lines that are too long."""
    lines = source.split("\n")
    comments = {tok.start[0]: tok for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    inside = _physical_lines_inside_tokens(source)
    out: list[str] = []
    for row, line in enumerate(lines, start=1):
        tok = comments.get(row)
        if tok is None or len(line) <= limit:
            out.append(line)
            continue
        indent = line[: len(line) - len(line.lstrip())]
        text = tok.string.lstrip("#").strip()
        code = line[: tok.start[1]].rstrip()
        if code.strip() and len(code) + 2 + len(tok.string) <= limit:
            out.append(line)                          # fits once ruff puts two spaces before the comment
            continue
        if code.strip() and row in inside:          # the line starts inside a multi-line string: leave it
            out.append(line)
            continue
        if text.startswith("!") or not text:         # a shebang-like or empty comment: leave it
            out.append(line)
            continue
        wrapped = textwrap.wrap(text, width=max(limit - len(indent) - 2, 20), break_long_words=False,
                                break_on_hyphens=False)
        out += [f"{indent}# {piece}" for piece in wrapped]
        if code.strip():
            out.append(code)
    return "\n".join(out)


def _string_spans(source: str) -> list[tuple[int, int, int]]:
    """(row, start column, end column) of every string literal that starts and ends on one line.

    Python 3.12 tokenizes an f-string into FSTRING_START ... FSTRING_END; the span runs from the first to the
    matching last. Before 3.12 an f-string is one STRING token.
    """
    spans, stack = [], []
    fstring_start = getattr(tokenize, "FSTRING_START", None)
    fstring_end = getattr(tokenize, "FSTRING_END", None)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == fstring_start:
            stack.append(tok.start)
        elif tok.type == fstring_end:
            start = stack.pop()
            if not stack and start[0] == tok.end[0]:
                spans.append((start[0], start[1], tok.end[1]))
        elif tok.type == tokenize.STRING and not stack and tok.start[0] == tok.end[0]:
            spans.append((tok.start[0], tok.start[1], tok.end[1]))
    return spans


def split_literal(literal: str, width: int) -> list[str] | None:
    """A one-line string literal cut after spaces (or between f-string fields) into literals of at most ``width`` characters (when the
    words allow); adjacent literals are concatenated by Python, so the value is the same. None when it cannot
    be cut (triple quotes, no space outside an f-string's replacement fields)."""
    m = re.match(r"^([A-Za-z]*)(['\"])", literal)
    if not m or literal[len(m.group(1)):].startswith(m.group(2) * 3):
        return None
    prefix, quote = m.group(1), m.group(2)
    body = literal[len(prefix) + 1:-1]
    is_f = "f" in prefix.lower()
    raw = "r" in prefix.lower()
    cuts, depth, i = [], 0, 0                       # cut after body[i] when it is a space outside braces
    while i < len(body):
        c = body[i]
        if c == "\\" and not raw:
            i += 2
            continue
        if is_f and c in "{}" and body[i:i + 2] in ("{{", "}}") and depth == 0:
            i += 2
            continue
        if is_f and c == "{":
            depth += 1
        elif is_f and c == "}":
            depth -= 1
            if depth == 0 and i < len(body) - 1 and body[i + 1] != " ":
                cuts.append(i + 1)                  # between two replacement fields: "{a:>9}{b:>9}"
        elif c == " " and depth == 0 and 0 < i < len(body) - 1:
            cuts.append(i + 1)
        i += 1
    room = width - len(prefix) - 2
    pieces, start, last = [], 0, 0
    for cut in cuts + [len(body)]:
        if cut - start > room and last > start:
            pieces.append(body[start:last])
            start = last
        last = cut
    pieces.append(body[start:])
    if len(pieces) < 2:
        return None
    return [f"{prefix}{quote}{p}{quote}" for p in pieces]


def split_long_strings(source: str, limit: int) -> str:
    """Cut each string literal that ends beyond the line length into adjacent literals (ruff then puts them on
    lines of their own, in parentheses where needed); ruff never splits a string itself."""
    lines = source.split("\n")
    edits: dict[int, list[tuple[int, int, str]]] = {}
    for row, c0, c1 in _string_spans(source):
        line = lines[row - 1]
        if len(line) <= limit or c1 <= limit:
            continue
        indent = len(line) - len(line.lstrip())
        pieces = split_literal(line[c0:c1], max(limit - indent - 8, 24))
        if pieces:
            edits.setdefault(row, []).append((c0, c1, " ".join(pieces)))
    for row, changes in edits.items():
        line = lines[row - 1]
        for c0, c1, new in sorted(changes, reverse=True):
            line = line[:c0] + new + line[c1:]
        lines[row - 1] = line
    return "\n".join(lines)


def ruff_format(source: str, limit: int) -> str:
    """The source formatted by ``ruff format`` with the given line length (ruff's defaults otherwise)."""
    beside = Path(sys.executable).with_name("ruff")              # the virtual environment's ruff first
    ruff = str(beside) if beside.is_file() else shutil.which("ruff")
    if ruff is None:
        raise SystemExit("ruff is not installed: pip install ruff (it is in the `test` extra)")
    proc = subprocess.run([ruff, "format", "--isolated", f"--line-length={limit}", "--stdin-filename",
                           "cell.py", "-"], input=source, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"ruff could not format the cell:\n{proc.stderr.strip()}")
    return proc.stdout


def format_cell(source: str, limit: int) -> str:
    """One code cell's source, formatted; the syntax tree is unchanged (checked)."""
    if not source.strip():
        return source
    try:
        before = ast.dump(ast.parse(source))
    except SyntaxError:                              # IPython magics (%time, !pip): not Python, left alone
        return source
    text = source
    for _ in range(5):
        new = ruff_format(split_long_strings(move_long_comments(text, limit), limit), limit)
        if new == text:
            break
        text = new
    if ast.dump(ast.parse(text)) != before:
        raise AssertionError("formatting changed the meaning of a cell:\n" + source)
    return text


def format_text(text: str) -> str:
    """The MyST file's text with every code cell formatted, and nothing else changed."""
    lines = text.split("\n")
    out, pos = [], 0
    for cell in code_cells(lines):
        out += lines[pos:cell.start]
        source = "\n".join(lines[cell.start:cell.end]) + "\n"
        new = format_cell(source, cell.limit)
        out += new.rstrip("\n").split("\n") if new.strip() else lines[cell.start:cell.end]
        pos = cell.end
    out += lines[pos:]
    return "\n".join(out)


def check_same_notebook(old: str, new: str) -> None:
    """jupytext reads the same cells, metadata and markdown from both texts (only the code may differ)."""
    import jupytext

    a, b = jupytext.reads(old, fmt="md:myst"), jupytext.reads(new, fmt="md:myst")
    assert a.metadata == b.metadata, "the notebook metadata changed"
    assert len(a.cells) == len(b.cells), f"{len(a.cells)} cells became {len(b.cells)}"
    for i, (x, y) in enumerate(zip(a.cells, b.cells)):
        assert x.cell_type == y.cell_type, f"cell {i} changed type"
        assert x.metadata == y.metadata, f"the metadata of cell {i} changed"
        if x.cell_type == "code":
            assert ast.dump(ast.parse(x.source)) == ast.dump(ast.parse(y.source)), f"code cell {i} changed"
        else:
            assert x.source == y.source, f"markdown cell {i} changed"


def long_lines(text: str) -> list[tuple[int, int, int]]:
    """(line number, length, limit) of every code-cell line longer than its cell's limit."""
    lines = text.split("\n")
    return [(i + 1, len(lines[i]), cell.limit) for cell in code_cells(lines)
            for i in range(cell.start, cell.end) if len(lines[i]) > cell.limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", type=Path, help="MyST chapters (default: notebooks/[0-9]*.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a chapter would change")
    args = parser.parse_args(argv)
    chapters = args.chapters or sorted((ROOT / "notebooks").glob("[0-9]*.md"))
    status = 0
    for path in chapters:
        old = path.read_text()
        new = format_text(old)
        check_same_notebook(old, new)
        name = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
        if new != old:
            if args.check:
                print(f"{name}: would be reformatted")
                status = 1
            else:
                path.write_text(new)
                print(f"{name}: reformatted")
        for lineno, length, limit in long_lines(new):
            print(f"{name}:{lineno}: {length} > {limit} columns (shorten by hand)")
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
