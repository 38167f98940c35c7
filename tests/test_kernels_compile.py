"""The Triton kernels compile to GPU machine code for the cards this project targets, without a GPU.

`triton.compile` with a `GPUTarget` runs Triton's whole pipeline down to a cubin with the ptxas
bundled in the triton wheel, for the exact launch configurations the wrappers pick: it catches
type errors, unsupported operations and shared-memory overuse, and ptxas' report shows register
spills. It does not run the kernels (tests/test_kernels.py does, on a GPU or in the interpreter).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'mimic-engine[gpu]')")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # pragma: no cover - other triton versions
    pytest.skip(f"this triton ({triton.__version__}) has no ahead-of-time compile API: {exc}", allow_module_level=True)

from mimic_engine.kernels import activations, attention, l2norm, layernorm, rmsnorm
from mimic_engine.kernels.dispatch import row_launch_config

# (arch, usable shared memory per block in bytes)
TARGETS = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64"}
FLOAT_ARGS = {"scale", "eps"}


def compile_for(fn, pointers: dict, constexprs: dict, options: dict, arch: int):
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature = {}
    for name in fn.arg_names:
        if name in constexpr_names:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = PTR[pointers[name]]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_report(kernel, arch: int) -> str | None:
    """ptxas -v output for the kernel's PTX, or None when no bundled ptxas accepts it."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(kernel.asm["ptx"])
        for exe in ("ptxas-blackwell", "ptxas"):
            path = os.path.join(bindir, exe)
            if not os.path.exists(path):
                continue
            gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
            proc = subprocess.run([path, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                return proc.stdout + proc.stderr
    return None


def check(kernel, target: str):
    arch, shared_limit = TARGETS[target]
    assert kernel.asm.get("cubin"), "no machine code was produced"
    assert kernel.metadata.shared <= shared_limit, f"{kernel.metadata.shared} bytes of shared memory on {target}"
    report = ptxas_report(kernel, arch)
    if report is not None:
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
        assert spills and max(spills) == 0, f"register spills on {target}:\n{report}"


def split(cfg: dict):
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    return cfg, options


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (M, N, D): T5-base encoder self-attention, the decoder's cross-attention over 128 + 49 tokens, tiny;
# sm_80 is checked on the largest tile only (keeps the test short)
ATTENTION_CASES = ([("sm_90", dt, shape) for dt in DTYPES for shape in [(128, 128, 64), (1, 177, 64), (33, 33, 16)]]
                   + [("sm_80", dt, (128, 128, 64)) for dt in DTYPES])


@pytest.mark.parametrize("target,dtype,shape", ATTENTION_CASES)
def test_attention_kernel_compiles(target, dtype, shape):
    from mimic_engine.kernels.dispatch import dot_precision

    m, n, d = shape
    cfg, options = split(attention.launch_config(m, n, d, dtype))
    k = compile_for(attention._attention_kernel, {"Q": dtype, "K": dtype, "V": dtype, "Bias": torch.float32,
                                                   "Mask": torch.int64, "Out": dtype},
                    dict(HAS_BIAS=True, HAS_MASK=True, PRECISION=dot_precision(dtype), **cfg), options,
                    TARGETS[target][0])
    check(k, target)


@pytest.mark.parametrize("h", [32, 384, 768])
def test_rmsnorm_kernel_compiles(h):
    cfg, options = split(row_launch_config(h))
    for has_delta in (True, False):
        k = compile_for(rmsnorm._rmsnorm_residual_kernel, {"X": torch.float32, "Delta": torch.float16,
                                                           "W": torch.float32, "SumOut": torch.float32,
                                                           "Y": torch.float16},
                        dict(HAS_DELTA=has_delta, **cfg), options, 90)
        check(k, "sm_90")


@pytest.mark.parametrize("h", [32, 384, 768])
def test_layer_norm_kernel_compiles(h):
    cfg, options = split(row_launch_config(h))
    k = compile_for(layernorm._layer_norm_kernel, {"X": torch.float16, "W": torch.float32, "B": torch.float32,
                                                   "Y": torch.float16},
                    dict(HAS_WEIGHT=True, HAS_BIAS=True, **cfg), options, 90)
    check(k, "sm_90")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quick_gelu_kernel_compiles(dtype):
    k = compile_for(activations._quick_gelu_kernel, {"X": dtype, "Y": dtype}, dict(BLOCK=activations.BLOCK), {}, 90)
    check(k, "sm_90")


@pytest.mark.parametrize("e,with_weight", [(16, True), (768, True), (768, False), (l2norm.MAX_E, True)])
def test_linear_l2norm_kernel_compiles(e, with_weight):
    cfg, options = split(l2norm.launch_config(e))
    k = compile_for(l2norm._linear_l2norm_kernel, {"X": torch.float16, "W": torch.float16, "Bias": torch.float32,
                                                   "Out": torch.float32},
                    dict(HAS_WEIGHT=with_weight, HAS_BIAS=True, PRECISION="tf32", **cfg), options, 90)
    check(k, "sm_90")
