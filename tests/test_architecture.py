"""The package keeps its shape: layers point one way, no import cycles, the engine imports no environment, each
public name is defined once, the chapter-3 rollout is the trainer's, and the repository cites nothing outside it."""
from __future__ import annotations

import re
from pathlib import Path

from sacode import layers

REPO = Path(__file__).resolve().parents[1]


def test_imports_point_down_the_layers():
    assert layers.violations() == []


def test_no_import_cycles():
    assert layers.cycles() == []


def test_engine_imports_no_environment():
    graph = layers.import_graph()
    bad = [(m, d) for m, deps in graph.items() if m.startswith("sacode.engine") for d in deps
           if d.startswith("sacode.envs")]
    assert bad == []


def test_each_public_name_is_defined_once():
    assert layers.defined_twice() == {}


def test_the_checks_can_fail():
    """The layer, cycle and duplicate checks detect a planted upward import, a cycle and a second definition."""
    g = layers.import_graph()
    g["sacode.dynamics.sde"] = g["sacode.dynamics.sde"] | {"sacode.engine.trainer"}
    assert any("sacode.dynamics.sde" in v for v in layers.violations(g))
    g["sacode.engine.trainer"] = g["sacode.engine.trainer"] | {"sacode.bench.toys"}
    assert any("benchmark" in v for v in layers.violations(g))
    g2 = {"a": {"b"}, "b": {"a"}}
    assert layers.cycles(g2) == [["a", "b", "a"]]


def test_trainer_runs_the_chapter_3_rollout():
    from sacode.engine import trainer
    from sacode.theory import control
    assert trainer.rollout is control.rollout


def test_repository_cites_no_outside_documents():
    # the team's notes outside the repository, by name (split so that this file does not match itself)
    names = ["theory" + "-notes", "DES" + r"IGN\.md", "refer" + "ence/(peers|style|environment)", r"\.\./" + "shared"]
    pattern = re.compile("|".join(names))
    hits = []
    for root in ["sacode", "notebooks", "book", "tests"]:
        for p in (REPO / root).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".md", ".yml", ".bib", ".json"):
                hits += [f"{p.relative_to(REPO)}:{i + 1}" for i, ln in enumerate(p.read_text().splitlines())
                         if pattern.search(ln)]
    readme = (REPO / "README.md").read_text().splitlines()
    hits += [f"README.md:{i + 1}" for i, ln in enumerate(readme) if pattern.search(ln)]
    assert hits == [], hits[:20]
