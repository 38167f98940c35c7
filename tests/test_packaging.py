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


EXPECTED_COMMANDS = ("train", "compare", "mine", "demo", "eval", "export", "serve", "index", "search", "bench")


def test_console_script_lists_every_command_and_each_one_answers_help():
    from click.testing import CliRunner

    from mimic_engine.cli import cli

    out = subprocess.run([sys.executable, "-m", "mimic_engine.cli", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("Commands:", 1)[1].split()
    missing = [name for name in EXPECTED_COMMANDS if name not in listed]
    assert not missing, f"`mimic-engine --help` does not list {missing}:\n{out.stdout}"
    for argv in [[name, "--help"] for name in EXPECTED_COMMANDS] + [["index", "build", "--help"]]:
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 0, f"mimic-engine {' '.join(argv)} failed: {result.output}"
        assert f"Usage: cli {' '.join(argv[:-1])}" in result.output and "--help" in result.output


def test_training_scripts_are_the_same_commands():
    """`python training/train.py` runs `mimic-engine train`: same options, same errors."""
    out = subprocess.run([sys.executable, "training/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for flag in ("--config", "--preset", "--caption-dropout", "--mixin", "--no-query-caption-dropout", "--select-keep",
                 "--text-model", "--resume", "--no-progress", "--device"):
        assert flag in out.stdout, flag
    bad = subprocess.run([sys.executable, "training/compare.py", "--variants", "nope", "--steps", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown variant(s) ['nope']" in bad.stderr


def test_library_modules_do_not_import_click():
    out = run_python("import sys, mimic_engine.index, mimic_engine.index.build, mimic_engine.server.bootstrap, "
                     "mimic_engine.device\nprint('click' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
