"""The package's import graph: no cycles, and the pure-torch layer imports nothing from the framework layer.

Every `ddpm` import counts, at module level or inside a function (a function-level import hides a cycle from
Python, not from the design); imports under `if TYPE_CHECKING:` are annotations only and do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ddpm"
PURE = {"schedules", "diffusion", "samplers", "guidance", "unet", "metrics", "digits_classifier", "images", "registry", "atomic"}
FRAMEWORK = {"module", "data", "callbacks", "sample_callbacks", "checkpoints", "evaluation", "schema", "config", "errors",
             "runlock", "hardware", "report", "loggers", "edit_inputs", "diffusers_io", "convert", "drawing"}  # fmt: skip
PACKAGE = {"__init__"}  # re-exports the public API: GaussianDiffusion, UNet, make_betas


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def ddpm_imports(path: Path) -> set[str]:
    """The ddpm modules `path` imports anywhere in its body, outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "ddpm" or node.module.startswith("ddpm.")):
            if node.module == "ddpm":  # from ddpm import runlock / GaussianDiffusion
                found.update(a.name if (SRC / f"{a.name}.py").exists() else "__init__" for a in node.names)
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ddpm."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found - {path.stem}


GRAPH = {p.stem: ddpm_imports(p) for p in sorted(SRC.glob("*.py"))}


def test_every_module_has_a_layer() -> None:
    """A new module joins a layer here, so the rules below apply to it."""
    assert set(GRAPH) == PURE | FRAMEWORK | PACKAGE, set(GRAPH) ^ (PURE | FRAMEWORK | PACKAGE)
    assert not PURE & FRAMEWORK


def test_the_walk_sees_imports() -> None:
    """The walker finds module-level and function-level imports (so the tests below can fail)."""
    assert {"diffusion", "schedules", "unet", "schema"} <= GRAPH["module"]
    assert "samplers" in GRAPH["schema"]  # inside check_module
    assert "diffusion" not in GRAPH["samplers"]  # only under TYPE_CHECKING


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_layer_imports_no_framework(name: str) -> None:
    assert not GRAPH[name] & (FRAMEWORK | PACKAGE), f"ddpm.{name} imports {sorted(GRAPH[name] & (FRAMEWORK | PACKAGE))}"


def test_no_import_cycles() -> None:
    """Depth-first search over the graph; a back edge is a cycle, reported as its path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
