"""The `torch-cuda` backend: fp16 with fp32 islands, fused kernels, CUDA graphs per shape bucket.

    backend = CudaGraphBackend.from_checkpoint("runs/small/ckpt.pt")      # device="cuda"
    vectors = backend.encode(items)                                        # (N, E) float32

What it does to the model (a private copy; the caller's model is untouched):
0. EfficientNet image towers: every BatchNorm is folded into its convolution (`fold_batchnorm`);
   the convolutions then run in fp16 like the matmuls (cuDNN; no island: every expansion ends in
   ReLU6, so activations stay far below fp16's range).
1. `swap_t5_stacks`: every HF `T5Stack` (T5 text encoder, fusion decoder) becomes a `FastT5Stack`
   (fused QKV, relative-position-bias attention kernel, residual add + RMS norm kernel, one-step
   decoder shortcut; see `mimic_engine.kernels.t5`); `swap_quick_gelu`: CLIP's QuickGELU becomes
   one elementwise kernel.
2. `convert_fp16_islands`: weights in fp16, except the fp32 islands: T5 RMS norms (and the fp32
   residual stream of `FastT5Stack`), the T5 FFN output projection `wo` (its input is cast to fp32,
   so its product and the residual add cannot overflow fp16's range), LayerNorm of BERT / CLIP, and
   T5's relative position bias table. Softmax is fp32 inside the attention kernels.
   `wo_dtype` trades the `wo` island for speed: "bf16" keeps fp32's range with an 8-bit mantissa at the
   fp16 tensor-core rate (TF32 runs at half of it; `wo` is ~20% of MiMIC-base's FLOPs), "fp16" drops
   the island (safe only while T5's FFN outputs stay below 65504; FastT5Stack's residual stream is fp32).
   LayerNorm runs as one `layer_norm` kernel (fp16 in and out, fp32 weights and statistics).
3. The decoder fusion's head (projection + L2 normalisation) is one `linear_l2norm` kernel.
4. Every stage call is padded up to a fixed shape bucket and replayed from a CUDA graph captured on
   first use of that bucket. Pad rows are fully masked (no text, no image; the attention kernel
   returns zeros for them, never NaN) and sliced off; padding the text length or the visual tokens
   only adds masked keys, so the real rows do not change.

Buckets (`Buckets`): fusion = batch x text length x images per item (visual tokens = images x P),
vision = images per call. Batches larger than the largest batch bucket run in chunks.

On a CPU device the same code runs without graphs (and with the PyTorch references of the
kernels): that is how the padding, bucketing and conversion logic is tested without a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError, choice
from ..preprocess import Preprocessor
from .base import Backend

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
WO_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- fp16 with fp32 islands --------------------------------------------------------------------
class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm with fp32 weights and fp32 statistics; returns the input's dtype (BERT, CLIP).

    Runs the `layer_norm` kernel on CUDA (one kernel; PyTorch's CUDA LayerNorm refuses fp16 input with
    fp32 weights), its reference elsewhere.
    """

    @classmethod
    def from_module(cls, ln: nn.LayerNorm) -> "Fp32LayerNorm":
        new = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine, bias=ln.bias is not None,
                  device=ln.weight.device if ln.weight is not None else None, dtype=torch.float32)
        with torch.no_grad():
            if ln.weight is not None:
                new.weight.copy_(ln.weight.float())
            if ln.bias is not None:
                new.bias.copy_(ln.bias.float())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mimic_engine.kernels.layernorm import layer_norm

        if len(self.normalized_shape) != 1:  # the kernel normalises the last dimension only
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)
        return layer_norm(x, self.weight, self.bias, self.eps)

    def fp32_islands(self):
        return list(self.parameters())


class Fp32RMSNorm(nn.Module):
    """T5LayerNorm with an fp32 weight and fp32 statistics; returns `out_dtype` (the next matmul's dtype).

    Runs the `rmsnorm_residual` kernel (without a residual) on CUDA, its reference elsewhere.
    """

    def __init__(self, norm, out_dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().float().clone())
        self.variance_epsilon = norm.variance_epsilon
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mimic_engine.kernels.rmsnorm import rmsnorm_residual

        return rmsnorm_residual(x, None, self.weight, self.variance_epsilon, out_dtype=self.out_dtype)

    def fp32_islands(self):
        return [self.weight]


def convert_fp16_islands(model: nn.Module, dtype: torch.dtype = torch.float16,
                         wo_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Cast `model` to `dtype` in place, keeping the fp32 islands fp32. Returns the model.

    Islands: every nn.LayerNorm (-> Fp32LayerNorm), every T5LayerNorm (-> Fp32RMSNorm), the `wo`
    projection of T5 feed-forward blocks (in `wo_dtype`; HF's T5 casts its input to `wo`'s dtype), and
    whatever a module lists in its `fp32_islands()` (FastT5Stack: its norm weights and position-bias
    table). Call it on an fp32 model, once (it keeps exact fp32 values for the islands).
    """
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense, T5LayerNorm

    from mimic_engine.kernels.dispatch import replace_modules

    replace_modules(model, lambda m: isinstance(m, nn.LayerNorm) and not isinstance(m, Fp32LayerNorm),
                    Fp32LayerNorm.from_module)
    replace_modules(model, lambda m: isinstance(m, T5LayerNorm), lambda m: Fp32RMSNorm(m, dtype))
    keep, wo = set(), set()
    for module in model.modules():
        if isinstance(module, (T5DenseActDense, T5DenseGatedActDense)):
            wo.update(id(p) for p in module.wo.parameters())
        if hasattr(module, "fp32_islands"):
            keep.update(id(p) for p in module.fp32_islands())
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(torch.float32 if id(p) in keep else wo_dtype if id(p) in wo else dtype)
            for key, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    setattr(module, key, buf.to(dtype))
    return model


# ---- shape buckets and padding -----------------------------------------------------------------
@dataclass(frozen=True)
class Buckets:
    """Fixed shapes a call is padded up to (each one captured as its own CUDA graph on first use)."""

    batch: tuple = (1, 2, 4, 8, 16, 32, 64)  # items per fusion call (larger batches run in chunks)
    text: tuple = (16, 32, 64, 128)  # text tokens
    images: tuple = (0, 1, 2, 4)  # images per item; visual tokens = images x tokens per image
    vision: tuple = (1, 2, 4, 8, 16, 32, 64, 128)  # images per vision call (more run in chunks)

    @classmethod
    def for_config(cls, config, max_batch: int = 64) -> "Buckets":
        """Powers of two up to the config's limits, always including the limits themselves."""
        max_len, max_img = config.text.max_length, config.vision.max_images_per_item
        return cls(
            batch=_pow2_upto(max_batch, start=1),
            text=tuple(sorted({n for n in (16, 32, 64, 128, 256, 512) if n < max_len} | {max_len})),
            images=(0,) + _pow2_upto(max_img, start=1),
            vision=_pow2_upto(2 * max_batch, start=1),
        )

    def validate(self) -> "Buckets":
        for name in ("batch", "text", "images", "vision"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or min(values) < (0 if name == "images" else 1):
                raise ConfigError(f"Buckets.{name}={values!r} must be a non-empty, strictly increasing tuple of "
                                  f"{'non-negative' if name == 'images' else 'positive'} integers")
        return self


def _pow2_upto(limit: int, start: int = 1) -> tuple:
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= 2
    return tuple(out + [limit])


def bucket_up(value: int, options) -> int | None:
    """The smallest option >= value, or None when value exceeds them all."""
    for option in options:
        if option >= value:
            return option
    return None


def pad_fusion_inputs(input_ids, attention_mask, visual_tokens, visual_mask, shape, pad_id: int, device, dtype):
    """Pad one fusion call to `shape` = (B', T', V') on `device`.

    (B, T) ids / mask, (B, V, H) visual tokens, (B, V) visual mask -> (B', T'), (B', T'),
    (B', V', H) in `dtype`, (B', V'). Pad rows have no text and no image (both masks all zero);
    padded text positions hold `pad_id` with mask 0; padded visual slots are zero with mask 0.
    """
    b, t = input_ids.shape
    v, h = visual_tokens.shape[1], visual_tokens.shape[2]
    bb, tb, vb = shape
    if bb < b or tb < t or vb < v:
        raise ValueError(f"bucket {shape} is smaller than the call {(b, t, v)}")
    ids = torch.full((bb, tb), pad_id, dtype=torch.long, device=device)
    ids[:b, :t] = input_ids
    am = torch.zeros(bb, tb, dtype=torch.long, device=device)
    am[:b, :t] = attention_mask
    vt = torch.zeros(bb, vb, h, dtype=dtype, device=device)
    vt[:b, :v] = visual_tokens
    vm = torch.zeros(bb, vb, dtype=torch.long, device=device)
    vm[:b, :v] = visual_mask
    return ids, am, vt, vm


def pad_rows(x: torch.Tensor, rows: int, device, dtype) -> torch.Tensor:
    """(N, ...) -> (rows, ...) on `device` in `dtype`, zero-filled below the real rows."""
    out = torch.zeros((rows, *x.shape[1:]), dtype=dtype, device=device)
    out[: x.shape[0]] = x
    return out


# ---- CUDA graphs -------------------------------------------------------------------------------
class _CapturedCall:
    """`fn(*static_inputs)` captured once in a CUDA graph; calls copy new inputs in and replay."""

    def __init__(self, fn, static_inputs: tuple, pool, warmup: int = 2):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # Triton compiles, cuBLAS picks kernels, caches fill: all before capture
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (another backend in a server) cannot break the capture
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn(*static_inputs)
        self.inputs = static_inputs

    def __call__(self, *inputs):
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        return self.output  # overwritten by the next replay: callers copy what they keep


@contextlib.contextmanager
def fp32_matmul_precision(tf32: bool):
    """Let fp32 matmuls (the `wo` islands) use TF32 tensor cores: fp32 range and accumulation, 10-bit
    mantissa inputs. Set only while this backend runs or captures (graphs keep the kernels chosen).
    `torch.set_float32_matmul_precision` is the one API that keeps torch's legacy and new TF32 flags
    consistent ("high" = TF32, "highest" = IEEE fp32)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ---- the backend -------------------------------------------------------------------------------
class CudaGraphBackend(Backend):
    """fp16 + fp32 islands + fused kernels + CUDA graphs per shape bucket (see the module docstring).

    model: a MimicModel (copied unless copy_model=False); tokenizer: its tokenizer.
    dtype: "fp16" (default) or "fp32" (no islands needed; for debugging).
    wo_dtype: T5's FFN output projection: "fp32" (default, an island), "bf16" or "fp16" (see module docstring).
    buckets: the shape buckets (default: `Buckets.for_config(config, max_batch)`).
    kernels: swap in FastT5Stack and the fused head (False: HF modules, still fp16 islands + graphs).
    attention: "auto" (Triton on CUDA), "triton", "sdpa" or "torch" for the T5 attention.
    graphs: capture CUDA graphs (forced off on CPU, where everything runs eagerly for tests).
    allow_tf32: fp32 islands' matmuls may use TF32 on the GPU (process-wide while a call runs).
    Thread-safe: one call at a time runs (a lock); graphs are captured on first use of a bucket.
    """

    name = "torch-cuda"

    def __init__(self, model, tokenizer, device: str | torch.device = "cuda", model_id: str | None = None, *,
                 legacy_model_ids: tuple = (),
                 dtype: str = "fp16", wo_dtype: str = "fp32", buckets: Buckets | None = None, kernels: bool = True,
                 attention: str = "auto", graphs: bool = True, allow_tf32: bool = True, copy_model: bool = True,
                 max_batch: int = 64):
        from mimic_engine.kernels.activations import swap_quick_gelu
        from mimic_engine.kernels.attention import IMPLS as ATTENTION_IMPLS
        from mimic_engine.kernels.t5 import swap_t5_stacks

        from ..modeling.efficientnet import fold_batchnorm

        choice("dtype", dtype, tuple(DTYPES))
        choice("wo_dtype", wo_dtype, tuple(WO_DTYPES))
        choice("attention", attention, ATTENTION_IMPLS)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r} was asked for but torch sees no CUDA GPU; the torch-cuda "
                              "backend needs one (use the 'torch' backend on CPU)")
        config = model.config
        self.device = device
        self.dtype = DTYPES[dtype]
        self.wo_dtype = WO_DTYPES[wo_dtype] if self.dtype != torch.float32 else torch.float32
        self.graphs = graphs and device.type == "cuda"
        self.allow_tf32 = allow_tf32
        self.kernels = kernels
        self.buckets = (buckets or Buckets.for_config(config, max_batch)).validate()
        self.tokens_per_image = config.visual_tokens_per_image
        self.visual_buckets = tuple(n * self.tokens_per_image for n in self.buckets.images)

        model = copy.deepcopy(model) if copy_model else model
        model.eval()
        text = model.fusion_stage.text
        if getattr(text, "_cache", None) is not None:  # a training-time memo (enable_state_cache): host syncs,
            text._cache = None  # cannot run inside a CUDA graph, and would hold fp32 states of the old weights
        model.vision_stage.disable_feature_cache()  # the same for the image tower's training-time memo
        fold_batchnorm(model.vision_stage)  # EfficientNet: conv + BatchNorm -> one conv (no-op for a ViT)
        if kernels:
            swap_t5_stacks(model, attention_impl=attention)
            swap_quick_gelu(model)  # CLIP's MLP activation: one kernel instead of three
        if self.dtype != torch.float32:
            convert_fp16_islands(model, self.dtype, self.wo_dtype)
        self.model = model.to(device)
        # the fused head applies to MiMIC's decoder fusion (early/late fusion keep their own forward)
        self._fast_head = kernels and config.fusion.fusion == "decoder"

        self._lock = threading.Lock()
        self._captured: dict = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        model_id = model_id or f"random:{config.preset or 'custom'}:{config.fusion.fusion}"
        super().__init__(Preprocessor(config, tokenizer), model_id, model.embed_dim, legacy_model_ids)

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cuda", **options) -> "CudaGraphBackend":
        from ..checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, "cpu")
        return cls(ckpt.model, ckpt.tokenizer, device, model_id=ckpt.model_id, legacy_model_ids=ckpt.legacy_ids,
                   copy_model=False, **options)

    @classmethod
    def from_encoder(cls, encoder, device: str = "cuda", **options) -> "CudaGraphBackend":
        """From a MimicEncoder (its model is copied, not changed)."""
        return cls(encoder.model, encoder.tokenizer, device, model_id=encoder.model_id,
                   legacy_model_ids=encoder.legacy_model_ids, **options)

    # ---- the functions that are captured ---------------------------------------------------------
    def _vision_fn(self, pixel_values):
        return self.model.vision_stage(pixel_values)  # (N, P, H) in the compute dtype

    def _fusion_fn(self, input_ids, attention_mask, visual_tokens, visual_mask):
        fs = self.model.fusion_stage
        if not self._fast_head:
            return fs(input_ids, attention_mask, visual_tokens, visual_mask).float()
        from mimic_engine.kernels.l2norm import linear_l2norm

        # DecoderFusion.forward with the head + L2 normalisation fused (parity is tested against it)
        pooled = fs.pool(input_ids, attention_mask, visual_tokens, visual_mask)  # (B, H)
        head = fs.head if isinstance(fs.head, nn.Linear) else None  # None: identity (no projection)
        return linear_l2norm(pooled, getattr(head, "weight", None), getattr(head, "bias", None))  # (B, E) fp32

    def _run(self, kind: str, key: tuple, fn, inputs: tuple) -> torch.Tensor:
        """Run `fn` on padded `inputs`: replay (capturing on first use) the graph of this bucket."""
        if not self.graphs:
            return fn(*inputs)
        call = self._captured.get((kind, key))
        if call is None:
            log.info("torch-cuda: capturing the %s graph for bucket %s", kind, key)
            call = self._captured[(kind, key)] = _CapturedCall(fn, inputs, self._pool)
        return call(*inputs)  # on first use the inputs are the static buffers themselves

    def _precision(self):
        return fp32_matmul_precision(self.allow_tf32) if self.device.type == "cuda" else contextlib.nullcontext()

    # ---- Backend stages --------------------------------------------------------------------------
    def run_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P, H) in the compute dtype, on the device."""
        n = pixel_values.shape[0]
        step = self.buckets.vision[-1]
        outs = []
        with self._lock, torch.no_grad(), self._precision():
            for start in range(0, n, step):
                chunk = pixel_values[start : start + step]
                rows = bucket_up(chunk.shape[0], self.buckets.vision)
                px = pad_rows(chunk, rows, self.device, self.dtype)
                outs.append(self._run("vision", (rows,), self._vision_fn, (px,))[: chunk.shape[0]].clone())
        return torch.cat(outs) if outs else torch.zeros(0, self.tokens_per_image, self.hidden_size,
                                                        dtype=self.dtype, device=self.device)

    def run_fusion(self, input_ids, attention_mask, visual_tokens, visual_mask) -> torch.Tensor:
        """(B, T), (B, T), (B, V, H), (B, V) -> (B, E) float32 unit vectors, on the device."""
        b, t = input_ids.shape
        v = visual_tokens.shape[1]
        tb = bucket_up(t, self.buckets.text)
        if tb is None:
            raise InputError(f"text length {t} exceeds the largest text bucket {self.buckets.text[-1]} "
                             "(config.text.max_length); tokenize with the model's Preprocessor, or pass "
                             "Buckets(text=...) with a larger length")
        vb = bucket_up(v, self.visual_buckets)
        if vb is None:
            raise InputError(f"{v} visual tokens exceed the largest visual bucket {self.visual_buckets[-1]} "
                             f"({self.buckets.images[-1]} images x {self.tokens_per_image} tokens); send at most "
                             f"{self.buckets.images[-1]} images per item")
        step = self.buckets.batch[-1]
        pad_id = self.preprocessor.pad_id
        outs = []
        with self._lock, torch.no_grad(), self._precision():
            for start in range(0, b, step):
                sl = slice(start, start + step)
                rows = input_ids[sl].shape[0]
                shape = (bucket_up(rows, self.buckets.batch), tb, vb)
                padded = pad_fusion_inputs(input_ids[sl], attention_mask[sl], visual_tokens[sl], visual_mask[sl],
                                           shape, pad_id, self.device, self.dtype)
                outs.append(self._run("fusion", shape, self._fusion_fn, padded)[:rows].float().clone())
        return torch.cat(outs) if outs else torch.zeros(0, self.dim, device=self.device)

    # ---- housekeeping ----------------------------------------------------------------------------
    def capture(self, batch: int, text: int, images: int) -> None:
        """Capture the fusion graph of one bucket ahead of traffic (e.g. at server start)."""
        h = self.hidden_size
        ids = torch.zeros(batch, text, dtype=torch.long)
        ids[:, 0] = 1
        am = torch.zeros(batch, text, dtype=torch.long)
        am[:, 0] = 1
        v = images * self.tokens_per_image
        self.run_fusion(ids, am, torch.zeros(batch, v, h), torch.ones(batch, v, dtype=torch.long))

    def capture_all(self) -> int:
        """Capture every vision and fusion bucket now (a server calls it through `warmup` at start), so
        that no request pays for a capture. -> how many graphs were captured by this call."""
        before = len(self._captured)
        s = self.preprocessor.config.vision.image_size
        for n in self.buckets.vision:
            self.run_vision(torch.zeros(n, 3, s, s))
        for batch in self.buckets.batch:
            for text in self.buckets.text:
                for images in self.buckets.images:
                    self.capture(batch, text, images)
        log.info("torch-cuda: %d graphs captured", len(self._captured))
        return len(self._captured) - before

    def warmup(self) -> None:
        """With CUDA graphs: capture every bucket (`capture_all`); without: one small mixed batch."""
        if self.graphs:
            self.capture_all()
        else:
            super().warmup()

    @property
    def captured_buckets(self) -> list:
        return sorted(self._captured)

    def capabilities(self) -> dict:
        return {**super().capabilities(), "device": str(self.device),
                "dtype": {v: k for k, v in DTYPES.items()}[self.dtype],
                "wo_dtype": {v: k for k, v in WO_DTYPES.items()}[self.wo_dtype], "graphs": self.graphs,
                "kernels": self.kernels, "captured": len(self._captured),
                "buckets": {"batch": list(self.buckets.batch), "text": list(self.buckets.text),
                            "images": list(self.buckets.images), "vision": list(self.buckets.vision)}}

    def close(self) -> None:
        with self._lock:
            self._captured.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
