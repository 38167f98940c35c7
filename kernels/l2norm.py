"""The final projection with L2 normalisation: pooled decoder state -> unit embedding.

    e = normalize(x @ W^T + b)     x (B, K), W (E, K), b (E,) -> e (B, E) fp32, ||e|| = 1

`F.normalize` semantics: e = y / max(||y||, 1e-12), so an all-zero row stays zero instead of NaN.
Without a weight (the model's head is an identity when the embedding size equals the hidden size)
only the normalisation runs.

One kernel fuses what PyTorch runs as up to six (matmul, bias add, cast to fp32, square-sum,
sqrt/clamp, divide). Each program owns BLOCK_M rows and the *whole* output row (E <= MAX_E = 1024;
wider rows use the reference), so the norm needs no second pass. The GEMM is tiny (B x K x E,
about 75 MFLOP at batch 64 for 768 x 768), which is why a hand-written tile loop is as good as
cuBLAS here. x and W fp16, bf16 or fp32 (W cast to x's dtype for the product), fp32 accumulation,
fp32 output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import HAVE_TRITON, dot_precision, next_pow2, resolve_impl

MAX_E = 1024  # widest output row kept in one program's registers (wider ones spill: the reference runs)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _linear_l2norm_kernel(
        X, W, Bias, Out,
        sx_m, sx_k, sw_e, sw_k, so_m,
        M, K, E, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_E)
        row_in = rows < M
        col_in = cols < E
        if HAS_WEIGHT:
            acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_in = ks < K
                x = tl.load(X + rows[:, None] * sx_m + ks[None, :] * sx_k,
                            mask=row_in[:, None] & k_in[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
                w = tl.load(W + cols[None, :] * sw_e + ks[:, None] * sw_k,
                            mask=col_in[None, :] & k_in[:, None], other=0.0)  # (BLOCK_K, BLOCK_E) = W^T tile
                acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        else:  # identity head: K == E
            acc = tl.load(X + rows[:, None] * sx_m + cols[None, :] * sx_k,
                          mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        norm = tl.sqrt(tl.sum(acc * acc, axis=1))  # padded columns are exactly 0
        out = acc / tl.maximum(norm, eps)[:, None]
        tl.store(Out + rows[:, None] * so_m + cols[None, :], out, mask=row_in[:, None] & col_in[None, :])


def linear_l2norm_reference(x, weight=None, bias=None, eps: float = 1e-12) -> torch.Tensor:
    """Plain PyTorch definition of `linear_l2norm` (fp32 math)."""
    y = x.float()
    if weight is not None:
        y = F.linear(y, weight.float(), None if bias is None else bias.float())
    elif bias is not None:
        y = y + bias.float()
    return F.normalize(y, dim=-1, eps=eps)


def linear_l2norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  eps: float = 1e-12, impl: str = "auto") -> torch.Tensor:
    """x (B, K), weight (E, K) or None (identity), bias (E,) or None -> (B, E) fp32 unit rows.

    Rows wider than MAX_E outputs use the reference (one program could not hold the row).
    """
    if x.dim() != 2:
        raise ValueError(f"linear_l2norm wants x as (B, K); got shape {tuple(x.shape)}")
    e = weight.shape[0] if weight is not None else x.shape[1]
    if weight is not None and weight.shape[1] != x.shape[1]:
        raise ValueError(f"linear_l2norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)} "
                         f"(want (E, K={x.shape[1]}))")
    if bias is not None and tuple(bias.shape) != (e,):
        raise ValueError(f"linear_l2norm: bias {tuple(bias.shape)} must be (E={e},)")
    if impl != "torch":
        impl = resolve_impl(impl, x)
    if impl == "torch" or e > MAX_E:
        return linear_l2norm_reference(x, weight, bias, eps)
    m = x.shape[0]
    out = torch.empty(m, e, dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    cfg = launch_config(e)
    _linear_l2norm_kernel[(math.ceil(m / cfg["BLOCK_M"]),)](
        x, weight if weight is not None else x, bias if bias is not None else x, out,
        x.stride(0), x.stride(1),
        weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 0,
        out.stride(0),
        m, x.shape[1], e, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype), **cfg,
    )
    return out


def launch_config(e: int) -> dict:
    """Tiles for an output row of E values: the (BLOCK_M, BLOCK_E) fp32 accumulator lives in registers,
    the BLOCK_K x BLOCK_E tile of W^T (and its pipeline copy) in shared memory. Checked to compile without
    spills for sm_80 / sm_90 by tests/test_kernels_compile.py."""
    block_e = next_pow2(e)
    return dict(BLOCK_M=16, BLOCK_E=block_e, BLOCK_K=32 if block_e <= 512 else 16,
                num_warps=4 if block_e <= 256 else 8, num_stages=2)
