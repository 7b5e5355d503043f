"""The package's shape: layers with a one-way import order, no cycles, small modules (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dqar"

# Lowest first: a module may import its own layer's modules and those of lower layers, never higher ones.
LAYERS = [
    {"errors", "io", "device", "labels", "images"},  # base utilities
    {"engine"},  # config, plans, cache, deciders, executors, enable()
    {"sampling", "generate"},  # samplers and the one generation workflow
    {"metrics"},  # paired metrics and Fréchet distance
    {"models", "embedded"},  # loading DiT models, the embedded model
    {"tuning"},  # calibrated plans, policy traces and training
    {"reporting"},  # Markdown, figures (reads result dicts, imports no study)
    {"studies"},  # ablation, fidelity sections, bench, peers, timing
    {"cli"},  # the command line
]
# Inside dqar/studies, lowest first: the sub-packages by concern (the study core is one module among them).
STUDY_LAYERS = [
    {"measure"},  # timing, intervals, memory, compile cache
    {"core"},  # the study core: reference, score, rows, frontiers
    {"peers"},  # peer methods and their rows
    {"ablation"},  # grid, runner, records, fidelity scoring, blocks, verify
    {"fidelity"},  # the docs/FIDELITY.md sections
    {"bench"},  # the executor bench and the GPU smoke run
    {"scale"},  # sharded sampling, FID
]
MAX_STUDY_MODULES_AT_ROOT = 2  # __init__ and core
MAX_TOP_LEVEL_MODULES = 12
MAX_LINES = 450


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _targets(path: Path) -> set[str]:
    """Every dqar module `path` imports, at module level or inside functions."""
    mod, found = _module(path), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dqar"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if _is_package(path) else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "dqar":
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule, else the module itself
                found.add(f"{name}.{a.name}" if f"{name}.{a.name}" in GRAPH_NODES else name)
    return {t for t in found if t in GRAPH_NODES and t != mod}


GRAPH_NODES = {_module(p) for p in PACKAGE.rglob("*.py")}


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if len(parts) == 1:
        return None  # the package root re-exports the public API
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{mod} belongs to no layer; add it to LAYERS and docs/ARCHITECTURE.md")


def _graph() -> dict[str, set[str]]:
    return {_module(p): _targets(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_layer():
    for mod in _graph():
        _layer(mod)


def test_no_import_goes_up_the_layers():
    bad = []
    for mod, targets in _graph().items():
        lm = _layer(mod)
        for t in targets:
            lt = _layer(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{mod} (layer {lm}) imports {t} (layer {lt})")
            if lt is None and lm is not None:
                bad.append(f"{mod} imports the package root")
    assert not bad, "\n".join(sorted(bad))


def _study_layer(mod: str) -> int | None:
    parts = mod.split(".")
    if parts[:2] != ["dqar", "studies"] or len(parts) < 3:
        return None
    for i, names in enumerate(STUDY_LAYERS):
        if parts[2] in names:
            return i
    raise AssertionError(f"{mod} belongs to no studies sub-package; add it to STUDY_LAYERS and docs/ARCHITECTURE.md")


def test_studies_sub_packages_import_downwards_only():
    bad = []
    for mod, targets in _graph().items():
        lm = _study_layer(mod)
        for t in targets:
            lt = _study_layer(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{mod} ({sorted(STUDY_LAYERS[lm])[0]}) imports {t} ({sorted(STUDY_LAYERS[lt])[0]})")
    assert not bad, "\n".join(sorted(bad))


def test_studies_are_grouped_in_sub_packages():
    loose = sorted(p.name for p in (PACKAGE / "studies").glob("*.py"))
    assert len(loose) <= MAX_STUDY_MODULES_AT_ROOT, loose


def test_the_study_layer_check_sees_an_upward_import():
    assert _study_layer("dqar.studies.measure.timing") < _study_layer("dqar.studies.bench.runner")
    with pytest.raises(AssertionError):
        _study_layer("dqar.studies.nowhere.x")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of modules in `graph` (including through imports inside functions), or None."""
    color, stack = {}, []

    def visit(node):
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in color:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for node in sorted(graph):
        if node not in color:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_few_modules_at_the_top_and_none_too_long():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("mod", ["dqar.studies.ablation.runner", "dqar.engine.reuse"])
def test_the_graph_sees_imports_inside_functions(mod):
    assert _graph()[mod], f"{mod} should import other dqar modules"
