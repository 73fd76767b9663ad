"""Handouts: student and instructor notebooks generated from the chapters, with no MyST left in them."""
import json
import re
from pathlib import Path

import pytest

from sacode.handouts import BookContext, convert_markdown, main, make_handouts, parse_bib, strip_solutions

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9]*.md"))

# what must not be left in a handout's Markdown: directive fences, roles, targets, directive options
MYST = {
    "directive fence": re.compile(r"^\s*(`{3,}|:{3,})\{[^}]+\}", re.M),
    "role": re.compile(r"\{[a-zA-Z][\w:-]*\}`"),
    "target": re.compile(r"^\([^()\s]+\)=\s*$", re.M),
    "directive option": re.compile(r"^:(label|class|name):", re.M),
}


def _nb(*cells):
    return {"cells": [{"cell_type": t, "source": src, "metadata": {}} for t, src in cells], "metadata": {},
            "nbformat": 4, "nbformat_minor": 5}


def _text(nb):
    return "\n".join(c["source"] if isinstance(c["source"], str) else "".join(c["source"]) for c in nb["cells"])


def test_solution_spanning_cells_is_removed_for_students_and_kept_for_instructors():
    nb = _nb(("markdown", "Intro\n```{exercise} E\n:label: e1\nDo it.\n```\n```{solution-start} e1\n:class: dropdown\n```\n"
                          "Hidden prose.\n"),
             ("code", "secret = 42\n"),
             ("markdown", "More hidden.\n```{solution-end}\n```\nAfter the solution.\n"),
             ("code", "visible = 1\n"))
    ctx = BookContext(exercises={"e1": ("3.1", "E")})
    student, instructor, n = make_handouts(nb, ctx)
    assert n == 1
    s, i = _text(student), _text(instructor)
    assert "secret" not in s and "Hidden" not in s and "More hidden" not in s
    assert "Do it." in s and "After the solution." in s and "visible = 1" in s
    assert "secret = 42" in i and "Hidden prose." in i and "More hidden." in i and "Solution to exercise 3.1" in i
    # the exercise is a cell of its own, followed (for students only) by an empty answer cell
    k = next(j for j, c in enumerate(student["cells"]) if "Do it." in c["source"])
    assert student["cells"][k]["source"].startswith("### Exercise 3.1 (E)")
    assert student["cells"][k + 1]["source"] == "" and student["cells"][k + 1]["metadata"]["tags"] == ["answer"]
    assert not any("answer" in c["metadata"].get("tags", []) for c in instructor["cells"])
    for version in (student, instructor):
        assert not any(p.search(_text(version)) for p in MYST.values()), _text(version)
    # the old interface
    assert strip_solutions(nb, ctx)[1] == 1


def test_unterminated_solution_is_an_error():
    with pytest.raises(ValueError, match="solution-end"):
        strip_solutions(_nb(("markdown", "```{solution-start} e1\n```\n"), ("code", "x = 1\n")))


def test_myst_becomes_plain_markdown():
    ctx = BookContext(equations={"ch03-b": "3.2"}, targets={"sec": "A section"},
                      exercises={"ch03-ex1": ("3.1", "t")}, docs={"notation": "Notation"},
                      citations={"k1": ("Zhao et al.", "2024"), "k2": ("Anderson", "1982")},
                      macros={"E": r"\mathbb{E}"})
    src = ("(sec)=\n% a comment\nSee {eq}`ch03-b`, {cite}`k1,k2`, {cite:t}`k2`, {ref}`sec`, {ref}`ch03-ex1`,\n"
           "{doc}`../book/notation`, {ref}`the text <sec>` and {math}`\\E X`.\n\n"
           "```{math}\n:label: ch03-b\nb = \\E a\n```\n\n```python\nkeep = '{eq}`x`'\n```\n\n"
           "```{admonition} Careful\n:class: warning\nBody with {eq}`ch03-b`.\n```\n")
    out = convert_markdown(src, ctx)
    assert "See (3.2), (Zhao et al., 2024; Anderson, 1982), Anderson (1982), “A section”, Exercise 3.1," in out
    assert "“Notation”, the text and $\\mathbb{E} X$." in out
    assert "$$\nb = \\mathbb{E} a \\tag{3.2}\n$$" in out
    assert "keep = '{eq}`x`'" in out                       # code is left alone
    assert "> **Careful**" in out and "> Body with (3.2)." in out
    assert "% a comment" not in out and "(sec)=" not in out
    assert not ctx.unresolved


def test_bibliography_gives_author_year():
    bib = parse_bib(r"""@article{a1, author = {Hyv{\"a}rinen, Aapo}, year = {2005}, title={T}}
@inproceedings{a2,
  author = {Ho, Jonathan and Jain, Ajay and Abbeel, Pieter},
  year   = 2020
}
@book{a3, author = {Kloeden, Peter E. and Platen, Eckhard}, year = {1992}}""")
    assert bib == {"a1": ("Hyvärinen", "2005"), "a2": ("Ho et al.", "2020"), "a3": ("Kloeden and Platen", "1992")}


@pytest.fixture(scope="module")
def handouts(tmp_path_factory):
    """What `make handouts` does: jupytext converts the chapters to .ipynb, then python -m sacode.handouts."""
    import jupytext

    work = tmp_path_factory.mktemp("handouts")
    src = work / "ipynb"
    src.mkdir()
    for ch in CHAPTERS:
        jupytext.write(jupytext.read(ch), src / f"{ch.stem}.ipynb")
    assert main([str(src), str(work / "out")]) == 0
    return work / "out"


def test_make_handouts_writes_student_and_instructor_versions(handouts):
    for version in ("student", "instructor"):
        assert sorted(p.stem for p in (handouts / version).glob("*.ipynb")) == [ch.stem for ch in CHAPTERS]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_handout_is_a_valid_notebook_without_myst(handouts, chapter):
    import nbformat

    source = chapter.read_text()
    n_exercises = len(re.findall(r"^```\{exercise\}", source, re.M))
    assert n_exercises >= 1
    macros = BookContext.from_chapters({}).macros
    assert macros, "the book's TeX macros were not found in book/_config.yml"
    for version in ("student", "instructor"):
        nb = nbformat.read(handouts / version / f"{chapter.stem}.ipynb", as_version=4)
        nbformat.validate(nb)
        markdown = [c for c in nb.cells if c.cell_type == "markdown"]
        for cell in markdown:
            for what, pattern in MYST.items():
                m = pattern.search(cell.source)
                assert not m, f"{version}/{chapter.stem}: a MyST {what} is left: {cell.source[max(0, m.start() - 80):m.end() + 80]!r}"
            for name in macros:
                assert not re.search(r"\\" + name + r"(?![A-Za-z])", cell.source), f"macro \\{name} left"
        exercises = [i for i, c in enumerate(nb.cells) if "exercise" in c.metadata.get("tags", [])]
        assert len(exercises) == n_exercises, f"{version}/{chapter.stem}: {len(exercises)} exercise cells"
        assert all(nb.cells[i].source.startswith("### Exercise ") for i in exercises)
        solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
        if version == "student":
            assert all(nb.cells[i + 1].source == "" and nb.cells[i + 1].metadata["tags"] == ["answer"]
                       for i in exercises), "each exercise must be followed by an empty answer cell"
            assert not solutions
        else:
            assert len(solutions) == n_exercises
    student = nbformat.read(handouts / "student" / f"{chapter.stem}.ipynb", as_version=4)
    instructor = nbformat.read(handouts / "instructor" / f"{chapter.stem}.ipynb", as_version=4)
    assert len(instructor.cells) > len(student.cells) - n_exercises     # the solutions are in the instructor's


def test_every_reference_is_resolved():
    import jupytext
    import nbformat

    chapters = {ch.stem: json.loads(nbformat.writes(jupytext.read(ch))) for ch in CHAPTERS}
    ctx = BookContext.from_chapters(chapters)
    for nb in chapters.values():
        make_handouts(nb, ctx)
    assert not ctx.unresolved, f"references the handouts cannot turn into text: {sorted(set(ctx.unresolved))}"
    # equation numbers as the book shows them: chapter 3's first labelled equation is (3.1)
    assert ctx.equations["ch03-state"] == "3.1"
