"""The index benchmark (`mimic-engine bench index`): an index of either backend on random unit vectors.

    mimic-engine bench index --n 100000 --dim 384 --queries 1000                   # a folder (hnswlib + SQLite)
    mimic-engine bench index --n 100000 --dim 384 --index milvus:/tmp/bench.db     # Milvus Lite
    mimic-engine bench index --index milvus:http://127.0.0.1:19530#bench           # a Milvus server

Measured: bulk ingestion (`chunk` documents per upsert; Milvus: then a flush, which seals and indexes
the segments, counted in the build rate), single-document upserts, single-vector searches (one
thread, one query at a time, each including the fetch of its k documents) over every modality and
over image documents only: p50 / p99 latency, QPS and Recall@k against exact search over the same
vectors. For a folder also: the same searches on a raw hnswlib index of the same vectors and
parameters (the folder's own overhead), the snapshot written on close, the resident memory of a fresh
process that opens the folder and searches (`memory.py`), and the folder's size on disk. Every third
document is an image document with a caption, the rest text.
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
    chunk: int = 1000  # documents per bulk upsert
    single: int = 200  # single-document upserts timed after the bulk
    raw_hnswlib: bool = True  # a folder: also time raw hnswlib on the same vectors and parameters
    seed: int = 0


def _documents(lo: int, hi: int) -> list:
    from ..index.store import StoredDocument

    return [StoredDocument(f"doc-{i}", "image" if i % 3 == 0 else "text",
                           text=None if i % 3 == 0 else f"passage {i} " * 8,
                           caption=f"caption {i}" if i % 3 == 0 else None, metadata={"i": i}) for i in range(lo, hi)]


def exact_top_k(corpus: np.ndarray, queries: np.ndarray, k: int) -> list[np.ndarray]:
    """Row numbers of the k highest inner products per query, (Q,) arrays (in blocks: Q x N floats at once is a lot)."""
    out = []
    for lo in range(0, len(queries), 64):
        scores = queries[lo:lo + 64] @ corpus.T  # (q, N)
        top = np.argpartition(-scores, min(k, corpus.shape[0]) - 1, axis=1)[:, :k]
        out.extend(top)
    return out


def recall_at_k(found: list[set], exact: list[np.ndarray]) -> float:
    """Mean over queries of |found & exact| / |exact|."""
    return round(float(np.mean([len(f & set(e.tolist())) / len(e) for f, e in zip(found, exact)])), 4)


def _timed_searches(search, queries: np.ndarray) -> tuple[dict, list]:
    """search(q) -> hits; -> ({p50_ms, p99_ms, qps}, hits per query)."""
    lat, hits = [], []
    for q in queries:
        t = time.perf_counter()
        hits.append(search(q))
        lat.append(time.perf_counter() - t)
    return {"p50_ms": round(1e3 * float(np.percentile(lat, 50)), 3), "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 3),
            "qps": round(len(lat) / sum(lat), 1)}, hits


def _check_new(spec: str, target) -> None:
    """The benchmark builds a new index: refuse one that holds something."""
    if target is None:
        if os.path.isdir(spec) and os.listdir(spec):
            raise ConfigError(f"--index {spec!r} is not empty: the index benchmark builds a new index; pass a new "
                              "folder or none (a temporary one)")
    elif target.uri.endswith(".db") and os.path.exists(target.uri):
        raise ConfigError(f"--index {spec!r}: {target.uri} exists; the index benchmark builds a new index: pass a new .db path")


def bench_index(path: str, opts: IndexBenchOptions) -> dict:
    """Build a new index at `path` (a folder or milvus:<uri>[#<collection>]) and time it (module doc) -> the
    report: report.new_report's fields plus {"backend", "n", "dim", "k", "M", "ef_construction", "ef",
    "bulk_upsert_docs_per_s", "build_docs_per_s", "single_upsert_p50_ms", "single_upsert_docs_per_s",
    "search_p50_ms", "search_p99_ms", "search_qps", "search_recall_at_k", and the same four for
    "search_image_only"}; a folder adds "raw_hnswlib_search_*" (p50_ms, p99_ms, qps, recall_at_k),
    "folder_overhead_p50" (folder p50 / raw p50), "close_snapshot_s", "rss_mib", "rss_before_open_mib", "open_s"
    (or "memory_error") and "folder_mib"; Milvus adds "flush_s" ("folder_mib" for Milvus Lite)."""
    from ..index.selection import milvus_target, open_index

    target = milvus_target(path)
    _check_new(path, target)
    rng = np.random.default_rng(opts.seed)
    n = opts.n
    corpus = unit_vectors(rng, n + opts.single, opts.dim)  # (n + single, dim): the bulk, then the single upserts
    modalities = np.array(["image" if i % 3 == 0 else "text" for i in range(len(corpus))])
    out = {"n": n, "dim": opts.dim, "k": opts.k}
    with open_index(path, opts.dim, MODEL_ID) as idx:
        if target is not None and idx.count():
            raise ConfigError(f"--index {path!r}: collection {idx.path} already holds {idx.count()} documents; the "
                              "index benchmark builds a new index: name a new collection (#<name>)")
        stats = idx.stats()
        out["backend"] = stats["backend"]
        out.update({name: stats["params"][name] for name in ("M", "ef_construction", "ef")})
        t0 = time.perf_counter()
        for lo in range(0, n, opts.chunk):
            hi = min(n, lo + opts.chunk)
            idx.upsert(_documents(lo, hi), corpus[lo:hi])
        upserted = time.perf_counter() - t0
        out["bulk_upsert_docs_per_s"] = round(n / upserted, 1)
        if target is not None:  # Milvus indexes sealed segments: the build is done once they are flushed
            t = time.perf_counter()
            idx.flush()
            out["flush_s"] = round(time.perf_counter() - t, 2)
        out["build_docs_per_s"] = round(n / (time.perf_counter() - t0), 1)
        lat = []
        for i in range(n, n + opts.single):  # one document per call: one commit (fsync) each for a folder
            t = time.perf_counter()
            idx.upsert(_documents(i, i + 1), corpus[i:i + 1])
            lat.append(time.perf_counter() - t)
        if lat:
            out["single_upsert_p50_ms"] = round(1e3 * float(np.median(lat)), 3)
            out["single_upsert_docs_per_s"] = round(opts.single / sum(lat), 1)
        qs = unit_vectors(rng, opts.queries, opts.dim)
        row = {f"doc-{i}": i for i in range(len(corpus))}
        for name, modality in (("search", None), ("search_image_only", "image")):
            rows = np.arange(len(corpus)) if modality is None else np.flatnonzero(modalities == modality)
            timing, hits = _timed_searches(lambda q: idx.search(q, opts.k, modality), qs)
            out.update({f"{name}_{key}": value for key, value in timing.items()})
            exact = [rows[e] for e in exact_top_k(corpus[rows], qs, opts.k)]
            out[f"{name}_recall_at_k"] = recall_at_k([{row[d.id] for d, _ in h} for h in hits], exact)
        t = time.perf_counter()
        idx.close()
        if target is None:
            out["close_snapshot_s"] = round(time.perf_counter() - t, 2)
    if target is None:
        if opts.raw_hnswlib:
            out.update(_raw_hnswlib(corpus, qs, opts, out))
            out["folder_overhead_p50"] = round(out["search_p50_ms"] / out["raw_hnswlib_search_p50_ms"], 3)
        memory = measure_index_memory(path, opts.dim, MODEL_ID, opts.k)  # fresh, so no benchmark arrays count
        out.update(memory if "error" not in memory else {"memory_error": memory["error"]})
    if target is None or target.uri.endswith(".db"):
        folder = path if target is None else target.uri
        out["folder_mib"] = round(sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
                                      for f in files) / 2**20, 1)
    return new_report(SCHEMA, environment("cpu"), **out)


def _raw_hnswlib(corpus: np.ndarray, queries: np.ndarray, opts: IndexBenchOptions, params: dict) -> dict:
    """The folder's searches on a bare hnswlib index of the same vectors and parameters (no documents)."""
    from ..index.hnsw import HnswGraph

    graph = HnswGraph.create(opts.dim, params["M"], params["ef_construction"], params["ef"], len(corpus))
    graph.index.add_items(corpus, np.arange(len(corpus)))
    timing, hits = _timed_searches(lambda q: graph.index.knn_query(q[None], k=opts.k, num_threads=1)[0][0], queries)
    out = {f"raw_hnswlib_search_{key}": value for key, value in timing.items()}
    out["raw_hnswlib_search_recall_at_k"] = recall_at_k([set(h.tolist()) for h in hits],
                                                        exact_top_k(corpus, queries, opts.k))
    return out
