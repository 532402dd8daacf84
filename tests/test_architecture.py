"""The house's shape, checked from the code: lab/ imports form no circle, point down the package order, and no
lab module is imported inside a function (each kept exception says why on its line)."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from lab import PROJECT_ROOT

# Bottom to top: a package may import its own modules and those of packages before it, never after.
PACKAGE_ORDER = ["config", "data", "models", "generation", "runs", "quantization", "evaluation", "cluster",
                 "training", "study"]
COMMANDS = "commands"  # lab/<name>.py: the `python -m lab.<name>` entry points, above every package


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")


def imports_of(source: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(lab module imported, line, inside a function) for every import of `source`, TYPE_CHECKING ones included."""
    tree = ast.parse(source)
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lab"):
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "lab"]
        else:
            continue
        found += [(target, node.lineno, id(node) in in_function) for target in targets if target != "lab"]
    return found


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
    known = {module_name(path) for path in files}
    return {module_name(path): {target for target, _, _ in imports_of(source, known)} - {module_name(path)}
            for path, source in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root] & graph.keys())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child] & graph.keys()))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # lab itself: errors and the project root
    if parts[1] in PACKAGE_ORDER:
        return PACKAGE_ORDER.index(parts[1])
    return len(PACKAGE_ORDER)  # a command


def lab_files(root: Path = PROJECT_ROOT) -> dict[str, str]:
    return {str(path.relative_to(root)): path.read_text() for path in sorted((root / "lab").rglob("*.py"))}


def files_at(revision: str) -> dict[str, str]:
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", revision, "lab"], cwd=PROJECT_ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return {name: subprocess.run(["git", "show", f"{revision}:{name}"], cwd=PROJECT_ROOT, check=True,
                                 capture_output=True, text=True).stdout for name in names if name.endswith(".py")}


def test_lab_has_no_import_cycle():
    assert cycles(import_graph(lab_files())) == []


def test_the_check_finds_the_cycles_of_the_flat_layout():
    # main at 72af4a5, before the packages: three circles, as the issue measured them
    try:
        old = files_at("72af4a53f3d144217fc7afae6d7b81ba1b4b937c")
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("that commit is not in this clone")
    found = cycles(import_graph(old))
    assert ["lab.models", "lab.size_matching"] in found
    assert ["lab.report", "lab.study_steps"] in found
    assert any("lab.settings" in component and "lab.model_io" in component for component in found)


def test_a_planted_cycle_is_found():
    files = {"lab/a.py": "def f():\n    from lab.b import g\n", "lab/b.py": "from lab.a import f\n"}
    assert cycles(import_graph(files)) == [["lab.a", "lab.b"]]


def test_imports_point_down_the_package_order():
    files = lab_files()
    known = {module_name(path) for path in files}
    upward = [f"{path}:{line} imports {target}" for path, source in files.items()
              for target, line, _ in imports_of(source, known)
              if layer(target) > layer(module_name(path))]
    assert upward == []


def test_no_lab_module_is_imported_inside_a_function():
    files = lab_files()
    known = {module_name(path) for path in files}
    inside = [f"{path}:{line} imports {target}" for path, source in files.items()
              for target, line, in_function in imports_of(source, known)
              if in_function and "lazily:" not in source.splitlines()[line - 1]]
    assert inside == []


def test_every_package_lists_its_modules():
    for package in PACKAGE_ORDER:
        folder = PROJECT_ROOT / "lab" / package
        index = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()), clean=False) or ""
        listed = {line.split()[0] for line in index.splitlines()[1:] if line.startswith("    ")}
        assert listed == {p.stem for p in folder.glob("*.py")} - {"__init__"}, package
