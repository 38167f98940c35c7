"""A drop-in, inference-only replacement for Hugging Face's `T5Stack` built on this package's kernels.

`swap_t5_stacks(model)` replaces every `T5Stack` inside a model (the T5 text encoder, the T5
decoder used as MiMIC's fusion decoder, or the small T5-style fusion decoder on top of BERT) with
`FastT5Stack`, which computes the same function with fewer, fused kernels:

- the residual stream is an fp32 island; each "residual add + next RMS norm" pair is one
  `rmsnorm_residual` kernel whose fp32 statistics feed an fp16 (compute dtype) activation;
- encoder self-attention: one fused QKV projection, then `attention` with T5's relative position
  bias, computed once per sequence length (T5 shares layer 0's bias table across all layers) and
  cached, and the text padding mask;
- decoder: MiMIC's decoder runs exactly one step (one start token), so its self-attention is a
  softmax over a single key (weight exactly 1): the output is O(V x), and O @ V is folded into one
  (H, H) matrix. The cross-attention keys and values of *all* layers come from one GEMM over the
  memory (text states ++ visual tokens), then `attention` with the memory mask per layer;
- the feed-forward block is the original HF module (its `wo` may be an fp32 island; see
  `mimic_engine.runtime.cuda_backend.convert_fp16_islands`).

The module reads weights from the HF stack at construction (inference only: no dropout, frozen
weights). `impl` picks the kernels ("auto": Triton on CUDA, the PyTorch references elsewhere;
attention also takes "sdpa").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .dispatch import replace_modules
from .rmsnorm import rmsnorm_residual


class _EncoderLayer(nn.Module):
    def __init__(self, block):
        super().__init__()
        sa = block.layer[0].SelfAttention
        self.ln_attn = nn.Parameter(block.layer[0].layer_norm.weight.detach().clone())  # (H,)
        self.qkv = nn.Parameter(torch.cat([sa.q.weight, sa.k.weight, sa.v.weight]).detach().clone())  # (3I, H)
        self.o = nn.Parameter(sa.o.weight.detach().clone())  # (H, I)
        self.ln_ff = nn.Parameter(block.layer[-1].layer_norm.weight.detach().clone())
        self.ff = block.layer[-1].DenseReluDense  # HF module: wi -> act -> (cast to wo dtype) -> wo


class _DecoderLayer(nn.Module):
    def __init__(self, block):
        super().__init__()
        sa = block.layer[0].SelfAttention
        ca = block.layer[1].EncDecAttention
        self.ln_self = nn.Parameter(block.layer[0].layer_norm.weight.detach().clone())
        # one-token self-attention = O(V x); fold the two projections into one (H, H) matrix (in fp32)
        self.self_ov = nn.Parameter((sa.o.weight.float() @ sa.v.weight.float()).to(sa.o.weight.dtype).detach())
        self.ln_cross = nn.Parameter(block.layer[1].layer_norm.weight.detach().clone())
        self.q_cross = nn.Parameter(ca.q.weight.detach().clone())  # (I, H)
        self.o_cross = nn.Parameter(ca.o.weight.detach().clone())  # (H, I)
        self.ln_ff = nn.Parameter(block.layer[-1].layer_norm.weight.detach().clone())
        self.ff = block.layer[-1].DenseReluDense


class FastT5Stack(nn.Module):
    """Inference replacement for `transformers...T5Stack` with the same call signature.

    Encoder: (input_ids (B, T) | inputs_embeds (B, T, H), attention_mask (B, T)) -> last_hidden_state (B, T, H).
    Decoder (one step only): inputs_embeds (B, 1, H), encoder_hidden_states (B, M, H),
    encoder_attention_mask (B, M) -> last_hidden_state (B, 1, H).
    The output is in the compute dtype (that of the projection weights).
    """

    def __init__(self, stack, attention_impl: str = "auto", norm_impl: str = "auto"):
        super().__init__()
        cfg = stack.config
        self.config = cfg
        self.is_decoder = bool(cfg.is_decoder)
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.eps = cfg.layer_norm_epsilon
        self.attention_impl, self.norm_impl = attention_impl, norm_impl
        self.embed_tokens = stack.embed_tokens
        self.final_norm = nn.Parameter(stack.final_layer_norm.weight.detach().clone())
        if self.is_decoder:
            self.layers = nn.ModuleList(_DecoderLayer(b) for b in stack.block)
            # (L * 2 * I, H): for each layer its cross-attention K then V projection
            cross = [b.layer[1].EncDecAttention for b in stack.block]
            kv = [w for ca in cross for w in (ca.k.weight, ca.v.weight)]
            self.cross_kv = nn.Parameter(torch.cat(kv).detach().clone())
            self.relative_attention_bias = None  # irrelevant for one query (see _DecoderLayer)
        else:
            self.layers = nn.ModuleList(_EncoderLayer(b) for b in stack.block)
            sa0 = stack.block[0].layer[0].SelfAttention
            self.relative_attention_bias = sa0.relative_attention_bias  # nn.Embedding(num_buckets, heads)
            self._bucket = sa0._relative_position_bucket  # HF's own bucketing (static method)
        self._bias_cache: dict = {}

    def fp32_islands(self) -> list:
        """Parameters that stay fp32 when the model is cast to fp16 (see convert_fp16_islands)."""
        names = ("ln_attn", "ln_self", "ln_cross", "ln_ff")
        params = [self.final_norm] + [getattr(layer, n) for layer in self.layers for n in names if hasattr(layer, n)]
        if self.relative_attention_bias is not None:
            params.append(self.relative_attention_bias.weight)
        return params

    # ---- helpers --------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the matmul inputs (the projection weights' dtype)."""
        first = self.layers[0]
        return first.q_cross.dtype if self.is_decoder else first.qkv.dtype

    def _norm(self, residual, delta, weight):
        """-> (residual + delta, rmsnorm(...) in the compute dtype); delta None -> norm only."""
        return rmsnorm_residual(residual, delta, weight, self.eps, out_dtype=self.compute_dtype, impl=self.norm_impl)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """T5's bidirectional relative position bias (Hh, T, T) fp32, cached per length and device."""
        key = (length, str(device))
        bias = self._bias_cache.get(key)
        if bias is None:
            pos = torch.arange(length, dtype=torch.long, device=device)
            buckets = self._bucket(pos[None, :] - pos[:, None], bidirectional=True,
                                   num_buckets=self.config.relative_attention_num_buckets,
                                   max_distance=self.config.relative_attention_max_distance)  # (T, T)
            bias = self.relative_attention_bias.weight.float()[buckets].permute(2, 0, 1).contiguous()
            self._bias_cache[key] = bias
        return bias

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                inputs_embeds=None, **unused):
        from transformers.modeling_outputs import BaseModelOutput

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("FastT5Stack: give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, H)
        if self.is_decoder:
            if encoder_hidden_states is None:
                raise ValueError("FastT5Stack decoder needs encoder_hidden_states (the fusion memory)")
            out = self._decode(x, encoder_hidden_states, encoder_attention_mask)
        else:
            out = self._encode(x, attention_mask)
        return BaseModelOutput(last_hidden_state=out)

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        nh, dk = self.n_heads, self.d_kv
        bias = self.position_bias(t, x.device)  # (Hh, T, T)
        residual = x.float()  # (B, T, H) fp32 residual stream
        h = self._norm(residual, None, self.layers[0].ln_attn)
        for i, layer in enumerate(self.layers):
            qkv = F.linear(h, layer.qkv).view(b, t, 3, nh, dk)
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, Hh, T, dk) strided views
            a = attention(q, k, v, bias, mask, scale=1.0, impl=self.attention_impl)  # (B, T, Hh, dk); T5: no 1/sqrt(d)
            a = F.linear(a.view(b, t, nh * dk), layer.o)
            residual, h = self._norm(residual, a, layer.ln_ff)
            f = layer.ff(h)
            nxt = self.layers[i + 1].ln_attn if i + 1 < len(self.layers) else self.final_norm
            residual, h = self._norm(residual, f, nxt)
        return h  # (B, T, H) = final_layer_norm(residual)

    def _decode(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        b, steps, _ = x.shape
        if steps != 1:
            raise ValueError(f"FastT5Stack runs the decoder for exactly one step (MiMIC's start token); got {steps} "
                             "decoder positions. Use the original T5Stack for multi-step decoding")
        m = memory.shape[1]
        nh, dk = self.n_heads, self.d_kv
        kv = F.linear(memory.to(self.cross_kv.dtype), self.cross_kv).view(b, m, len(self.layers), 2, nh, dk)
        residual = x.float()  # (B, 1, H)
        h = self._norm(residual, None, self.layers[0].ln_self)
        for i, layer in enumerate(self.layers):
            residual, h = self._norm(residual, F.linear(h, layer.self_ov), layer.ln_cross)
            q = F.linear(h, layer.q_cross).view(b, 1, nh, dk).transpose(1, 2)  # (B, Hh, 1, dk)
            k = kv[:, :, i, 0].transpose(1, 2)  # (B, Hh, M, dk) view
            v = kv[:, :, i, 1].transpose(1, 2)
            a = attention(q, k, v, None, memory_mask, scale=1.0, impl=self.attention_impl)  # (B, 1, Hh, dk)
            residual, h = self._norm(residual, F.linear(a.view(b, 1, nh * dk), layer.o_cross), layer.ln_ff)
            f = layer.ff(h)
            nxt = self.layers[i + 1].ln_self if i + 1 < len(self.layers) else self.final_norm
            residual, h = self._norm(residual, f, nxt)
        return h  # (B, 1, H)


def swap_t5_stacks(model: nn.Module, attention_impl: str = "auto", norm_impl: str = "auto") -> int:
    """Replace every HF `T5Stack` inside `model` by a `FastT5Stack`, in place. Returns how many were swapped."""
    from transformers.models.t5.modeling_t5 import T5Stack

    return replace_modules(model, lambda m: isinstance(m, T5Stack),
                           lambda m: FastT5Stack(m, attention_impl, norm_impl))
