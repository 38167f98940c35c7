"""The layout rules, checked on the source (AST) rather than by convention:

- no import circle between the project's modules (imports inside functions count too: a lazy
  import still makes two modules depend on each other);
- the runtime never imports the exporter (the export folder's format is owned by the runtime);
- the Triton kernels import neither the runtime nor the benchmarks;
- nothing but a command line imports a `cli` module, so library code cannot hide in one;
- importing the library side of the index does not import click.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> the package name it installs as (pyproject's package-dir)
SOURCES = {"mimic_engine": "mimic_engine", "export": "mimic_engine.export",
           "training": "mimic_engine.training", "kernels": "mimic_engine.kernels"}


def project_modules() -> dict[str, str]:
    """module name -> file path, for every .py file of the installed packages."""
    modules = {}
    for folder, package in SOURCES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), base)[:-3].replace(os.sep, ".")
                module = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                if folder == "mimic_engine" and module.split(".")[1:2] and module.split(".")[1] in ("export", "training", "kernels"):
                    continue
                modules[module] = os.path.join(dirpath, name)
    return modules


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere in its file (resolved to known names)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base_parts = parts if is_package else parts[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            # the longest known prefix: `from mimic_engine.index import build_index` -> mimic_engine.index
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert {"mimic_engine.cli", "mimic_engine.runtime", "mimic_engine.export", "mimic_engine.training",
            "mimic_engine.kernels", "mimic_engine.index"} <= set(graph)
    assert "mimic_engine.config" in graph["mimic_engine.modeling"] or any(
        "mimic_engine.config" in graph[m] for m in graph if m.startswith("mimic_engine.modeling"))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def without_package_reexports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges from a package's __init__ to its own submodules: `__init__` re-exporting what its
    modules define is not a circle unless a module also needs something back from another one."""
    return {m: {w for w in deps if not w.startswith(m + ".")} for m, deps in graph.items()}


def test_no_import_circle():
    found = cycles(without_package_reexports(import_graph()))
    assert not found, f"import circles (each line: modules that import each other): {found}"


def test_runtime_never_imports_the_exporter():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("mimic_engine.export"))
           for m, deps in graph.items() if m.startswith("mimic_engine.runtime")}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"the runtime must read export folders itself, not through the exporter: {bad}"


def test_kernels_import_neither_runtime_nor_benchmarks():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith(("mimic_engine.runtime", "mimic_engine.bench")))
           for m, deps in graph.items() if m.startswith("mimic_engine.kernels")}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"kernels are leaves: {bad}"


def is_cli(module: str) -> bool:
    """A command-line module: a `cli` module, or the options shared by the command lines."""
    return module.rpartition(".")[2] in ("cli", "cli_options")


def test_only_command_lines_import_cli_modules():
    graph = import_graph()
    # entry-point scripts (python training/train.py ...) are command lines too
    entry_points = {"mimic_engine.training.train", "mimic_engine.training.compare", "mimic_engine.training.mine"}
    bad = {m: sorted(d for d in deps if is_cli(d))
           for m, deps in graph.items() if not is_cli(m) and m not in entry_points}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"library code imports a cli module (move what it needs out of the cli): {bad}"


def test_library_side_of_the_index_does_not_import_click():
    code = "import sys, mimic_engine.index; print('click' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
