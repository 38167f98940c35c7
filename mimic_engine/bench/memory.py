"""Peak memory, measured in a fresh interpreter so that nothing the benchmark itself holds counts.

    python -m mimic_engine.bench.memory '{"probe": "backend", "backend": "torch", "path": "ckpt.pt", ...}'
    python -m mimic_engine.bench.memory '{"probe": "index", "path": "DIR", "dim": 384, "model_id": "...", ...}'

The child prints one JSON line; `measure_memory` and `measure_index_memory` start it and read that.

- backend: the child imports the libraries first (library code is not the backend's memory), reads
  its resident set, loads the backend and runs the largest batch 3 times, then reports its peak
  resident set (Linux VmHWM) next to the resident set before loading: the difference is what that
  backend needs. On CUDA the peak of torch's allocator is reported too (ONNX Runtime and TensorRT
  allocate outside it, so theirs is not).
- index: the resident set of a process that opens the index folder and answers 200 searches.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ..errors import ConfigError, InputError, MimicError

PROBE_TIMEOUT_S = 600.0


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_now_mb() -> float | None:
    """This process's resident set now (VmRSS), MiB; None where /proc is missing."""
    kb = _proc_status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def peak_rss_mb() -> tuple[float, str]:
    """Peak resident set of this process -> (MiB, what the number is)."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024, "VmHWM"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "ru_maxrss"


# ---- the parent's side -------------------------------------------------------------------------
def run_probe(job: dict, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """Run `job` in a fresh interpreter -> its JSON answer, or {"error": why} (never raises for a failed child)."""
    cmd = [sys.executable, "-m", "mimic_engine.bench.memory", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the memory probe took over {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the memory probe failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def measure_memory(name: str, path: str, device: str, batch_size: int, spec, threads: int | None,
                   backend_kwargs: dict | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """Peak memory of backend `name` on `path` running a batch of `batch_size` items made by `spec` (an
    `InputSpec`), in a fresh process; `threads` for torch, `backend_kwargs` for `load_backend`.

    -> {"rss_before_load_mb", "peak_rss_mb", "peak_rss_source", "peak_rss_added_mb", "batch",
        "gpu_peak_torch_allocator_mb"? (CUDA)} or {"error": why}.
    """
    return run_probe({"probe": "backend", "backend": name, "path": path, "device": device, "batch": batch_size,
                      "threads": threads, "kwargs": backend_kwargs or {}, "spec": spec.__dict__}, timeout_s)


def measure_index_memory(path: str, dim: int, model_id: str, k: int, searches: int = 200,
                         timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """Resident memory of a fresh process that opens the index at `path` and answers `searches` searches.

    -> {"rss_mib", "rss_before_open_mib", "open_s"} or {"error": why}.
    """
    return run_probe({"probe": "index", "path": path, "dim": dim, "model_id": model_id, "k": k, "searches": searches},
                     timeout_s)


# ---- the child's side --------------------------------------------------------------------------
def _backend_probe(job: dict) -> dict:
    import importlib

    import torch

    from ..runtime import load_backend
    from .inputs import InputSpec, bench_batch

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
    before = rss_now_mb()
    backend = load_backend(name, job["path"], job["device"], **job["kwargs"])
    batch, _ = bench_batch(backend.preprocessor, job["batch"], InputSpec(**job["spec"]))
    for _ in range(3):
        backend.encode_batch(batch)
    peak, what = peak_rss_mb()
    out = {"rss_before_load_mb": round(before, 1) if before is not None else None, "peak_rss_mb": round(peak, 1),
           "peak_rss_source": what, "batch": job["batch"]}
    if before is not None:
        out["peak_rss_added_mb"] = round(peak - before, 1)
    if torch.cuda.is_available() and job["device"].startswith("cuda"):
        out["gpu_peak_torch_allocator_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _index_probe(job: dict) -> dict:
    import sqlite3  # noqa: F401  (library code is imported before the "before" reading: it is not the index)
    import time

    import hnswlib  # noqa: F401
    import numpy as np

    if not os.path.isdir(job["path"]):
        raise ConfigError(f"index folder {job['path']!r} does not exist")
    base = rss_now_mb()
    t = time.perf_counter()
    from ..index.document_index import DocumentIndex

    idx = DocumentIndex(job["path"], dim=job["dim"], model_id=job["model_id"])
    opened = time.perf_counter() - t
    for q in np.random.default_rng(1).standard_normal((job["searches"], job["dim"])).astype(np.float32):
        idx.search(q, job["k"])
    return {"rss_mib": round(rss_now_mb(), 1), "rss_before_open_mib": round(base, 1), "open_s": round(opened, 2)}


PROBES = {"backend": _backend_probe, "index": _index_probe}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m mimic_engine.bench.memory JOB_JSON", file=sys.stderr)
        return 2
    try:
        job = json.loads(argv[0])
        probe = PROBES.get(job.get("probe"))
        if probe is None:
            raise ConfigError(f"memory probe {job.get('probe')!r} is unknown; choose one of {sorted(PROBES)}")
        print(json.dumps(probe(job)))
    except (MimicError, InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
