"""Timing and the statistics every benchmark reports.

- Warm-up calls are not timed. Backends compared with each other are timed interleaved: round r
  runs every backend once, starting from backend r mod n, so slow drifts of a shared machine hit
  all backends alike (`time_backends`).
- On CUDA, CUDA events bracket each call on the current stream next to the wall clock; a call
  ends with its result copied to the host, so the device work is finished when it returns.
"""
from __future__ import annotations

import time

import numpy as np

from . import log


def device_of(backend) -> str:
    """"cuda..." or "cpu": where `backend` computes (torch backends say so, ONNX Runtime by its providers)."""
    dev = getattr(backend, "device", None)
    if dev is not None:
        return str(dev)
    providers = getattr(backend, "providers", None) or []
    return "cuda" if any("CUDA" in p or "Tensorrt" in p for p in providers) else "cpu"


def timed_call(fn, cuda: bool):
    """fn() -> (wall ms, CUDA-event ms or None, fn's result)."""
    if cuda:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
    t0 = time.perf_counter()
    result = fn()  # returns host data: the device work is finished
    wall = (time.perf_counter() - t0) * 1e3
    if not cuda:
        return wall, None, result
    end.record()
    end.synchronize()
    return wall, float(start.elapsed_time(end)), result


def time_calls(fn, iters: int, warmup: int, cuda: bool) -> list[float]:
    """`warmup` untimed calls of fn(), then `iters` timed ones -> ms each (CUDA-event time on CUDA, else wall)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        wall, device_ms, _ = timed_call(fn, cuda)
        times.append(device_ms if cuda else wall)
    return times


def time_backends(backends: dict, batches: dict, iters: int, warmup: int) -> dict:
    """Run every backend on every batch, interleaved per round (module docstring).

    -> {(name, batch_size): {"wall_ms": [...], "device_ms": [...] or None (not CUDA), "first": (B, E)
    vectors of the first call, "last": (B, E) vectors of the last call}}.
    """
    names = list(backends)
    out = {}
    for bs, batch in batches.items():
        log(f"batch {bs}: warm-up x{warmup}, then {iters} interleaved rounds over {len(names)} backends")
        for name in names:
            cuda = device_of(backends[name]).startswith("cuda")
            rec = out[(name, bs)] = {"wall_ms": [], "device_ms": [] if cuda else None}
            for _ in range(warmup):
                vecs = backends[name].encode_batch(batch)
                rec.setdefault("first", vecs)
        for r in range(iters):
            for name in names[r % len(names):] + names[: r % len(names)]:
                rec = out[(name, bs)]
                wall, dev, vecs = timed_call(lambda: backends[name].encode_batch(batch), rec["device_ms"] is not None)
                rec["wall_ms"].append(wall)
                if dev is not None:
                    rec["device_ms"].append(dev)
                rec.setdefault("first", vecs)
                rec["last"] = vecs
    return out


def latency_stats(samples_ms: list[float]) -> dict | None:
    """{"median", "p90", "p99", "mean", "min", "max", "n"} of the samples (ms); None for no samples."""
    if not len(samples_ms):
        return None
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def parity(vecs: np.ndarray, ref: np.ndarray) -> dict:
    """Per-item cosine (float64) between two (B, E) sets of vectors -> min cosine, max |diff|."""
    a, b = np.asarray(vecs, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max())}
