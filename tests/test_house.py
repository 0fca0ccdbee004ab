"""The house rules that a reader can check by counting: no module over 600 lines, no function over 80, no import cycle."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "untrainable"
MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_a_module_stays_short_and_so_do_its_functions(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 600, f"{path.name}: {len(text.splitlines())} lines; split it by idea"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"{path.name}: functions over 80 lines: {', '.join(long)}"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, here: str, modules: set[str]) -> set[str]:
    """The `modules` that module `here` (file `path`) imports anywhere: top level, in functions, under TYPE_CHECKING."""
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import sub` imports the module pkg.sub, else a name of pkg
                name = f"{base}.{alias.name}"
                found |= {name} if name in modules else ({base} if base in modules else set())
    return found - {here}


def import_cycles(package: Path) -> list[list[str]]:
    """Cycles of the import graph among the modules of the package in folder `package`, one shortest cycle
    through each module found on one (a module once on a reported cycle starts no other)."""
    names = {_module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    graph = {name: sorted(_imports(path, name, set(names))) for name, path in names.items()}
    cycles, done = [], set()

    def path_back(start: str) -> list[str] | None:  # a shortest path start -> ... -> start, by breadth first
        parents, frontier = {}, [start]
        while frontier:
            following = []
            for node in frontier:
                for nxt in graph[node]:
                    if nxt == start:
                        chain = [node]
                        while chain[-1] != start:
                            chain.append(parents[chain[-1]])
                        return [start, *reversed(chain[:-1]), start]
                    if nxt not in parents and nxt not in done:
                        parents[nxt] = node
                        following.append(nxt)
            frontier = following
        return None

    for module in sorted(graph):
        cycle = path_back(module)
        if cycle is not None:
            cycles.append(cycle)
            done |= set(cycle)
    return cycles


def test_import_cycles_are_found(tmp_path):
    """The check itself: a lazy import inside a function and a TYPE_CHECKING import both close a cycle."""
    package = tmp_path / "untrainable"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from untrainable.sub import b\n")
    (package / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n")
    (package / "c.py").write_text("from untrainable import a\n")
    assert import_cycles(package) == [["untrainable.a", "untrainable.sub.b", "untrainable.a"]]


def test_no_module_of_the_package_imports_itself_around_a_circle():
    """An import cycle, even a lazy one, means a type or function sits above one of its users: move it below both."""
    cycles = import_cycles(SRC)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


EXECUTORS = ("untrainable.executor", "untrainable.local_executor", "untrainable.slurm", "untrainable.dispatch")
CONSUMERS = ("untrainable.experiment", "untrainable.tune", "untrainable.compare", "untrainable.arms")


def test_no_executor_reaches_the_experiments_or_the_tuner():
    """The executors, and all they import (lazily too), know work items, never experiments, arms or studies."""
    names = {_module_name(path, SRC): path for path in sorted(SRC.rglob("*.py"))}
    graph = {name: _imports(path, name, set(names)) for name, path in names.items()}
    for executor in EXECUTORS:
        reached, frontier = set(), [executor]
        while frontier:
            frontier = [n for node in frontier for n in graph[node] if n not in reached]
            reached |= set(frontier)
        assert not reached & set(CONSUMERS), f"{executor} reaches {sorted(reached & set(CONSUMERS))}"
