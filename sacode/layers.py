"""The package's import graph and its layers, computed from the source (the book's appendix draws it; a test holds
the package to it).

Layers, bottom to top (a module may import from its own layer and the ones below it):

===========  ===========================================================================================
``base``     :mod:`sacode.profiles`, :mod:`sacode.plotting`, :mod:`sacode.registry` (utilities; no sacode imports)
``dynamics`` SDEs, time, grids, the Gaussian-step primitive, samplers
``theory``   closed-form laws, the control problem and its rollout, KL, optimal control, policy evaluation
``engine``   policies, value learning, algorithms, configuration, the trainer
``envs``     toys, digits, Stable Diffusion (they register presets in :mod:`sacode.registry`)
``top``      :mod:`sacode.runs`, :mod:`sacode.analysis`, :mod:`sacode.bench`, :mod:`sacode.verify`,
             :mod:`sacode.cli`, :mod:`sacode.handouts` and the package itself
===========  ===========================================================================================

Only ``top`` modules outside :mod:`sacode.bench` may not import from :mod:`sacode.bench` either: benchmarks are
leaves. Imports inside functions count as imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

LAYERS = ("base", "dynamics", "theory", "engine", "envs", "top")
ROOT = Path(__file__).resolve().parent


def layer_of(module: str) -> str:
    """The layer of a module name ``sacode.x.y``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    head = parts[1]
    if head in ("dynamics", "theory", "engine", "envs"):
        return head
    if head in ("profiles", "plotting", "registry", "layers"):
        return "base"
    return "top"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the sacode modules it imports (relative and absolute, at any depth of the file)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
                if not base.startswith("sacode"):
                    continue
                for alias in node.names:                 # "from . import optimal" imports a module
                    cand = f"{base}.{alias.name}"
                    deps.add(cand if cand in modules else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("sacode")}
        graph[mod] = {d for d in deps if d in modules and d != mod}
    return graph


def violations(graph: dict[str, set[str]] | None = None) -> list[str]:
    """Imports that point up the layers, into a benchmark from outside the benchmarks, or into an environment
    from the engine; empty when the package keeps its shape."""
    graph = import_graph() if graph is None else graph
    rank = {name: i for i, name in enumerate(LAYERS)}
    out = []
    for mod, deps in graph.items():
        for d in deps:
            if rank[layer_of(d)] > rank[layer_of(mod)]:
                out.append(f"{mod} ({layer_of(mod)}) imports {d} ({layer_of(d)})")
            if d.startswith("sacode.bench") and not mod.startswith("sacode.bench"):
                out.append(f"{mod} imports the benchmark {d}")
    return sorted(out)


def cycles(graph: dict[str, set[str]] | None = None) -> list[list[str]]:
    """Import cycles between modules (a package importing its own submodules, and the submodules the package,
    count as well)."""
    graph = import_graph() if graph is None else graph
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def public_definitions() -> dict[str, list[str]]:
    """Public name -> the modules that define it at top level (functions, classes, module-level assignments)."""
    out: dict[str, list[str]] = {}
    for path in ROOT.rglob("*.py"):
        mod = _module_name(path)
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            for n in names:
                if not n.startswith("_") and n not in ("main", "__all__"):
                    out.setdefault(n, []).append(mod)
    return out


def defined_twice() -> dict[str, list[str]]:
    """Public names defined in more than one module (``main`` entry points excepted)."""
    return {n: mods for n, mods in public_definitions().items() if len(mods) > 1}
