"""bitfold's layering: the import graph between its packages has no cycle and every import points down the table.

The graph is built statically from the source (``ast``): every ``import`` and ``from ... import`` anywhere in a
module counts, at module level or inside a function (a function-level import hides a cycle from the interpreter,
not from a reader), and so does ``importlib.import_module("bitfold...")`` with a literal name.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bitfold"

#: The top-level modules of bitfold/passes (registry, analysis, initializers, ...): what every family builds on.
PASSES_SHARED = "bitfold.passes.<shared>"

#: Layers, top to bottom. A module imports modules of its own unit and of units in LOWER layers only; units that
#: share a layer never import each other. A unit is a package (``bitfold.tools``), a passes family
#: (``bitfold.passes.quant``), a top-level module (``bitfold.summary``), or one of two special cases:
#: ``bitfold`` is the public API in bitfold/__init__.py, ``bitfold.passes`` is bitfold/passes/__init__.py, which
#: imports (and so registers) every family.
LAYERS: list[list[str]] = [
    ["bitfold.__main__"],
    ["bitfold.tools"],  # the CLI, debug, bench, allocate: consumers of everything below
    ["bitfold"],  # the public API; it wires the built-in calibration sources (bitfold.eval) into bitfold.quant
    ["bitfold.eval"],  # real-model tasks, data and the built-in calibration sources: a consumer, like tools
    ["bitfold.pipeline", "bitfold.llm"],  # recipes, the pass manager and the exclusion loop | decoder LLM graphs
    ["bitfold.summary"],
    ["bitfold.passes"],
    ["bitfold.passes.sparse", "bitfold.passes.learned"],  # build on multless's weight pass | learned: on quant's and multless's emission
    ["bitfold.passes.multless"],
    ["bitfold.passes.quant"],
    ["bitfold.passes.transforms", "bitfold.passes.canonical"],
    [PASSES_SHARED],
    ["bitfold.backends"],  # ONNX Runtime and TVM runnables; TVM lowers bitfold's ops to kernels
    ["bitfold.kernels"],
    ["bitfold.quant"],  # formats, calibration statistics (run through bitfold.runtime), solvers (GPTQ, AWQ, ...)
    ["bitfold.ops", "bitfold.runtime"],  # op specs (layouts, references, ONNX functions) | ONNX Runtime sessions
    ["bitfold.frontend", "bitfold.parallel"],  # | where independent work runs: here or on Ray
    ["bitfold.errors"],
]

RANK = {unit: rank for rank, layer in enumerate(LAYERS) for unit in layer}


@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported bitfold module
    line: int
    nested: bool  # inside a function or class

    def __str__(self) -> str:
        return f"{self.source}:{self.line}{' (function-level)' if self.nested else ''} imports {self.target}"


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def scan(root: Path) -> list[Import]:
    """Every import of a module of the package at ``root`` by a module of it."""
    known = modules(root)
    package = root.name

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        nested_nodes = {
            id(inner)
            for outer in ast.walk(tree) if isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            for inner in ast.walk(outer) if inner is not outer
        }  # fmt: skip
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names]
            elif (
                isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            ):  # fmt: skip
                targets = [node.args[0].value]
            for target in targets:
                if target.split(".")[0] != package:
                    continue
                resolved = resolve(target)
                if resolved is not None and resolved != name:
                    found.append(Import(name, resolved, node.lineno, id(node) in nested_nodes))
    return list(dict.fromkeys(found))


def unit(module: str, root: Path = PACKAGE) -> str:
    """The layering unit a module belongs to (see LAYERS)."""
    parts = module.split(".")
    if len(parts) == 1 or module == f"{parts[0]}.passes":
        return module
    if parts[1] == "passes":
        return ".".join(parts[:3]) if (root / "passes" / parts[2]).is_dir() else PASSES_SHARED
    return ".".join(parts[:2])


def unit_graph(found: list[Import]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for imp in found:
        a, b = unit(imp.source), unit(imp.target)
        if a != b:
            graph.add_edge(a, b)
            graph.edges[a, b].setdefault("sites", []).append(imp)
    return graph


@pytest.fixture(scope="module")
def found() -> list[Import]:
    return scan(PACKAGE)


def _cycle_text(graph: nx.DiGraph, cycle: list[str]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        steps.append(f"  {a} -> {b}: " + "; ".join(str(s) for s in graph.edges[a, b]["sites"][:3]))
    return " -> ".join([*cycle, cycle[0]]) + "\n" + "\n".join(steps)


def test_no_cycle_between_packages(found):
    graph = unit_graph(found)
    cycles = sorted(nx.simple_cycles(graph), key=lambda c: (len(c), c))
    assert not cycles, f"{len(cycles)} import cycle(s) between bitfold's packages:\n" + "\n".join(_cycle_text(graph, c) for c in cycles[:20])


def test_every_module_belongs_to_a_listed_layer():
    units = {unit(m) for m in modules(PACKAGE)}
    assert not units - set(RANK), f"add these units to LAYERS in tests/test_layering.py: {sorted(units - set(RANK))}"


def test_every_import_points_down_the_layers(found):
    upward = [
        f"{imp}  ({unit(imp.source)} may not import {unit(imp.target)})"
        for imp in found
        if unit(imp.source) != unit(imp.target) and RANK.get(unit(imp.target), -1) <= RANK.get(unit(imp.source), len(RANK))
    ]
    assert not upward, f"{len(upward)} import(s) against the layering:\n" + "\n".join(upward)


def test_no_cycle_between_modules(found):
    """Within a package too, modules import each other one way only. Exempt: a package's ``__init__`` importing its
    own submodules (its public face, or a registry loading its plugins), which they may import back."""
    graph = nx.DiGraph()
    for imp in found:
        if not imp.target.startswith(imp.source + "."):
            graph.add_edge(imp.source, imp.target)
    cycles = sorted(nx.simple_cycles(graph), key=lambda c: (len(c), c))
    assert not cycles, f"{len(cycles)} import cycle(s) between modules:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles[:20])


def test_the_scanner_sees_function_level_relative_and_dynamic_imports(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from pkg import low\n")
    (root / "low.py").write_text("def f():\n    from pkg.sub import high\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "high.py").write_text("from .. import low\nimport importlib\nM = importlib.import_module('pkg.sub')\nimport os\n")
    got = {(i.source, i.target, i.nested) for i in scan(root)}
    assert got == {
        ("pkg", "pkg.low", False),
        ("pkg.low", "pkg.sub.high", True),
        ("pkg.sub.high", "pkg.low", False),
        ("pkg.sub.high", "pkg.sub", False),
    }
    graph = nx.DiGraph([(a, b) for a, b, _ in got])
    assert [set(c) for c in nx.simple_cycles(graph)] == [{"pkg.low", "pkg.sub.high"}]
