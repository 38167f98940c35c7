"""T5-style RMS norm fused with the residual add.

    s = x + delta                      (the residual stream after a sub-layer, kept in x's dtype)
    y = s / sqrt(mean(s^2) + eps) * w  (T5LayerNorm: no mean subtraction, no bias)

In a T5 block every sub-layer ends with `hidden = hidden + sublayer(...)` and the next sub-layer
starts with `layer_norm(hidden)`; fusing both reads the residual row once instead of three times
and launches one kernel instead of about six (add, cast, pow, mean, rsqrt, mul, mul).

Statistics are always fp32 (an fp16 sum of squares of T5 activations overflows). Typical use in the
CUDA backend: x fp32 (the residual stream is an fp32 island), delta fp16 or fp32 (a sub-layer's
output), y fp16 (the input of the next fp16 matmul).
"""
from __future__ import annotations

import torch

from .dispatch import HAVE_TRITON, as_rows, resolve_impl, row_launch_config

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_residual_kernel(
        X, Delta, W, SumOut, Y,
        stride_x, stride_d, stride_s, stride_y,
        n_cols, eps,
        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # one program per row; the whole row (H <= BLOCK) sits in registers
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        s = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_DELTA:
            s += tl.load(Delta + row * stride_d + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(SumOut + row * stride_s + cols, s.to(SumOut.dtype.element_ty), mask=inside)
        variance = tl.sum(s * s, axis=0) / n_cols
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        y = s * tl.rsqrt(variance + eps) * w
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)


def rmsnorm_residual_reference(x, delta, weight, eps: float = 1e-6, out_dtype=None):
    """Plain PyTorch definition of `rmsnorm_residual` (same arguments, same results)."""
    s = x.float() if delta is None else x.float() + delta.float()
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(out_dtype or x.dtype)
    return y if delta is None else (s.to(x.dtype), y)


def rmsnorm_residual(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6,
                     out_dtype: torch.dtype | None = None, impl: str = "auto"):
    """Residual add + T5 RMS norm.

    x (..., H) fp32/fp16/bf16, delta (..., H) any float dtype or None, weight (H,) any float dtype.
    Returns (s, y) with s = x + delta in x's dtype and y = rmsnorm(s) * weight in `out_dtype`
    (default x's dtype); with delta=None returns y only (a plain T5LayerNorm with fp32 statistics).
    The last dimension must be contiguous; H up to 65536.
    """
    if impl != "torch":
        impl = resolve_impl(impl, x)
    if impl == "torch":
        return rmsnorm_residual_reference(x, delta, weight, eps, out_dtype)
    h = x.shape[-1]
    x2 = as_rows(x)
    d2 = as_rows(delta) if delta is not None else x2
    if delta is not None and d2.shape != x2.shape:
        raise ValueError(f"rmsnorm_residual: delta shape {tuple(delta.shape)} differs from x shape {tuple(x.shape)}")
    y = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    s = torch.empty_like(x2) if delta is not None else y  # SumOut is not written without delta
    if x2.shape[0]:
        _rmsnorm_residual_kernel[(x2.shape[0],)](
            x2, d2, weight, s, y,
            x2.stride(0), d2.stride(0), s.stride(0), y.stride(0),
            h, eps,
            HAS_DELTA=delta is not None, **row_launch_config(h),
        )
    y = y.view(x.shape)
    return y if delta is None else (s.view(x.shape), y)
