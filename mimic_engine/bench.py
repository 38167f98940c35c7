"""`mimic-engine bench`: model latency, throughput, parity and memory per backend and batch size.

    mimic-engine bench                                # small preset, every backend this machine has
    mimic-engine bench --preset base --batch 64       # MiMIC-base shapes, random weights
    mimic-engine bench --model runs/small/ckpt.pt --batches 1,8,64 --json bench.json --plot bench.png
    mimic-engine bench serve --url http://127.0.0.1:8000 --concurrency 1,16   (see bench_serve.py)

What is measured, and how (the JSON written by `--json` follows `run_bench`'s docstring):
- Every backend gets the SAME EncoderBatch per batch size, collated once: preprocessing (tokenising,
  image decoding and resizing) is timed separately and excluded from model latency, which is the
  wall time of `backend.encode_batch(batch)` (both stages, result copied back to the host).
- Warm-up calls are not timed. Timed calls are interleaved: round r runs every backend once,
  starting from backend r mod n, so slow drifts of a shared machine hit all backends alike.
- Speedup = median latency of PyTorch eager fp32 (the baseline, always run) / the backend's median,
  both from this run. Parity = the smallest per-item cosine between a backend's vectors and the
  baseline's first vectors on the same batch (the baseline's own parity shows run-to-run determinism).
- Peak host memory is measured in a fresh process per backend (`--peak-memory`, the default): the
  process imports the runtime, loads the backend and runs the largest batch; its VmHWM (peak
  resident set) is reported with the resident set before loading, so the difference is what that
  backend needs. On CUDA the peak of torch's allocator is reported too (ONNX Runtime and TensorRT
  allocate outside it, so theirs is not).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import click
import numpy as np

from .config import FUSIONS, PRESETS
from .errors import ConfigError, InputError, MimicError

SCHEMA = "mimic-engine-bench/1"
BASELINE = "torch"  # PyTorch eager fp32
DEFAULT_BATCHES = (1, 8, 64)
# Candidates for `--backends all`, in table order; a candidate that cannot load here is listed as skipped.
CPU_CANDIDATES = ("torch", "onnx", "onnx-optimized", "onnx-int8")
CUDA_CANDIDATES = ("torch", "torch-fp16", "torch-cuda", "tensorrt", "onnx", "onnx-optimized", "onnx-int8")
ONNX_BACKENDS = ("onnx", "onnx-optimized", "onnx-int8", "tensorrt")  # need an export directory
PARITY_WARN = 0.99  # a min cosine below this is flagged in the table and the chart

# Single-token words in BERT's and T5's vocabularies, so n words give n tokens (checked at run time).
WORDS = ("the red bus a photo of small dog on green grass near old stone bridge over river city street with "
         "people walking at night under bright lights white house tall tree blue sky in winter snow black cat "
         "sitting by window two children playing football park yellow flower garden summer morning").split()


def log(msg: str) -> None:
    click.echo(f"[bench] {msg}", err=True)


# ---- inputs ---------------------------------------------------------------------------------------
@dataclass
class InputSpec:
    """What each benchmark item looks like. text_tokens counts special tokens; None = the model's max_length."""

    text_tokens: int | None = None
    images_per_item: int = 1
    text_only_fraction: float = 0.0  # share of items without images (a corpus mixes both)
    seed: int = 0


def digit_images(n: int, seed: int = 0, size: int = 64) -> list:
    """n RGB PIL images of handwritten digits (scikit-learn's 8x8 scans, upscaled)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images  # (1797, 8, 8) values 0..16
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(digits), n):
        gray = (255 - digits[i] * 255 / 16).astype(np.uint8)  # dark ink on white paper
        out.append(Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).convert("RGB"))
    return out


def bench_layout(preprocessor, n: int, spec: InputSpec) -> tuple[list, list]:
    """n deterministic texts of exactly `spec.text_tokens` tokens (with specials) and images per item."""
    tok = preprocessor.tokenizer
    max_len = preprocessor.max_length
    n_tokens = spec.text_tokens or max_len
    if n_tokens > max_len:
        raise ConfigError(f"--text-len {n_tokens} exceeds the model's max_length of {max_len} tokens; "
                          f"pass --text-len {max_len} or less")
    limit = preprocessor.config.vision.max_images_per_item
    if spec.images_per_item > limit:
        raise ConfigError(f"--images-per-item {spec.images_per_item} exceeds the model's limit of {limit} "
                          "(vision.max_images_per_item)")
    specials = len(tok("")["input_ids"])
    words = [w for w in WORDS if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    if not words:
        raise ConfigError("none of the benchmark words is a single token for this tokenizer")
    rng = np.random.default_rng(spec.seed)
    n_words = max(n_tokens - specials, 1)
    texts = [" ".join(rng.choice(words, n_words)) for _ in range(n)]
    text_only = set(rng.choice(n, int(round(spec.text_only_fraction * n)), replace=False).tolist())
    counts = [0 if i in text_only else spec.images_per_item for i in range(n)]
    return texts, counts


def bench_items(preprocessor, n: int, spec: InputSpec) -> list:
    """n deterministic items: the `bench_layout` texts with decoded digit scans as their images."""
    from .preprocess import Item

    texts, counts = bench_layout(preprocessor, n, spec)
    images = iter(digit_images(sum(counts), spec.seed))
    return [Item(text=text, images=[next(images) for _ in range(c)], name=f"bench[{i}]")
            for i, (text, c) in enumerate(zip(texts, counts))]


def decoded_images_available() -> bool:
    """Pillow and scikit-learn (the digit scans) are installed, so benchmark items carry real images."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("PIL", "sklearn"))


def synthetic_batch(preprocessor, n: int, spec: InputSpec):
    """The `bench_layout` items as an EncoderBatch whose images are random pixel tensors of the model's
    input size: for a machine without Pillow (a bare GPU box). The backends see the same shapes."""
    import torch

    from .modeling import EncoderBatch

    texts, counts = bench_layout(preprocessor, n, spec)
    input_ids, attention_mask, truncated = preprocessor.tokenize(texts)
    s = preprocessor.config.vision.image_size
    pixels = torch.randn(sum(counts), 3, s, s, generator=torch.Generator().manual_seed(spec.seed))
    return EncoderBatch(input_ids, attention_mask, pixels, torch.tensor(counts, dtype=torch.long), truncated)


def bench_batch(preprocessor, n: int, spec: InputSpec):
    """-> (EncoderBatch of n bench items, median preprocessing ms), or (synthetic batch, None) where
    Pillow or scikit-learn is missing: no image is decoded then, so no preprocessing time exists."""
    if decoded_images_available():
        return collate_timed(preprocessor, bench_items(preprocessor, n, spec))
    return synthetic_batch(preprocessor, n, spec), None


def collate_timed(preprocessor, items, repeats: int = 3):
    """-> (EncoderBatch, median preprocessing ms over `repeats` collations)."""
    times, batch = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = preprocessor.collate(items)
        times.append((time.perf_counter() - t0) * 1e3)
    return batch, float(np.median(times))


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
    from .runtime import find_checkpoint

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

    from .checkpoint import save_checkpoint
    from .config import preset
    from .modeling import build_model
    from .preprocess import load_tokenizer

    config = preset(name, fusion, random_init=True) if name == "base" else preset(name, fusion)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    path = save_checkpoint(os.path.join(workdir, "ckpt.pt"), model, load_tokenizer(config),
                           {"note": f"mimic-engine bench: preset {name}, random weights, seed {seed}"})
    weights = "MiniLM text tower, other weights random" if name == "small" else "random weights"
    return ModelSource(f"preset:{name} ({fusion} fusion, {weights})", path, None, preset=name, random_weights=True)


def export_onnx(checkpoint: str, out_dir: str, device: str = "cpu", max_batch: int = 64) -> str:
    """Export `checkpoint` with `mimic-engine export`'s pipeline -> the export directory.

    Variants: fp32, optimized and int8 (the CPU ones the onnx backends run); TensorRT engines too
    on CUDA where tensorrt is installed. The batch range covers the largest benchmarked batch.
    """
    from .errors import require

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
    from .runtime import BACKENDS

    if requested.strip() == "all":
        names = list(CUDA_CANDIDATES if device.startswith("cuda") else CPU_CANDIDATES)
    else:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in names if n not in BACKENDS or n == "auto"]
        if unknown:
            raise ConfigError(f"--backends: unknown {unknown}; choose from {', '.join(b for b in BACKENDS if b != 'auto')} "
                              "or 'all'")
    return [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]


def load_backends(names: list[str], source: ModelSource, device: str, threads: int | None):
    """-> ({name: Backend} for those that loaded, {name: info dict} for all)."""
    from .runtime import load_backend

    loaded, info = {}, {}
    for name in names:
        path = source.path_for(name)
        if path is None:
            why = source.export_note or "needs an export directory (pass one as --model)"
            info[name] = {"name": name, "status": "skipped", "reason": why}
            continue
        kw = {"threads": threads} if (threads and name.startswith("onnx")) else {}
        t0 = time.perf_counter()
        try:
            backend = load_backend(name, path, device, **kw)
        except Exception as exc:  # reported, never fatal, except for the baseline
            if name == BASELINE:
                raise
            info[name] = {"name": name, "status": "skipped", "reason": f"{exc.__class__.__name__}: {exc}"}
            log(f"{name}: skipped ({exc.__class__.__name__}: {exc})")
            continue
        loaded[name] = backend
        info[name] = {"name": name, "status": "ok", "load_s": round(time.perf_counter() - t0, 3),
                      "capabilities": _jsonable(backend.capabilities())}
    return loaded, info


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _device_of(backend) -> str:
    dev = getattr(backend, "device", None)
    if dev is not None:
        return str(dev)
    providers = getattr(backend, "providers", None) or []
    return "cuda" if any("CUDA" in p or "Tensorrt" in p for p in providers) else "cpu"


# ---- timing ---------------------------------------------------------------------------------------
def time_backends(backends: dict, batches: dict, iters: int, warmup: int) -> dict:
    """Run every backend on every batch. -> {(name, batch_size): {"wall_ms": [...], "device_ms": [...]|None,
    "first": (B, E) array, "last": (B, E) array}}. Backends are interleaved per round (module docstring)."""
    names = list(backends)
    out = {}
    for bs, batch in batches.items():
        log(f"batch {bs}: warm-up x{warmup}, then {iters} interleaved rounds over {len(names)} backends")
        for name in names:
            rec = out[(name, bs)] = {"wall_ms": [], "device_ms": [] if _is_cuda(backends[name]) else None}
            for _ in range(warmup):
                vecs = backends[name].encode_batch(batch)
                rec.setdefault("first", vecs)
        for r in range(iters):
            for name in names[r % len(names):] + names[: r % len(names)]:
                rec = out[(name, bs)]
                wall, dev, vecs = _timed_call(backends[name], batch, rec["device_ms"] is not None)
                rec["wall_ms"].append(wall)
                if dev is not None:
                    rec["device_ms"].append(dev)
                rec.setdefault("first", vecs)
                rec["last"] = vecs
    return out


def _is_cuda(backend) -> bool:
    return _device_of(backend).startswith("cuda")


def _timed_call(backend, batch, cuda: bool):
    """-> (wall ms, CUDA-event ms or None, vectors). Events bracket the call on the current stream."""
    if cuda:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
    t0 = time.perf_counter()
    vecs = backend.encode_batch(batch)  # returns host numpy: the device work is finished
    wall = (time.perf_counter() - t0) * 1e3
    if not cuda:
        return wall, None, vecs
    end.record()
    end.synchronize()
    return wall, float(start.elapsed_time(end)), vecs


def latency_stats(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min()), "n": int(a.size)}


def parity(vecs: np.ndarray, ref: np.ndarray) -> dict:
    """Per-item cosine (float64) between two (B, E) sets of vectors -> min cosine, max |diff|."""
    a, b = vecs.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max())}


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


# ---- peak memory in a fresh process ----------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_now_mb() -> float | None:
    kb = _proc_status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def _peak_rss_mb() -> tuple[float, str]:
    """Peak resident set of this process -> (MB, what the number is)."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024, "VmHWM"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "ru_maxrss"


def measure_memory(name: str, path: str, device: str, batch_size: int, spec: InputSpec, threads: int | None,
                   timeout_s: float = 600) -> dict:
    """Peak memory of `name` in a fresh interpreter running the largest batch (see module docstring)."""
    job = {"backend": name, "path": path, "device": device, "batch": batch_size, "threads": threads,
           "spec": spec.__dict__}
    cmd = [sys.executable, "-m", "mimic_engine.bench", "--memory-probe", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the memory probe took over {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the memory probe failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def _memory_probe(job: dict) -> dict:
    """Runs in the child: imports, RSS, load + run the largest batch, peak RSS (and torch's CUDA peak)."""
    import importlib

    import torch

    from .runtime import load_backend

    name = job["backend"]
    if not os.path.exists(job["path"]):  # before the slow imports
        raise ConfigError(f"model {job['path']!r} does not exist")
    # Library code is imported before the "before" reading: it is not the backend's memory.
    for module in ("transformers", "transformers.models.bert.modeling_bert", "transformers.models.t5.modeling_t5",
                   "transformers.models.clip.modeling_clip", "mimic_engine.modeling", "mimic_engine.preprocess"):
        importlib.import_module(module)
    if name.startswith("onnx"):
        importlib.import_module("onnxruntime")
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    before = _rss_now_mb()
    kw = {"threads": job["threads"]} if (job["threads"] and name.startswith("onnx")) else {}
    backend = load_backend(name, job["path"], job["device"], **kw)
    batch, _ = bench_batch(backend.preprocessor, job["batch"], InputSpec(**job["spec"]))
    for _ in range(3):
        backend.encode_batch(batch)
    peak, what = _peak_rss_mb()
    out = {"rss_before_load_mb": round(before, 1) if before is not None else None, "peak_rss_mb": round(peak, 1),
           "peak_rss_source": what, "batch": job["batch"]}
    if before is not None:
        out["peak_rss_added_mb"] = round(peak - before, 1)
    if torch.cuda.is_available() and job["device"].startswith("cuda"):
        out["gpu_peak_torch_allocator_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


# ---- recall cost on the demo corpus ---------------------------------------------------------------
def recall_cost(backends: dict, data: str, data_dir: str | None, split: str, max_queries: int,
                batch_size: int = 64) -> dict:
    """Encode the corpus and up to `max_queries` queries with every backend (same collated batches)
    and compare each backend's exact top-10 with the baseline's.

    -> {"dataset", "split", "n_queries", "n_documents", "per_backend": {name: {"overlap_at_10",
        "recall_at_10", "mrr_at_10", "delta_recall_at_10", "delta_mrr_at_10", "encode_s"}}}, all x100.
    overlap_at_10 = mean |top10 ∩ baseline top10| / 10 (how much of the fp32 result a backend keeps);
    recall_at_10 / mrr_at_10 are against the dataset's relevance judgements.
    """
    from .data import load_dataset
    from .metrics import exact_topk

    dataset = load_dataset(data, data_dir)
    queries = [q for q in dataset.split(split) if q.positives][:max_queries]
    docs = dataset.documents
    if not queries or not docs:
        raise ConfigError(f"--recall: {dataset.name} split {split!r} has {len(queries)} queries with positives and "
                          f"{len(docs)} documents; both must be non-empty")
    pre = backends[BASELINE].preprocessor
    doc_batches = _collated(pre, [d.to_item(dataset.images) for d in docs], batch_size)
    query_batches = _collated(pre, [q.to_item(dataset.images) for q in queries], batch_size)
    log(f"recall: {len(docs)} documents, {len(queries)} {split} queries, {len(backends)} backends")

    tops, per = {}, {}
    for name, backend in backends.items():
        t0 = time.perf_counter()
        d_vecs = _encode_collated(backend, doc_batches, len(docs), "document")
        q_vecs = _encode_collated(backend, query_batches, len(queries), "query")
        _, tops[name] = exact_topk(q_vecs, d_vecs, k=10)  # (Q, 10) document rows
        per[name] = {"encode_s": round(time.perf_counter() - t0, 2)}
    ref = tops[BASELINE]
    for name in backends:
        top = tops[name]
        overlap = np.mean([len(set(top[i]) & set(ref[i])) / ref.shape[1] for i in range(len(queries))])
        rec, rr = [], []
        for i, q in enumerate(queries):
            ranked = [docs[j].id for j in top[i]]
            pos = set(q.positives)
            rec.append(len(pos & set(ranked)) / len(pos))
            first = next((r for r, d in enumerate(ranked) if d in pos), None)
            rr.append(0.0 if first is None else 1.0 / (first + 1))
        per[name].update(overlap_at_10=100 * float(overlap), recall_at_10=100 * float(np.mean(rec)),
                         mrr_at_10=100 * float(np.mean(rr)))
    for name in backends:
        per[name]["delta_recall_at_10"] = per[name]["recall_at_10"] - per[BASELINE]["recall_at_10"]
        per[name]["delta_mrr_at_10"] = per[name]["mrr_at_10"] - per[BASELINE]["mrr_at_10"]
    return {"dataset": dataset.name, "split": split, "n_queries": len(queries), "n_documents": len(docs),
            "per_backend": per}


def _collated(preprocessor, items: list, batch_size: int) -> list:
    """Length-sorted batches as Backend.encode makes them -> [(row indices, EncoderBatch)]."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i].images), len(items[i].text or "")))
    return [(idx, preprocessor.collate([items[i] for i in idx]))
            for idx in (order[s : s + batch_size] for s in range(0, len(order), batch_size))]


def _encode_collated(backend, batches: list, n: int, role: str) -> np.ndarray:
    out = np.zeros((n, backend.dim), dtype=np.float32)
    for idx, batch in batches:
        out[idx] = backend.encode_batch(batch, role)
    return out


# ---- environment ----------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    env = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("mimic-engine", "torch", "transformers", "numpy", "onnx",
                                             "onnxruntime", "onnxruntime-gpu", "tensorrt", "triton")},
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "device": device,
        "gpu": None,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


# ---- the whole run --------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    model: str | None = None
    preset: str = "small"
    fusion: str = "decoder"
    batches: list = field(default_factory=lambda: list(DEFAULT_BATCHES))
    backends: str = "all"
    device: str = "auto"
    inputs: InputSpec = field(default_factory=InputSpec)
    iters: int = 20
    warmup: int = 3
    threads: int | None = None
    peak_memory: bool = True
    recall: bool = False
    recall_data: str = "demo"
    recall_data_dir: str | None = None
    recall_split: str = "dev"
    recall_queries: int = 200


def run_bench(opts: BenchOptions) -> dict:
    """Benchmark and return the report (the JSON written by --json):

    {"schema": "mimic-engine-bench/1", "created", "model": {"source", "preset", "fusion", "model_id",
       "random_weights", "params", "embed_dim", "checkpoint", "export_dir"},
     "inputs": {"text_tokens", "images_per_item", "text_only_fraction", "visual_tokens_per_image", "seed"},
     "settings": {"iters", "warmup", "device", "batches", "interleaved", "baseline"},
     "environment": {"cpu", "cpu_count", "versions", "torch_threads", "gpu", ...},
     "preprocess_ms": {batch: median ms of collating that batch (excluded from latency); null where
                       Pillow is missing and the images are random pixel tensors},
     "backends": {name: {"status": "ok"|"skipped", "reason"?, "load_s"?, "device"?, "memory"?}},
     "results": [{"backend", "batch", "latency_ms": {"median", "p90", "p99", "mean", "min", "n"},
                  "device_ms": same or null, "items_per_s", "speedup", "parity": {"min_cosine",
                  "max_abs_diff"}, "samples_ms"}],
     "recall": null or recall_cost(...)}
    """
    import torch

    from .runtime import resolve_device

    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    names = candidate_backends(opts.backends, device)
    batch_sizes = sorted(set(opts.batches))
    with tempfile.TemporaryDirectory(prefix="mimic-bench-") as workdir:
        need_export = any(n in ONNX_BACKENDS for n in names)
        source = prepare_model(opts.model, opts.preset, opts.fusion, workdir, need_export, opts.inputs.seed,
                               device, batch_sizes[-1])
        backends, info = load_backends(names, source, device, opts.threads)
        base = backends[BASELINE]
        pre = base.preprocessor
        batches, preprocess_ms = {}, {}
        if not decoded_images_available():
            log("Pillow or scikit-learn is not installed: images are random pixel tensors (same shapes), "
                "preprocessing is not timed")
        for bs in batch_sizes:
            batches[bs], preprocess_ms[bs] = bench_batch(pre, bs, opts.inputs)
        timings = time_backends(backends, batches, opts.iters, opts.warmup)
        results = summarize(timings, list(backends), batch_sizes)
        for name, backend in backends.items():
            info[name]["device"] = _device_of(backend)
        if opts.peak_memory:
            for name in backends:
                log(f"peak memory of {name}: fresh process, batch {batch_sizes[-1]}")
                info[name]["memory"] = measure_memory(name, source.path_for(name), device, batch_sizes[-1],
                                                      opts.inputs, opts.threads)
        recall = None
        if opts.recall:
            recall = recall_cost(backends, opts.recall_data, opts.recall_data_dir, opts.recall_split,
                                 opts.recall_queries, max(batch_sizes))
        model_info = _model_info(source, base)
        for backend in backends.values():
            backend.close()
    first = batches[batch_sizes[0]]
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_info,
        "inputs": {"text_tokens": int(first.input_ids.shape[1]), "images_per_item": opts.inputs.images_per_item,
                   "text_only_fraction": opts.inputs.text_only_fraction,
                   "visual_tokens_per_image": pre.config.visual_tokens_per_image, "seed": opts.inputs.seed},
        "settings": {"iters": opts.iters, "warmup": opts.warmup, "device": device, "batches": batch_sizes,
                     "interleaved": True, "baseline": BASELINE, "threads": opts.threads},
        "environment": environment(device),
        "preprocess_ms": {str(bs): ms for bs, ms in preprocess_ms.items()},
        "backends": info,
        "results": results,
        "recall": recall,
    }


def _model_info(source: ModelSource, base) -> dict:
    cfg = base.preprocessor.config
    model = getattr(base, "model", None)
    return {"source": source.label, "preset": source.preset or cfg.preset, "fusion": cfg.fusion.fusion,
            "model_id": base.model_id, "random_weights": source.random_weights,
            "params": sum(p.numel() for p in model.parameters()) if model is not None else None,
            "embed_dim": base.dim, "checkpoint": source.checkpoint if not source.random_weights else None,
            "export_dir": source.export_dir if source.export_dir and not source.random_weights else None}


# ---- output ---------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    """The terminal table: one row per backend and batch size, then skipped backends and memory."""
    m, inp, env = report["model"], report["inputs"], report["environment"]
    lines = [
        f"model: {m['source']}  id {str(m['model_id'])[:16]}  params {m['params'] or '?'}  dim {m['embed_dim']}",
        f"inputs: {inp['text_tokens']} text tokens + {inp['images_per_item']} image(s) x "
        f"{inp['visual_tokens_per_image']} visual tokens per item, text-only share {inp['text_only_fraction']:.2f}",
        f"device: {report['settings']['device']}  cpu: {env['cpu']} ({env['cpus_usable']} usable cores, "
        f"load {env['load_average_1m']})  gpu: {env['gpu'] or '-'}  torch threads {env['torch_threads']}",
        f"{report['settings']['iters']} timed iterations after {report['settings']['warmup']} warm-up, "
        "backends interleaved; latency = encode_batch wall time, preprocessing excluded",
        "",
    ]
    header = ("backend", "batch", "median ms", "p90 ms", "p99 ms", "items/s", "speedup", "min cos", "preproc ms")
    rows = []
    for r in report["results"]:
        lat = r["latency_ms"]
        cos = r["parity"]["min_cosine"]
        rows.append((r["backend"], str(r["batch"]), f"{lat['median']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}",
                     f"{r['items_per_s']:.1f}", f"{r['speedup']:.2f}x",
                     f"{cos:.6f}" + (" !" if cos < PARITY_WARN else ""), _ms(report["preprocess_ms"][str(r["batch"])])))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines += [fmt(header), fmt(["-" * w for w in widths])]
    prev = None
    for row in rows:
        if prev is not None and row[1] != prev:
            lines.append("")
        lines.append(fmt(row))
        prev = row[1]
    if any(r["device_ms"] for r in report["results"]):
        lines += ["", "CUDA-event time (median ms): " + ", ".join(
            f"{r['backend']}@{r['batch']} {r['device_ms']['median']:.2f}" for r in report["results"] if r["device_ms"])]
    mem = [(n, b["memory"]) for n, b in report["backends"].items() if b.get("memory")]
    if mem:
        lines += ["", "peak memory (fresh process per backend, batch %s):" % report["settings"]["batches"][-1]]
        for name, mm in mem:
            if "error" in mm:
                lines.append(f"  {name:<15} {mm['error']}")
                continue
            gpu = f", torch CUDA allocator peak {mm['gpu_peak_torch_allocator_mb']:.0f} MB" \
                if mm.get("gpu_peak_torch_allocator_mb") is not None else ""
            lines.append(f"  {name:<15} peak RSS {mm['peak_rss_mb']:.0f} MB ({mm.get('peak_rss_added_mb', '?')} MB "
                         f"above the {mm['rss_before_load_mb']} MB after imports){gpu}")
    skipped = [(n, b["reason"]) for n, b in report["backends"].items() if b["status"] != "ok"]
    if skipped:
        lines += ["", "not run:"] + [f"  {n}: {why}" for n, why in skipped]
    rc = report.get("recall")
    if rc:
        lines += ["", f"recall cost on {rc['dataset']} {rc['split']} ({rc['n_queries']} queries, "
                      f"{rc['n_documents']} documents), x100:",
                  f"  {'backend':<15} {'overlap@10':>10} {'R@10':>7} {'dR@10':>7} {'MRR@10':>7} {'dMRR@10':>8}"]
        for name, v in rc["per_backend"].items():
            lines.append(f"  {name:<15} {v['overlap_at_10']:>10.2f} {v['recall_at_10']:>7.2f} "
                         f"{v['delta_recall_at_10']:>+7.2f} {v['mrr_at_10']:>7.2f} {v['delta_mrr_at_10']:>+8.2f}")
    if m["random_weights"]:
        lines += ["", "note: random weights; latency and parity are meaningful, retrieval quality is not"]
    return "\n".join(lines)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_report(report: dict, path: str) -> str:
    """Two panels grouped by batch size, one colour per backend: throughput with the speedup over
    eager fp32 written on each bar, and latency per batch (bar = median, line up to p99, dot at p90).
    Bars whose parity is below PARITY_WARN are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = report["results"]
    names = list(dict.fromkeys(r["backend"] for r in rows))
    sizes = report["settings"]["batches"]
    by = {(r["backend"], r["batch"]): r for r in rows}
    colors = plt.get_cmap("tab10").colors
    width = min(0.8 / len(names), 0.3)
    x = np.arange(len(sizes))
    fig, (ax_thr, ax_lat) = plt.subplots(1, 2, figsize=(max(11.0, 2.0 + 0.55 * len(sizes) * len(names) * 2), 5.6))
    for i, name in enumerate(names):
        pos = x + width * (i - (len(names) - 1) / 2)
        rs = [by.get((name, bs)) for bs in sizes]
        get = lambda f: np.array([f(r) if r else np.nan for r in rs])
        med, p90, p99 = (get(lambda r, k=k: r["latency_ms"][k]) for k in ("median", "p90", "p99"))
        thr = get(lambda r: r["items_per_s"])
        label = "torch eager fp32 (baseline)" if name == BASELINE else name
        style = dict(color=colors[i % 10], edgecolor="white", linewidth=0.5)
        tbars = ax_thr.bar(pos, thr, width, label=label, **style)
        lbars = ax_lat.bar(pos, med, width, **style)
        # the tail: a line from the median up to p99 (capped), a dot at p90
        ax_lat.errorbar(pos, med, yerr=[np.zeros_like(med), p99 - med], fmt="none", ecolor="black", elinewidth=1,
                        capsize=3)
        ax_lat.plot(pos, p90, "o", color="black", markersize=2.5)
        for r, tb, lb in zip(rs, tbars, lbars):
            if r and r["parity"]["min_cosine"] < PARITY_WARN:
                tb.set_hatch("//")
                lb.set_hatch("//")
            if r:
                cos = r["parity"]["min_cosine"]  # shown when it is not a rounding-level match
                text = f"{r['speedup']:.2f}x" + (f"\ncos {cos:.4f}" if cos < 0.9999 else "")
                ax_thr.annotate(text, (tb.get_x() + tb.get_width() / 2, tb.get_height()),
                                xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                                rotation=90 if len(names) > 3 else 0)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (ax_thr, ax_lat):
        ax.set_xticks(x, [f"batch {bs}" for bs in sizes])
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    for ax, values in ((ax_thr, [r["items_per_s"] for r in rows]), (ax_lat, [r["latency_ms"]["p99"] for r in rows]
                                                                       + [r["latency_ms"]["median"] for r in rows])):
        log_scale = max(values) / max(min(values), 1e-9) > 30  # far apart: a linear axis hides the small ones
        if log_scale:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        # headroom for the labels above the bars (rotated two-line labels need the most)
        labelled = ax is ax_thr
        top = max(values) * (((4.0 if len(names) > 3 else 2.0) if labelled else 1.3) if log_scale
                             else ((1.35 if len(names) > 3 else 1.15) if labelled else 1.05))
        ax.set_ylim(top=top)
    ax_thr.set_ylabel("items per second (at median latency)")
    ax_thr.set_title("Throughput; label = speedup vs eager fp32 (+ min cosine if < 0.9999)", fontsize=10.5)
    ax_lat.set_ylabel("ms per batch")
    ax_lat.set_title("Latency per batch: bar = median, line to p99, dot = p90", fontsize=10.5)
    m, inp, env, st = report["model"], report["inputs"], report["environment"], report["settings"]
    where = env["gpu"] or f"{env['cpu']} ({env['cpus_usable']} cores)"
    images = "text only" if not inp["images_per_item"] else (
        f"{inp['images_per_item']} image x {inp['visual_tokens_per_image']} visual tokens")
    mixed = f", {inp['text_only_fraction']:.0%} text-only items" if inp["text_only_fraction"] else ""
    fig.suptitle(f"mimic-engine bench: {m['source']}\n{inp['text_tokens']} text tokens + {images} per item{mixed}; "
                 f"{where}; {st['iters']} timed runs each", fontsize=10)
    handles, labels = ax_thr.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(names), 4), frameon=False, fontsize=9)
    if any(r["parity"]["min_cosine"] < PARITY_WARN for r in rows):
        fig.text(0.99, 0.01, f"hatched: min cosine vs eager fp32 below {PARITY_WARN}", ha="right", fontsize=8)
    fig.tight_layout(rect=(0, 0.07 + 0.04 * ((len(names) - 1) // 4), 1, 0.99))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---- command line ---------------------------------------------------------------------------------
def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers; e.g. 1,8,64") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: give one or more positive integers, e.g. 1,8,64")
    return out


@click.group("bench", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=None, help="A ckpt.pt or an export directory. Default: --preset with random weights.")
@click.option("--preset", type=click.Choice(PRESETS), default="small", show_default=True,
              help="Architecture to benchmark when no --model is given (base = T5-base + ViT-B/32 sizes).")
@click.option("--fusion", type=click.Choice(FUSIONS), default="decoder", show_default=True,
              help="Fusion of the preset model.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="One batch size (same as --batches N).")
@click.option("--batches", callback=_int_list, default=None, help="Comma-separated batch sizes [default: 1,8,64].")
@click.option("--backends", default="all", show_default=True,
              help="'all' (every backend this machine can load) or a comma list, e.g. torch,onnx-optimized. "
                   "The eager fp32 baseline always runs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--text-len", type=click.IntRange(min=2), default=None,
              help="Tokens per item text, special tokens included [default: the model's max_length].")
@click.option("--images-per-item", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--text-only-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of items without images, for corpus-like mixed batches.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True, help="Timed calls per backend and batch.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed calls first.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for PyTorch and ONNX Runtime [default: their own choice].")
@click.option("--peak-memory/--no-peak-memory", default=True, show_default=True,
              help="Measure peak memory per backend in a fresh process (adds a few seconds per backend).")
@click.option("--recall", is_flag=True, help="Also measure the retrieval cost of each backend on a corpus.")
@click.option("--recall-data", default="demo", show_default=True, help="Dataset kind for --recall.")
@click.option("--recall-data-dir", default=None, help="Dataset folder for --recall (demo: optional).")
@click.option("--recall-split", default="dev", show_default=True)
@click.option("--recall-queries", type=click.IntRange(min=1), default=200, show_default=True,
              help="At most this many queries (keeps --recall bounded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and inputs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG chart here.")
@click.pass_context
def bench_group(ctx, model, preset, fusion, batch, batches, backends, device, text_len, images_per_item,
                text_only_fraction, iters, warmup, threads, peak_memory, recall, recall_data, recall_data_dir,
                recall_split, recall_queries, seed, json_path, plot_path):
    """Benchmark the model per backend and batch size (latency, throughput, speedup, parity, memory).

    `mimic-engine bench serve --url ...` load-tests a running server instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    if batch is not None and batches is not None:
        raise click.UsageError("give --batch N or --batches a,b,c, not both")
    opts = BenchOptions(
        model=model, preset=preset, fusion=fusion, batches=[batch] if batch else (batches or list(DEFAULT_BATCHES)),
        backends=backends, device=device,
        inputs=InputSpec(text_tokens=text_len, images_per_item=images_per_item,
                         text_only_fraction=text_only_fraction, seed=seed),
        iters=iters, warmup=warmup, threads=threads, peak_memory=peak_memory, recall=recall,
        recall_data=recall_data, recall_data_dir=recall_data_dir, recall_split=recall_split,
        recall_queries=recall_queries,
    )
    report = run_bench(opts)
    click.echo(format_table(report))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2)
        click.echo(f"wrote {json_path}")
    if plot_path:
        click.echo(f"wrote {plot_report(report, plot_path)}")


def _add_serve_command() -> None:
    from .bench_serve import serve_command, serve_matrix_command

    bench_group.add_command(serve_command)
    bench_group.add_command(serve_matrix_command)


_add_serve_command()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
    try:
        print(json.dumps(_memory_probe(json.loads(sys.argv[2]))))
    except (MimicError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
