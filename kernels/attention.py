"""Attention with an additive (T5 relative-position) bias and a key padding mask.

    out[b, h, m] = sum_n softmax_n(scale * q[b,h,m] . k[b,h,n] + bias[h,m,n], n kept) v[b,h,n]

Used for the T5 encoder's self-attention (bias = T5's bucketed relative position bias, mask = text
padding) and for the fusion decoder's cross-attention over the concatenated text + visual memory
(no bias, mask = text mask ++ visual mask).

Shapes: q (B, Hh, M, D), k and v (B, Hh, N, D), any strides (views of a fused QKV projection need
no copy); bias (Hh, M, N) or (1, Hh, M, N), broadcast over the batch, float; key_mask (B, N) bool or
int (nonzero = attend). Output (B, M, Hh, D), contiguous, so `.view(B, M, Hh * D)` feeds the output
projection without a transpose. q/k/v fp16, bf16 or fp32; scores, softmax and the P @ V
accumulation are fp32.

Masking never uses a dtype's minimum value (fp16's becomes -inf after the bias add, and an
all-masked row then gives NaN): masked keys are excluded explicitly, and a row whose keys are all
masked returns zeros. In the model such rows are only the pad rows the CUDA backend adds to fill a
shape bucket, which are sliced off.

Three implementations:
- "triton": a flash-attention style kernel (online softmax over key blocks; the (B, Hh, M, N) score
  and mask tensors are never materialised); bias and mask are read inside the kernel.
- "sdpa": PyTorch's `scaled_dot_product_attention` with a finite additive mask built from the bias
  and the padding mask (on CUDA it dispatches to the memory-efficient kernel, which supports an
  arbitrary bias); fully masked rows are zeroed afterwards.
- "torch": the plain reference (matmul, masked softmax in fp32, matmul).
"""
from __future__ import annotations

import math

import torch

from .dispatch import HAVE_TRITON, dot_precision, next_pow2, resolve_impl

IMPLS = ("auto", "triton", "sdpa", "torch")

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _attention_kernel(
        Q, K, V, Bias, Mask, Out,
        sq_b, sq_h, sq_m, sq_d,
        sk_b, sk_h, sk_n, sk_d,
        sv_b, sv_h, sv_n, sv_d,
        sb_h, sb_m, sb_n,
        sm_b, sm_n,
        so_b, so_m, so_h, so_d,
        n_heads, M, N, D, scale,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # grid: (query blocks, batch * heads); one program owns BLOCK_M query rows of one (b, h)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        LOG2E: tl.constexpr = 1.4426950408889634

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < M
        d_in = offs_d < D
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                    mask=row_in[:, None] & d_in[None, :], other=0.0)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (log2 units), -inf = no key yet
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running softmax denominator
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_in = offs_n < N
            k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                        mask=col_in[:, None] & d_in[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)  # (BLOCK_M, BLOCK_N) fp32
            if HAS_BIAS:
                bias = tl.load(Bias + h * sb_h + offs_m[:, None] * sb_m + offs_n[None, :] * sb_n,
                               mask=row_in[:, None] & col_in[None, :], other=0.0)
                s += bias.to(tl.float32) * LOG2E
            keep = col_in
            if HAS_MASK:
                keep = keep & (tl.load(Mask + b * sm_b + offs_n * sm_n, mask=col_in, other=0) != 0)
            s = tl.where(keep[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # rows with no kept key so far have m_new = -inf: shift by 0 so exp2 sees -inf - 0 = -inf -> 0,
            # never -inf - (-inf) = NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_shift[:, None])
            alpha = tl.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                        mask=col_in[:, None] & d_in[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        # fully masked rows: l_i == 0 -> zeros (explicit, no division by zero)
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
                 out.to(Out.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])


def attention_reference(q, k, v, bias=None, key_mask=None, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch definition of `attention`: fp32 scores and softmax, masked keys excluded,
    all-masked rows give zeros. Returns (B, M, Hh, D) in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, Hh, M, N)
    if bias is not None:
        scores = scores + _bias4(bias).float()
    keep = _keep(key_mask, q, k)  # (B, 1, 1, N) bool
    scores = scores.masked_fill(~keep, float("-inf"))
    any_kept = keep.any(dim=-1, keepdim=True)  # (B, 1, 1, 1)
    probs = torch.softmax(scores.masked_fill(~any_kept, 0.0), dim=-1) * any_kept  # all-masked rows -> 0
    out = torch.matmul(probs, v.float())  # (B, Hh, M, D)
    return out.transpose(1, 2).contiguous().to(q.dtype)


def attention_sdpa(q, k, v, bias=None, key_mask=None, scale: float | None = None) -> torch.Tensor:
    """`attention` through `torch.nn.functional.scaled_dot_product_attention`.

    The padding mask is folded into the additive bias with a large *finite* negative value
    (-30000 fits fp16, and exp of it underflows to exactly 0 next to any kept key); rows with no
    kept key are zeroed explicitly.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    additive = None
    if key_mask is not None:
        keep = _keep(key_mask, q, k)  # (B, 1, 1, N)
        additive = torch.where(keep, 0.0, -30000.0).to(q.dtype)
    if bias is not None:
        b4 = _bias4(bias).to(q.dtype)
        additive = b4 if additive is None else additive + b4  # (B, Hh, M, N)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale)
    if key_mask is not None:
        out = out * keep.any(dim=-1, keepdim=True).to(out.dtype)  # all-masked rows -> 0
    return out.transpose(1, 2).contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              key_mask: torch.Tensor | None = None, scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Masked attention with an optional additive bias (see the module docstring for shapes).

    scale: multiplies q.k (default 1/sqrt(D); T5 uses 1.0). Returns (B, M, Hh, D) in q's dtype.
    """
    _check_shapes(q, k, v, bias, key_mask)
    if k.shape[2] == 0:  # no keys at all: every row is fully masked
        return q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    if impl not in ("sdpa", "torch"):
        impl = resolve_impl(impl, q, IMPLS)
    if impl == "torch":
        return attention_reference(q, k, v, bias, key_mask, scale)
    if impl == "sdpa":
        return attention_sdpa(q, k, v, bias, key_mask, scale)

    bsz, heads, m, d = q.shape
    n = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty(bsz, m, heads, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    bias3 = bias.reshape(bias.shape[-3:]) if bias is not None else None  # (Hh or 1, M, N)
    b_strides = (0 if bias3.shape[0] == 1 else bias3.stride(0), bias3.stride(1), bias3.stride(2)) if bias3 is not None \
        else (0, 0, 0)
    mask = key_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    m_strides = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    cfg = launch_config(m, n, d, q.dtype)
    grid = (math.ceil(m / cfg["BLOCK_M"]), bsz * heads)
    _attention_kernel[grid](
        q, k, v, bias3 if bias3 is not None else q, mask if mask is not None else q, out,
        *q.stride(), *k.stride(), *v.stride(), *b_strides, *m_strides,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        heads, m, n, d, float(scale),
        HAS_BIAS=bias3 is not None, HAS_MASK=mask is not None, PRECISION=dot_precision(q.dtype), **cfg,
    )
    return out


def launch_config(m: int, n: int, d: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps for M queries, N keys, head size D: 64-query x 32-key tiles over 8 warps
    (the bias and pointer tiles are register-hungry: 64 x 64 tiles over 4 warps spill on sm_80 and in
    fp32). tests/test_kernels_compile.py checks these compile without spills for sm_80 and sm_90."""
    block_m = min(64, next_pow2(m))
    return dict(BLOCK_M=block_m, BLOCK_N=min(32, next_pow2(n)), BLOCK_D=next_pow2(d),
                num_warps=8 if block_m == 64 else 4, num_stages=2)


def _bias4(bias: torch.Tensor) -> torch.Tensor:
    return bias if bias.dim() == 4 else bias.unsqueeze(0)  # (1, Hh, M, N)


def _keep(key_mask, q, k) -> torch.Tensor:
    """(B, N) mask (or None) -> (B, 1, 1, N) bool of the keys that may be attended."""
    if key_mask is None:
        return torch.ones(q.shape[0], 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
    return (key_mask != 0).view(key_mask.shape[0], 1, 1, key_mask.shape[1])


def _check_shapes(q, k, v, bias, key_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention wants q, k, v as (B, Hh, M|N, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    bsz, heads, m, d = q.shape
    if k.shape != (bsz, heads, k.shape[2], d) or v.shape != k.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"(B={bsz}, Hh={heads}, N, D={d})")
    n = k.shape[2]
    if bias is not None and tuple(bias.shape[-3:]) not in ((heads, m, n), (1, m, n)):
        raise ValueError(f"attention: bias {tuple(bias.shape)} must be (Hh={heads}, M={m}, N={n}), optionally with a "
                         "leading 1")
    if bias is not None and bias.dim() == 4 and bias.shape[0] != 1:
        raise ValueError(f"attention: a 4-d bias must have batch size 1 (it is shared by the batch); "
                         f"got {tuple(bias.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (bsz, n):
        raise ValueError(f"attention: key_mask {tuple(key_mask.shape)} must be (B={bsz}, N={n})")
