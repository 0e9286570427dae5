"""The import graph keeps the layers the README describes: ``inference/`` is pure computation, no cycles.

Imports are read with :mod:`ast` (nothing is imported). Every import counts, at module level
or inside a function, except those under ``if TYPE_CHECKING:`` (never executed): a deferred
import inside a function delays loading, it does not remove the dependency, so a cycle through
one is still a cycle. One deliberate exception: a package's ``__init__`` may load one of its
own submodules inside a function (``inference.models.load_model`` imports the module of the
model kind asked for, so a node without torch never imports it); that is a factory, not a
dependency of the package on its parts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_node", "db", "inference")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` (in ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    factory_of_own_parts: set[str] = set()  # an __init__'s submodules imported inside its functions

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for branch in node.orelse:
                visit(branch, in_function)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [_known(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules else _known(base, modules))
        for target in targets:
            if in_function and path.name == "__init__.py" and target.startswith(f"{name}."):
                factory_of_own_parts.add(target)
            else:
                found.add(target)
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return {module for module in found - factory_of_own_parts if module in modules and module != name}


def _known(name: str, modules: dict[str, Path]) -> str:
    """``name`` itself if it is a project module, else its nearest project package (or "")."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_inference_imports_nothing_from_the_node_or_the_database():
    graph = import_graph()
    upward = {
        module: sorted(target for target in targets if target.split(".")[0] in ("dicom_node", "db"))
        for module, targets in graph.items()
        if module.split(".")[0] == "inference"
    }
    assert {module: targets for module, targets in upward.items() if targets} == {}


def test_project_modules_import_each_other_without_a_cycle():
    assert find_cycle(import_graph()) is None


def test_the_pipeline_lives_in_the_node_and_the_worker_loop_beside_it():
    graph = import_graph()
    assert "dicom_node.pipeline" in graph["dicom_node.worker"]
    assert "dicom_node.worker" not in graph["dicom_node.pipeline"]
    assert "inference.worker" not in graph and "inference.phantom" not in graph


@pytest.mark.parametrize(
    ("source", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle(source, cycle):
    assert find_cycle(source) == cycle
