"""The package's layers import downward only, and no module imports itself in a circle.

Every import of the package's own modules counts, those inside functions too (a lazy
import hides a cycle until the day it runs). An edge goes to the module named: ``from
osmd_ray.methods import osmd`` to ``osmd_ray.methods.osmd``, ``from osmd_ray.methods import
METHODS`` to the package ``osmd_ray.methods`` itself. The layers are the README's (Layout).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "osmd_ray"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "osmd_ray.version",
            "osmd_ray.errors",
            "osmd_ray.storage",
            "osmd_ray.ray_private_api",
            "osmd_ray.cluster",
            "osmd_ray.figures",
        ),
    ),
    ("config", ("osmd_ray.config",)),
    ("data", ("osmd_ray.data",)),
    ("blocks", ("osmd_ray.blocks",)),
    ("methods", ("osmd_ray.methods",)),
    ("deployment", ("osmd_ray.deploy", "osmd_ray.predict", "osmd_ray.viz")),
    ("train", ("osmd_ray.train",)),
    ("experiments", ("osmd_ray.experiments",)),
    ("cli", ("osmd_ray.cli",)),
    ("package", ("osmd_ray",)),
]
"""Bottom to top: a module may import its own layer's modules and those of layers below."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer whose prefix names ``module`` most specifically."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and the README")
    return best


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported package module, line) for every import of the package in ``path``."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("osmd_ray")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("osmd_ray"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_imports_go_downward_only():
    upward = []
    for module, edges in import_graph().items():
        for target, line in edges:
            if layer_of(target) > layer_of(module):
                upward.append(
                    f"{module}:{line} imports {target} "
                    f"({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in edges if t != m}) for m, edges in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, cyclic",
    [
        ({"a": ["b"], "b": ["c"], "c": []}, False),
        ({"a": ["b"], "b": ["c"], "c": ["a"]}, True),
        ({"a": ["a2"], "a2": [], "b": ["b"]}, True),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic


def test_an_upward_import_would_be_reported(tmp_path):
    # The checker itself: a data module importing train is against the layers.
    source = tmp_path / "fake.py"
    source.write_text("def f():\n    from osmd_ray.train.runner import train\n")
    edges = imports_of("osmd_ray.data.fake", source, modules())
    assert edges == [("osmd_ray.train.runner", 2)]
    assert layer_of("osmd_ray.train.runner") > layer_of("osmd_ray.data.fake")
