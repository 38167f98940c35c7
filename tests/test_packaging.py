"""Installation-level checks: light imports, the `kernels` name trap, the console script."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_mimic_engine_is_light():
    out = run_python(
        "import sys, mimic_engine, mimic_engine.config, mimic_engine.cli, mimic_engine.errors\n"
        "heavy = [m for m in ('torch', 'transformers', 'hnswlib', 'onnxruntime', 'tensorrt', 'fastapi', 'triton') if m in sys.modules]\n"
        "print(heavy)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_transformers_and_a_model_load_work_from_the_repo_root():
    # With the repository root first on sys.path, `import kernels` finds our kernels/ folder;
    # transformers' probe for the PyPI package of that name must still work and not use it.
    out = run_python(
        "import sys; sys.path.insert(0, '.')\n"
        "import kernels\n"
        "assert not hasattr(kernels, '__version__'), 'kernels/__init__.py must not define __version__'\n"
        "import transformers\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print('kernels available:', is_kernels_available())\n"
        "from mimic_engine.encoder import MimicEncoder\n"
        "from mimic_engine.preprocess import Item\n"
        "print(MimicEncoder.from_preset('tiny').encode([Item(text='hi')]).shape)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "kernels available: False" in out.stdout and "(1, 16)" in out.stdout


def test_console_script_lists_commands():
    out = subprocess.run([sys.executable, "-m", "mimic_engine.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout
