"""Which implementation of a kernel runs: the Triton kernel or its plain PyTorch reference.

Every op in this package takes `impl`:
- "torch": the PyTorch reference (any device, any dtype; the definition the kernel is tested against);
- "triton": the Triton kernel; needs a CUDA tensor, or Triton's CPU interpreter (`TRITON_INTERPRET=1`
  set before triton is first imported; slow, for tests only);
- "auto": "triton" for CUDA tensors when triton is installed, "torch" otherwise.
Attention has a third choice, "sdpa" (PyTorch's fused scaled-dot-product attention).
"""
from __future__ import annotations

import os

import torch

from ..errors import ConfigError, require

try:  # optional: the `gpu` extra
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is installed wherever the tests run
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (decided when triton compiles the kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, tensor: torch.Tensor, allowed=("auto", "triton", "torch")) -> str:
    """Map `impl` to the implementation that runs for `tensor`; errors say how to fix the choice."""
    if impl not in allowed:
        raise ConfigError(f"impl={impl!r} is not supported here; expected one of {', '.join(map(repr, allowed))}")
    if impl == "auto":
        return "triton" if HAVE_TRITON and tensor.is_cuda else "torch"
    if impl == "triton":
        require("triton", "pip install 'mimic-engine[gpu]'", "the Triton kernels")
        if not tensor.is_cuda and not interpreting():
            raise ConfigError(
                f"impl='triton' got a tensor on {tensor.device}; Triton kernels need a CUDA tensor "
                "(or TRITON_INTERPRET=1 set before triton is imported, for CPU tests); use impl='torch' on CPU"
            )
    return impl


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): Triton block sizes must be powers of two, tl.dot needs >= 16."""
    p = minimum
    while p < n:
        p *= 2
    return p


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact ("ieee") products so the kernels match their fp32 references; half types
    use the tensor cores (their products are exact in fp32 accumulation anyway)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (R, H) with a unit stride along H (a view when possible): the layout of row kernels."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def row_launch_config(h: int) -> dict:
    """Row kernels (the norms): one program per row, the whole row of H values in registers."""
    return dict(BLOCK=next_pow2(h), num_warps=4 if h <= 2048 else 8)


def replace_modules(model: torch.nn.Module, match, make) -> int:
    """Replace, in place, every submodule `m` of `model` with `match(m)` true by `make(m)`. -> how many.

    How the kernels get into a model: `swap_t5_stacks`, `swap_quick_gelu` and the fp16 islands use it.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced
