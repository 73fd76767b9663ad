"""The chapters fit the online book's column, checked in their sources (no build, no browser).

* every code line fits the code box: 88 columns, 84 in a solution (``scripts/format_chapters.py`` says why;
  ``make format-chapters`` formats the cells);
* figures are readable where the book shows them: at most three panels in a row, no wider than the column
  (``sacode.plotting.COLUMN_INCHES``, so the book does not shrink them) and no font under
  ``sacode.plotting.MIN_FONT_PT``;
* no docstring and no Sphinx role is printed: no chapter reads ``__doc__`` (or help/getdoc), no string in a
  chapter's code carries a role like ``:func:`x```, and neither does a benchmark result in ``figures/`` that a
  chapter prints;
* a table stored in a benchmark result in ``figures/`` that a chapter prints unchanged fits the 88-column code
  column, and so do the tables that chapters build from benchmark results (``sacode.analysis``);
* the book merges a cell's printed lines into one output box (``nb_merge_streams``), so a table printed line
  by line is one table.

The browser test (``make check-book``) measures the same things in the built book.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from sacode import plotting

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9]*.md"))
SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|ref|doc|eq|cite|numref|term)"
                         r":`")
SMALL_FONT_NAMES = {"xx-small", "x-small", "small", "smaller"}


def _load_formatter():
    spec = importlib.util.spec_from_file_location("format_chapters", ROOT / "scripts" / "format_chapters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                       # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fmt = _load_formatter()


def _cells(path: Path) -> list[tuple[int, str]]:
    """(first line number, source) of each code cell of a chapter."""
    lines = path.read_text().split("\n")
    return [(c.start + 1, "\n".join(lines[c.start:c.end])) for c in fmt.code_cells(lines)]


def _ids(paths):
    return [p.stem for p in paths]


def test_there_are_chapters():
    assert len(CHAPTERS) >= 6


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_ids(CHAPTERS))
def test_code_lines_fit_the_column(chapter):
    long = fmt.long_lines(chapter.read_text())
    assert not long, (f"{len(long)} code lines too long for the book's code box; run `make format-chapters` "
                      "and shorten what it lists:\n" + "\n".join(
                          f"  {chapter.name}:{n}: {length} > {limit} columns" for n, length, limit in long))


def test_the_line_check_catches_a_planted_long_line():
    """The check above can fail: one line of 89 characters in a cell, 85 in a solution cell."""
    text = CHAPTERS[0].read_text()
    lines = text.split("\n")
    cells = fmt.code_cells(lines)
    plain = next(c for c in cells if not c.in_solution)
    solution = next(c for c in cells if c.in_solution)
    planted = list(lines)
    planted.insert(solution.start, "x = " + "1" * 81)                  # 85 columns: too long in a solution
    planted.insert(plain.start, "x = " + "1" * 85)                     # 89 columns
    long = fmt.long_lines("\n".join(planted))
    assert (plain.start + 1, 89, 88) in long
    assert (solution.start + 2, 85, 84) in long


def _calls(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def figure_problems(source: str) -> list[str]:
    """What makes a figure unreadable in the book, from the code of a cell: literal sizes only."""
    problems = []
    for call in _calls(source):
        name = _name(call.func)
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        if name in ("subplots", "subplot_mosaic", "figure", "subfigures"):
            size = kw.get("figsize")
            if isinstance(size, ast.Tuple) and isinstance(size.elts[0], ast.Constant):
                width = size.elts[0].value
                if width > plotting.COLUMN_INCHES:
                    problems.append(f"line {call.lineno}: figsize width {width} in > the column's "
                                    f"{plotting.COLUMN_INCHES} in (the book would shrink the figure)")
        if name in ("subplots", "subfigures"):
            ncols = kw.get("ncols", call.args[1] if len(call.args) > 1 else None)
            if isinstance(ncols, ast.Constant) and ncols.value > plotting.MAX_PANELS_PER_ROW:
                problems.append(f"line {call.lineno}: {ncols.value} panels in a row "
                                f"(at most {plotting.MAX_PANELS_PER_ROW})")
        for key in ("fontsize", "labelsize", "title_fontsize"):
            value = kw.get(key)
            if isinstance(value, ast.Constant) and (
                    (isinstance(value.value, (int, float)) and value.value < plotting.MIN_FONT_PT)
                    or value.value in SMALL_FONT_NAMES):
                problems.append(f"line {call.lineno}: {key}={value.value!r} (at least {plotting.MIN_FONT_PT} pt)")
    return problems


def chapter_problems(chapter, check) -> list[str]:
    """``check`` (a function of one code cell's source) over every code cell of a chapter, with locations."""
    return [f"{chapter.name} cell at line {start}, {p}" for start, src in _cells(chapter) for p in check(src)]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_ids(CHAPTERS))
def test_figures_fit_the_column_with_readable_fonts(chapter):
    problems = chapter_problems(chapter, figure_problems)
    assert not problems, "\n".join(problems)


def test_the_figure_check_catches_wide_figures_small_fonts_and_four_panels():
    bad = ("fig, axes = plt.subplots(1, 4, figsize=(15, 4))\n"
           "axes[0].legend(fontsize=8)\nax.tick_params(labelsize='small')\n")
    problems = figure_problems(bad)
    assert len(problems) == 4, problems
    good = ("fig, axes = plt.subplots(1, 3, figsize=(7.6, 3))\naxes[0].legend(fontsize=9)\n"
            "fig, ax = plt.subplots(figsize=(plotting.COLUMN_INCHES, 3))\n")
    assert figure_problems(good) == []


def test_the_book_style_is_readable():
    plotting.setup()
    import matplotlib as mpl

    assert mpl.rcParams["font.size"] >= plotting.MIN_FONT_PT
    assert mpl.rcParams["figure.figsize"][0] <= plotting.COLUMN_INCHES
    assert mpl.rcParams["figure.dpi"] == 100              # COLUMN_INCHES assumes 100 pixels an inch


def docstring_problems(source: str) -> list[str]:
    """Reads of docstrings, and Sphinx roles in string literals, in a cell's code."""
    problems = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "__doc__":
            problems.append(f"line {node.lineno}: reads __doc__")
        if isinstance(node, ast.Call) and _name(node.func) in ("getdoc", "help"):
            problems.append(f"line {node.lineno}: calls {_name(node.func)}()")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SPHINX_ROLE.search(node.value):
            problems.append(f"line {node.lineno}: a string with a Sphinx role: {node.value[:60]!r}")
    # a function's own docstring may cite Sphinx roles: it is not printed
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(node):
            doc = node.body[0].value
            problems = [p for p in problems if not p.startswith(f"line {doc.lineno}: a string with a Sphinx")]
    return problems


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_ids(CHAPTERS))
def test_no_docstring_or_sphinx_role_is_printed(chapter):
    problems = chapter_problems(chapter, docstring_problems)
    assert not problems, "\n".join(problems)


def test_the_docstring_check_catches_a_printed_docstring():
    assert len(docstring_problems("print(f.__doc__)\nprint('see :func:`sacode.x`')\n")) == 2
    assert docstring_problems('def f():\n    """Cites :func:`g`."""\n') == []


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


@pytest.mark.parametrize("result", sorted((ROOT / "figures").glob("*.json")), ids=lambda p: p.name)
def test_benchmark_results_shown_in_chapters_carry_no_sphinx_role(result):
    bad = [s[:80] for s in _strings(json.loads(result.read_text())) if SPHINX_ROLE.search(s)]
    assert not bad, f"{result.name} holds text with a Sphinx role (a docstring?), which a chapter prints: {bad}"


OUTPUT_COLUMNS = 88
_VERBATIM_TABLE = re.compile(r"print\(\s*\w+\[[\"']table[\"']\]\s*\)|\{\w+\[[\"']table[\"']\]\}")
_RESULT_NAMES = (re.compile(r"load_bench\(\s*[\"']([\w-]+)[\"']"), re.compile(r"[\"']([\w.-]+\.json)[\"']"))


def verbatim_tables(source: str) -> list[str]:
    """File names in ``figures/`` of the benchmark results whose stored ``table`` a cell prints unchanged."""
    if not _VERBATIM_TABLE.search(source):
        return []
    names = [f"bench-{n}.json" for n in _RESULT_NAMES[0].findall(source)]
    return names + [Path(n).name for n in _RESULT_NAMES[1].findall(source)]


def wide_lines(text: str, width: int = OUTPUT_COLUMNS) -> list[str]:
    return [ln[:60] for ln in text.splitlines() if len(ln) > width]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_ids(CHAPTERS))
def test_stored_tables_a_chapter_prints_fit_the_column(chapter):
    bad = {}
    for _, src in _cells(chapter):
        for name in verbatim_tables(src):
            path = ROOT / "figures" / name
            if path.exists() and "table" in (res := json.loads(path.read_text())):
                bad.update({name: w for w in [wide_lines(res["table"])] if w})
    assert not bad, f"{chapter.name} prints stored tables wider than {OUTPUT_COLUMNS} columns: {bad}"


def test_the_stored_table_check_catches_a_wide_table_printed_unchanged():
    cell = 'bench = load_bench("digits")\nprint(bench["table"])'
    assert verbatim_tables(cell) == ["bench-digits.json"]
    assert verbatim_tables('cost = json.loads(p.read_text())  # "sd-cost.json"\nprint(f"{cost[\'table\']}")') == [
        "sd-cost.json"]
    assert verbatim_tables('bench = load_bench("digits")\nprint(fit_to_column(bench["table"]))') == []
    assert wide_lines("a" * OUTPUT_COLUMNS) == [] and wide_lines("a" * (OUTPUT_COLUMNS + 1))


def test_tables_built_from_benchmark_results_fit_the_column():
    from sacode.analysis import digits_bench_table, discretization_bench_table, fit_to_column

    built = {"bench-digits.json": digits_bench_table, "bench-discretization.json": discretization_bench_table,
             "sd-cost.json": lambda r: fit_to_column(r["table"]),
             "bench-sd-throughput.json": lambda r: fit_to_column(r["table"])}
    # a result from an older version of its benchmark is not shown (the chapter asks for a re-run)
    current = {"bench-discretization.json": lambda r: "fine_K" in r and "ratio_over_fixed_off_grid" in r}
    seen = 0
    for name, build in built.items():
        path = ROOT / "figures" / name
        if path.exists() and current.get(name, lambda r: True)(res := json.loads(path.read_text())):
            seen += 1
            assert not wide_lines(build(res)), name
    assert seen >= 2


def test_fit_to_column_keeps_a_wide_table_aligned_and_every_character():
    from sacode.analysis import fit_to_column

    rows = [f"{'label':<30}" + "".join(f"{h:>16}" for h in ("a", "bb", "ccc", "dddd")),
            f"{'row one':<30}" + "".join(f"{v:>16.1f}" for v in (1.0, 22.0, 333.0, 4444.0))]
    prose = "word " * 30
    text = "\n".join(rows + ["", prose.strip()])
    assert wide_lines(text)                                   # planted: too wide before
    fitted = fit_to_column(text)
    assert not wide_lines(fitted)
    assert fitted.split() == text.split()                     # nothing lost
    head, row = fitted.splitlines()[:2]
    assert len(head) == len(row) and head.index("dddd") + 4 == row.index("4444.0") + 6


def test_the_book_merges_printed_lines_into_one_output():
    import yaml

    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    assert config["sphinx"]["config"].get("nb_merge_streams") is True, (
        "set sphinx: config: nb_merge_streams: true in book/_config.yml, or a table printed line by line "
        "shows as several boxes")


SAMPLE = '''---
jupytext: {text_representation: {extension: .md, format_name: myst}}
kernelspec: {name: python3, display_name: Python 3}
---

# A chapter

Prose with a long line that the formatter must not touch, however long it is: it is not code, it is text; yes.

```{code-cell} ipython3
---
tags: [hide-input]
---
x = some_function_name(first_argument_value, second_argument_value, third_argument_value, 4)  # the comment
print(f"a long message about {x} that runs well past the end of the line, and on, and on, to column 120")
```

```{solution-start} ex1
:class: dropdown
```

```{code-cell} ipython3
:tags: [remove-output]
y = [alpha_value_one, alpha_value_two, alpha_value_three, alpha_value_4, alpha_value_f]
```

```{solution-end}
```
'''


def test_the_formatter_changes_only_code_and_keeps_its_meaning():
    import shutil

    if not (Path(sys.executable).with_name("ruff").is_file() or shutil.which("ruff")):
        pytest.skip("ruff is not installed (it is in the `test` extra)")
    out = fmt.format_text(SAMPLE)
    fmt.check_same_notebook(SAMPLE, out)                  # same cells, metadata, markdown, syntax trees
    assert fmt.long_lines(SAMPLE) and not fmt.long_lines(out)
    kept = [line for line in SAMPLE.split("\n") if not line.startswith(("x =", "print(", "y ="))]
    assert all(line in out.split("\n") for line in kept), "a line outside the code changed"
    assert "# the comment" in out
    assert fmt.format_text(out) == out                    # a second run changes nothing
