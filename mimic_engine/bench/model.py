"""The model benchmark (`mimic-engine bench`): latency, throughput, parity and memory per backend and batch size.

    mimic-engine bench                                # small preset, every backend this machine has
    mimic-engine bench --preset base --batch 64       # MiMIC-base shapes, random weights
    mimic-engine bench --model runs/small/ckpt.pt --batches 1,8,64 --json bench.json --plot bench.png
    mimic-engine bench --model EXPORT_DIR --backends onnx,onnx-optimized,onnx-int8 --threads 1 --no-onnx-spin

What is measured, and how (the JSON written by `--json` follows `run_bench`'s docstring):
- Every backend gets the SAME EncoderBatch per batch size, collated once: preprocessing (tokenising,
  image decoding and resizing) is timed separately and excluded from model latency, which is the
  wall time of `backend.encode_batch(batch)` (both stages, result copied back to the host).
- Warm-up calls are not timed; timed calls are interleaved (`timing.time_backends`).
- Speedup = median latency of PyTorch eager fp32 (the baseline, always run) / the backend's median,
  both from this run. Parity = the smallest per-item cosine between a backend's vectors and the
  baseline's first vectors on the same batch (the baseline's own parity shows run-to-run determinism).
- Peak host memory is measured in a fresh process per backend (`--peak-memory`, the default; see
  `memory.py`).
- ONNX Runtime's idle worker threads busy-wait after a run by default; `--no-onnx-spin` stops that,
  so that on a machine with few or shared cores they do not steal the cores of the backend timed next.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import DEFAULT_PRESET
from ..errors import ConfigError, MimicError
from . import log
from .environment import environment
from .inputs import InputSpec, bench_batch
from .memory import measure_memory
from .recall import recall_cost
from .report import new_report
from .timing import device_of, latency_stats, parity, time_backends

SCHEMA = "mimic-engine-bench/1"
BASELINE = "torch"  # PyTorch eager fp32
# Candidates for `--backends all`, in table order; a candidate that cannot load here is listed as skipped.
CPU_CANDIDATES = ("torch", "torch-bf16", "onnx", "onnx-optimized", "onnx-int8", "openvino", "openvino-bf16",
                  "openvino-int8")
CUDA_CANDIDATES = ("torch", "torch-fp16", "torch-cuda", "tensorrt", "onnx", "onnx-optimized", "onnx-int8")
# need an export directory
ONNX_BACKENDS = ("onnx", "onnx-optimized", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8", "tensorrt")


@dataclass
class BenchOptions:
    """Every option of the model benchmark, with its default (the command line shows these)."""

    model: str | None = None  # a ckpt.pt or an export directory; None: `preset` with random weights
    preset: str = DEFAULT_PRESET
    fusion: str = "decoder"
    batches: list = field(default_factory=lambda: [1, 8, 64])
    backends: str = "all"
    device: str = "auto"
    inputs: InputSpec = field(default_factory=InputSpec)
    iters: int = 20
    warmup: int = 3
    threads: int | None = None
    onnx_spin: bool = True
    peak_memory: bool = True
    recall: bool = False
    recall_data: str = "demo"
    recall_data_dir: str | None = None
    recall_split: str = "dev"
    recall_queries: int = 200


# ---- the model under test -------------------------------------------------------------------------
@dataclass
class ModelSource:
    label: str  # "preset:small (random weights...)" or the path given
    checkpoint: str | None  # ckpt.pt for the PyTorch backends
    export_dir: str | None  # export directory for ONNX Runtime / TensorRT
    preset: str | None = None
    random_weights: bool = False
    export_note: str | None = None  # why there is no export directory, when there is none

    def path_for(self, backend: str) -> str | None:
        if backend in ONNX_BACKENDS:
            return self.export_dir
        return self.checkpoint or self.export_dir


def prepare_model(model: str | None, preset_name: str, fusion: str, workdir: str, need_export: bool,
                  seed: int = 0, device: str = "cpu", max_batch: int = 64) -> ModelSource:
    """Resolve `--model` (ckpt.pt or export dir) or build the preset; export to ONNX when needed."""
    from ..runtime import find_checkpoint

    if model is not None:
        if not os.path.exists(model):
            raise ConfigError(f"--model {model!r} does not exist; pass a ckpt.pt, an export directory, or no "
                              "--model to benchmark a preset with random weights")
        if os.path.isdir(model):
            source = ModelSource(model, find_checkpoint(model, required=False), model)
        else:
            source = ModelSource(model, model, None)
    else:
        source = _preset_checkpoint(preset_name, fusion, workdir, seed)
    if need_export and source.export_dir is None:
        try:
            source.export_dir = export_onnx(source.checkpoint, os.path.join(workdir, "export"), device, max_batch)
        except MimicError as exc:
            source.export_note = f"exporting to ONNX failed: {exc}"
            log(source.export_note)
    return source


def _preset_checkpoint(name: str, fusion: str, workdir: str, seed: int) -> ModelSource:
    """Build `name` with random weights (small keeps its pretrained MiniLM text tower) and save it."""
    import torch

    from ..checkpoint import save_checkpoint
    from ..config import preset
    from ..modeling import build_model
    from ..preprocess import load_tokenizer

    config = preset(name, fusion, random_init=True) if name == "base" else preset(name, fusion)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    path = save_checkpoint(os.path.join(workdir, "ckpt.pt"), model, load_tokenizer(config),
                           {"note": f"mimic-engine bench: preset {name}, random weights, seed {seed}"})
    weights = {"small": "MiniLM text tower, other weights random",
               "small-effnet": "MiniLM text and EfficientNet-Lite0 image towers, other weights random"}.get(name, "random weights")
    return ModelSource(f"preset:{name} ({fusion} fusion, {weights})", path, None, preset=name, random_weights=True)


def export_onnx(checkpoint: str, out_dir: str, device: str = "cpu", max_batch: int = 64) -> str:
    """Export `checkpoint` with `mimic-engine export`'s pipeline -> the export directory.

    Variants: fp32, optimized and int8 (the CPU ones the onnx backends run); TensorRT engines too
    on CUDA where tensorrt is installed. The batch range covers the largest benchmarked batch.
    """
    from ..errors import require

    require("onnx", "pip install 'mimic-engine[export]'", "exporting to ONNX")
    try:
        from mimic_engine.export.artifacts import Range
        from mimic_engine.export.pipeline import ExportOptions, export_checkpoint
    except ImportError as exc:
        raise ConfigError(f"the ONNX exporter is not available in this installation ({exc}); pass an export "
                          "directory as --model instead") from exc
    log(f"exporting {checkpoint} to ONNX (pass an export directory as --model to skip this)")
    t0 = time.perf_counter()
    batch = Range("batch", 1, 16, max_batch) if max_batch > 64 else None
    export_checkpoint(checkpoint, ExportOptions(out_dir=out_dir, variants=("optimized", "int8"), batch=batch,
                                                tensorrt=device.startswith("cuda")),
                      log=lambda msg: log(f"export: {msg}"))
    log(f"exported in {time.perf_counter() - t0:.1f} s")
    return out_dir


# ---- backends -------------------------------------------------------------------------------------
def candidate_backends(requested: str, device: str) -> list[str]:
    """`--backends` ("all" or a comma list) -> names, the baseline first."""
    from ..runtime import BACKENDS

    if requested.strip() == "all":
        names = list(CUDA_CANDIDATES if device.startswith("cuda") else CPU_CANDIDATES)
    else:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in names if n not in BACKENDS or n == "auto"]
        if unknown:
            raise ConfigError(f"--backends: unknown {unknown}; choose from {', '.join(b for b in BACKENDS if b != 'auto')} "
                              "or 'all'")
    return [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]


def _backend_kwargs(name: str, threads: int | None, onnx_spin: bool = True) -> dict:
    if name.startswith("openvino"):
        return {"threads": threads} if threads else {}
    if not name.startswith("onnx"):
        return {}
    return {**({"threads": threads} if threads else {}), **({} if onnx_spin else {"spin": False})}


def load_backends(names: list[str], source: ModelSource, device: str, threads: int | None, onnx_spin: bool = True):
    """-> ({name: Backend} for those that loaded, {name: info dict} for all)."""
    import json

    from ..runtime import load_backend

    loaded, info = {}, {}
    for name in names:
        path = source.path_for(name)
        if path is None:
            why = source.export_note or "needs an export directory (pass one as --model)"
            info[name] = {"name": name, "status": "skipped", "reason": why}
            continue
        t0 = time.perf_counter()
        try:
            backend = load_backend(name, path, device, **_backend_kwargs(name, threads, onnx_spin))
        except Exception as exc:  # reported, never fatal, except for the baseline
            if name == BASELINE:
                raise
            info[name] = {"name": name, "status": "skipped", "reason": f"{exc.__class__.__name__}: {exc}"}
            log(f"{name}: skipped ({exc.__class__.__name__}: {exc})")
            continue
        loaded[name] = backend
        info[name] = {"name": name, "status": "ok", "load_s": round(time.perf_counter() - t0, 3),
                      "capabilities": json.loads(json.dumps(backend.capabilities(), default=str))}
    return loaded, info


def summarize(timings: dict, names: list[str], batch_sizes: list[int]) -> list[dict]:
    """One row per (backend, batch size): latency stats, items/s, speedup and parity vs the baseline."""
    rows = []
    for bs in batch_sizes:
        base = timings[(BASELINE, bs)]
        base_median = float(np.median(base["wall_ms"]))
        for name in names:
            rec = timings[(name, bs)]
            lat = latency_stats(rec["wall_ms"])
            rows.append({
                "backend": name,
                "batch": bs,
                "latency_ms": lat,
                "device_ms": latency_stats(rec["device_ms"]) if rec["device_ms"] else None,
                "items_per_s": bs / (lat["median"] / 1e3),
                "speedup": base_median / lat["median"],
                "parity": parity(rec["last"], base["first"]),
                "samples_ms": [round(x, 4) for x in rec["wall_ms"]],
            })
    return rows


# ---- the whole run --------------------------------------------------------------------------------
def run_bench(opts: BenchOptions) -> dict:
    """Benchmark and return the report (the JSON written by --json):

    {"schema": "mimic-engine-bench/1", "created", "environment": {"cpu", "cpu_flags", "cpu_count", "versions",
       "torch_threads", "gpu", ...} (environment.py),
     "model": {"source", "preset", "fusion", "model_id", "random_weights", "params", "embed_dim", "checkpoint",
       "export_dir"},
     "inputs": {"text_tokens", "images_per_item", "text_only_fraction", "visual_tokens_per_image", "seed",
                "images_per_batch": {batch: images in the batch that was timed}},
     "settings": {"iters", "warmup", "device", "batches", "interleaved", "baseline", "threads", "onnx_spin"},
     "preprocess_ms": {batch: median ms of collating that batch (excluded from latency); null where
                       Pillow is missing and the images are random pixel tensors},
     "backends": {name: {"status": "ok"|"skipped", "reason"?, "load_s"?, "device"?, "memory"?}},
     "results": [{"backend", "batch", "latency_ms": {"median", "p90", "p99", "mean", "min", "max", "n"},
                  "device_ms": same or null, "items_per_s", "speedup", "parity": {"min_cosine",
                  "max_abs_diff"}, "samples_ms"}],
     "recall": null or recall.recall_cost(...)}
    """
    import torch

    from ..runtime import resolve_device

    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    names = candidate_backends(opts.backends, device)
    batch_sizes = sorted(set(opts.batches))
    with tempfile.TemporaryDirectory(prefix="mimic-bench-") as workdir:
        need_export = any(n in ONNX_BACKENDS for n in names)
        source = prepare_model(opts.model, opts.preset, opts.fusion, workdir, need_export, opts.inputs.seed,
                               device, batch_sizes[-1])
        backends, info = load_backends(names, source, device, opts.threads, opts.onnx_spin)
        base = backends[BASELINE]
        pre = base.preprocessor
        batches, preprocess_ms = {}, {}
        for bs in batch_sizes:
            batches[bs], preprocess_ms[bs] = bench_batch(pre, bs, opts.inputs)
        if None in preprocess_ms.values():
            log("Pillow or scikit-learn is not installed: images are random pixel tensors (same shapes), "
                "preprocessing is not timed")
        timings = time_backends(backends, batches, opts.iters, opts.warmup)
        results = summarize(timings, list(backends), batch_sizes)
        for name, backend in backends.items():
            info[name]["device"] = device_of(backend)
        if opts.peak_memory:
            for name in backends:
                log(f"peak memory of {name}: fresh process, batch {batch_sizes[-1]}")
                info[name]["memory"] = measure_memory(name, source.path_for(name), device, batch_sizes[-1],
                                                      opts.inputs, opts.threads,
                                                      _backend_kwargs(name, opts.threads, opts.onnx_spin))
        recall = None
        if opts.recall:
            recall = recall_cost(backends, BASELINE, opts.recall_data, opts.recall_data_dir, opts.recall_split,
                                 opts.recall_queries, max(batch_sizes))
        model_info = _model_info(source, base)
        for backend in backends.values():
            backend.close()
    first = batches[batch_sizes[0]]
    return new_report(
        SCHEMA, environment(device),
        model=model_info,
        inputs={"text_tokens": int(first.input_ids.shape[1]), "images_per_item": opts.inputs.images_per_item,
                "text_only_fraction": opts.inputs.text_only_fraction,
                "visual_tokens_per_image": pre.config.visual_tokens_per_image, "seed": opts.inputs.seed,
                "images_per_batch": {str(bs): int(b.image_counts.sum()) for bs, b in batches.items()}},
        settings={"iters": opts.iters, "warmup": opts.warmup, "device": device, "batches": batch_sizes,
                  "interleaved": True, "baseline": BASELINE, "threads": opts.threads, "onnx_spin": opts.onnx_spin},
        preprocess_ms={str(bs): ms for bs, ms in preprocess_ms.items()},
        backends=info,
        results=results,
        recall=recall,
    )


def _model_info(source: ModelSource, base) -> dict:
    cfg = base.preprocessor.config
    model = getattr(base, "model", None)
    return {"source": source.label, "preset": source.preset or cfg.preset, "fusion": cfg.fusion.fusion,
            "model_id": base.model_id, "random_weights": source.random_weights,
            "params": sum(p.numel() for p in model.parameters()) if model is not None else None,
            "embed_dim": base.dim, "checkpoint": source.checkpoint if not source.random_weights else None,
            "export_dir": source.export_dir if source.export_dir and not source.random_weights else None}
