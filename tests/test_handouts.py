"""Handouts are generated from the chapters by removing the gated solutions, across cells."""
import json
import pytest

from sacode.handouts import strip_solutions


def _nb(*cells):
    return {"cells": [{"cell_type": t, "source": src, "metadata": {}} for t, src in cells], "metadata": {},
            "nbformat": 4, "nbformat_minor": 5}


def test_solution_spanning_cells_is_removed_and_the_rest_kept():
    nb = _nb(("markdown", "Intro\n```{exercise} E\n:label: e1\nDo it.\n```\n```{solution-start} e1\n:class: dropdown\n```\n"
                          "Hidden prose.\n"),
             ("code", "secret = 42\n"),
             ("markdown", "More hidden.\n```{solution-end}\n```\nAfter the solution.\n"),
             ("code", "visible = 1\n"))
    out, n = strip_solutions(nb)
    text = json.dumps(out)
    assert n == 1
    assert "secret" not in text and "Hidden" not in text and "More hidden" not in text
    assert "Do it." in text and "After the solution." in text and "visible = 1" in text


def test_unterminated_solution_is_an_error():
    with pytest.raises(ValueError, match="solution-end"):
        strip_solutions(_nb(("markdown", "```{solution-start} e1\n```\n"), ("code", "x = 1\n")))


def test_every_chapter_has_solutions_to_strip(tmp_path):
    import glob

    import jupytext
    import nbformat
    chapters = sorted(glob.glob("notebooks/[0-9]*.md"))
    assert chapters
    for ch in chapters:
        nb = json.loads(nbformat.writes(jupytext.read(ch)))
        out, n = strip_solutions(nb)
        assert n >= 1, f"{ch} has no gated solution"
        assert "{solution-start}" not in json.dumps(out)
