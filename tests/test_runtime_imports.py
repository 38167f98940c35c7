"""The runtime reads export folders through its own `export_format` module and never imports the
exporter (`mimic_engine.export`, the repository's export/ folder), not even inside a function."""
import ast
import os

import mimic_engine.runtime

RUNTIME_DIR = os.path.dirname(mimic_engine.runtime.__file__)


def imported_modules(path: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a runtime module, relative ones resolved."""
    package = ["mimic_engine", "runtime"]
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from .. import export` names a module too
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names] + [(node.lineno, module)]
    return found


def test_no_runtime_module_imports_the_exporter():
    modules = [os.path.join(RUNTIME_DIR, n) for n in sorted(os.listdir(RUNTIME_DIR)) if n.endswith(".py")]
    assert len(modules) >= 6, modules  # the walk really sees the backends
    offending = [f"{os.path.basename(path)}:{line} imports {name}" for path in modules
                 for line, name in imported_modules(path)
                 if name == "mimic_engine.export" or name.startswith("mimic_engine.export.")]
    assert not offending, offending


def test_the_check_sees_relative_and_nested_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from ..export.artifacts import Range\n    from .. import export\n"
                      "import mimic_engine.export.pipeline\nfrom .export_format import read_manifest\n")
    names = {name for _, name in imported_modules(str(sample))}
    assert {"mimic_engine.export.artifacts", "mimic_engine.export", "mimic_engine.export.pipeline"} <= names
    assert "mimic_engine.runtime.export_format" in names
