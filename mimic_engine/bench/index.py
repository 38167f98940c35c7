"""The index benchmark (`mimic-engine bench index`): a DocumentIndex on random unit vectors.

    mimic-engine bench index --n 100000 --dim 384 --queries 1000

Measured: bulk ingestion (`chunk` documents per upsert transaction), single-document upserts (one
commit, i.e. one fsync, each), single-vector searches over every modality and over image documents
only (each search includes the SQLite fetch of its k documents), the snapshot written on close,
the resident memory of a fresh process that opens the folder and searches (`memory.py`), and the
folder's size on disk. Every third document is an image document with a caption, the rest text.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .environment import environment
from .inputs import unit_vectors
from .memory import measure_index_memory
from .report import new_report

SCHEMA = "mimic-engine-bench-index/1"
MODEL_ID = "bench-random"  # the index's model id: its vectors come from no model


@dataclass
class IndexBenchOptions:
    """`bench index`, with its defaults."""

    n: int = 100_000  # documents ingested in bulk
    dim: int = 384
    queries: int = 1000  # timed single-vector searches per modality filter
    k: int = 10
    chunk: int = 1000  # documents per bulk upsert transaction
    single: int = 200  # single-document upserts timed after the bulk
    seed: int = 0


def _documents(lo: int, hi: int) -> list:
    from ..index.store import StoredDocument

    return [StoredDocument(f"doc-{i}", "image" if i % 3 == 0 else "text",
                           text=None if i % 3 == 0 else f"passage {i} " * 8,
                           caption=f"caption {i}" if i % 3 == 0 else None, metadata={"i": i}) for i in range(lo, hi)]


def bench_index(path: str, opts: IndexBenchOptions) -> dict:
    """Build a new index at `path` and time it (module docstring) -> the report: report.new_report's
    fields plus {"n", "dim", "k", "bulk_upsert_docs_per_s", "single_upsert_p50_ms", "single_upsert_docs_per_s",
    "search_p50_ms", "search_p99_ms", "search_image_only_p50_ms", "search_image_only_p99_ms", "close_snapshot_s",
    "rss_mib", "rss_before_open_mib", "open_s" (or "memory_error"), "folder_mib"}."""
    from ..index.document_index import DocumentIndex

    if os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"--index {path!r} is not empty: the index benchmark builds a new index; pass a new "
                          "folder or none (a temporary one)")
    rng = np.random.default_rng(opts.seed)
    n = opts.n
    out = {"n": n, "dim": opts.dim, "k": opts.k}
    with DocumentIndex(path, dim=opts.dim, model_id=MODEL_ID) as idx:
        t0 = time.perf_counter()
        for lo in range(0, n, opts.chunk):
            hi = min(n, lo + opts.chunk)
            idx.upsert(_documents(lo, hi), unit_vectors(rng, hi - lo, opts.dim))
        out["bulk_upsert_docs_per_s"] = round(n / (time.perf_counter() - t0), 1)
        lat = []
        for i in range(opts.single):  # one document per call: one commit (fsync) each
            t = time.perf_counter()
            idx.upsert(_documents(n + i, n + i + 1), unit_vectors(rng, 1, opts.dim))
            lat.append(time.perf_counter() - t)
        if lat:
            out["single_upsert_p50_ms"] = round(1e3 * float(np.median(lat)), 3)
            out["single_upsert_docs_per_s"] = round(opts.single / sum(lat), 1)
        qs = unit_vectors(rng, opts.queries, opts.dim)
        for name, modality in (("search", None), ("search_image_only", "image")):
            lat = []
            for q in qs:
                t = time.perf_counter()
                idx.search(q, opts.k, modality)
                lat.append(time.perf_counter() - t)
            out[f"{name}_p50_ms"] = round(1e3 * float(np.percentile(lat, 50)), 3)
            out[f"{name}_p99_ms"] = round(1e3 * float(np.percentile(lat, 99)), 3)
        t = time.perf_counter()
        idx.close()
        out["close_snapshot_s"] = round(time.perf_counter() - t, 2)
    memory = measure_index_memory(path, opts.dim, MODEL_ID, opts.k)  # fresh, so no benchmark arrays count
    out.update(memory if "error" not in memory else {"memory_error": memory["error"]})
    out["folder_mib"] = round(sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20, 1)
    return new_report(SCHEMA, environment("cpu"), **out)
