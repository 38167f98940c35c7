"""`mimic-engine index build|stats`: bulk ingestion of a dataset into an index folder (see build.py), and its stats."""
from __future__ import annotations

import json
import os
import time

import click
import numpy as np

from ..cli_options import CAPTION_KEEP_RATE, data_options, device_option
from .build import build_index
from .document_index import DEFAULTS as HNSW_DEFAULTS
from .store import StoredDocument


@click.group("index", context_settings={"help_option_names": ["-h", "--help"]})
def index_group():
    """Build and inspect persistent vector indexes (SQLite document store + HNSW graph)."""


@index_group.command("build")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Checkpoint (ckpt.pt) whose encoder embeds the documents.")
@data_options()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False),
              help="Index folder (created if missing; an interrupted build resumes in it).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Documents per encoder batch.")
@click.option("--caption-keep", type=CAPTION_KEEP_RATE, default=1.0, show_default=True,
              help="Fraction of image captions kept (deterministic per document id), as in WebQA+/EVQA+.")
@device_option()
@click.option("--m", "M", type=click.IntRange(min=2), default=None, show_default=str(HNSW_DEFAULTS["M"]),
              help="HNSW links per node for a new index.")
@click.option("--ef-construction", type=click.IntRange(min=1), default=None,
              show_default=str(HNSW_DEFAULTS["ef_construction"]), help="HNSW build breadth for a new index.")
def build_command(model_path, data_kind, data_dir, index_dir, batch_size, caption_keep, device, M, ef_construction):
    """Encode a dataset's corpus into an index folder (much faster than upserting over HTTP)."""
    from ..data import load_dataset
    from ..encoder import MimicEncoder
    from .document_index import DocumentIndex

    encoder = MimicEncoder.from_checkpoint(model_path, device=device)
    dataset = load_dataset(data_kind, data_dir)
    t0 = time.perf_counter()
    with DocumentIndex(index_dir, dim=encoder.dim, model_id=encoder.model_id, M=M, ef_construction=ef_construction) as index:
        before = index.count()
        added = build_index(encoder, dataset, index, batch_size=batch_size, caption_keep=caption_keep, source=data_kind)
        seconds = time.perf_counter() - t0
        click.echo(f"added {added} documents ({before} were already there) in {seconds:.1f} s"
                   f" ({added / max(seconds, 1e-9):.1f} docs/s); the index holds {index.count()} "
                   f"({index.count('text')} text, {index.count('image')} image) at {index.path}")


@index_group.command("stats")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder.")
def stats_command(index_dir):
    """Print an index folder's counts, parameters and snapshot state as JSON (read-only; safe while serving)."""
    from .document_index import describe

    click.echo(json.dumps(describe(index_dir), indent=2, sort_keys=True))


def _vm_rss_mib() -> float:
    """This process's resident memory (Linux /proc/self/status VmRSS), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_index(path: str, n: int, dim: int, queries: int = 1000, k: int = 10, chunk: int = 1000,
                single: int = 200, seed: int = 0) -> dict:
    """Ingest `n` random unit vectors (dim) into a new index at `path`, then time single-vector
    searches (each includes the SQLite fetch of its k documents). -> measurements."""
    import subprocess
    import sys

    from .document_index import DocumentIndex

    rng = np.random.default_rng(seed)

    def unit(m):
        x = rng.standard_normal((m, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def docs(lo, hi):
        return [StoredDocument(f"doc-{i}", "image" if i % 3 == 0 else "text", text=None if i % 3 == 0 else f"passage {i} " * 8,
                               caption=f"caption {i}" if i % 3 == 0 else None, metadata={"i": i}) for i in range(lo, hi)]

    out = {"n": n, "dim": dim, "k": k}
    with DocumentIndex(path, dim=dim, model_id="bench-random") as idx:
        t0 = time.perf_counter()
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            idx.upsert(docs(lo, hi), unit(hi - lo))
        out["bulk_upsert_docs_per_s"] = round(n / (time.perf_counter() - t0), 1)
        lat = []
        for i in range(single):  # one document per call: one commit (fsync) each
            t = time.perf_counter()
            idx.upsert(docs(n + i, n + i + 1), unit(1))
            lat.append(time.perf_counter() - t)
        out["single_upsert_p50_ms"] = round(1e3 * float(np.median(lat)), 3)
        out["single_upsert_docs_per_s"] = round(single / sum(lat), 1)
        qs = unit(queries)
        for name, modality in (("search", None), ("search_image_only", "image")):
            lat = []
            for q in qs:
                t = time.perf_counter()
                idx.search(q, k, modality)
                lat.append(time.perf_counter() - t)
            out[f"{name}_p50_ms"] = round(1e3 * float(np.percentile(lat, 50)), 3)
            out[f"{name}_p99_ms"] = round(1e3 * float(np.percentile(lat, 99)), 3)
        t = time.perf_counter()
        idx.close()
        out["close_snapshot_s"] = round(time.perf_counter() - t, 2)
    # resident memory of a process that holds the index (fresh, so no benchmark arrays count)
    probe = ("import json, time; from mimic_engine.index.cli import _vm_rss_mib; import numpy, hnswlib, sqlite3; "
             "base = _vm_rss_mib(); t = time.perf_counter(); from mimic_engine.index import DocumentIndex; "
             f"idx = DocumentIndex({path!r}, dim={dim}, model_id='bench-random'); s = time.perf_counter() - t; "
             f"[idx.search(q, {k}) for q in numpy.random.default_rng(1).standard_normal((200, {dim})).astype('float32')]; "
             "print(json.dumps({'rss_mib': round(_vm_rss_mib(), 1), 'rss_before_open_mib': round(base, 1), 'open_s': round(s, 2)}))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    out["folder_mib"] = round(sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20, 1)
    return out


@index_group.command("bench")
@click.option("--n", "n", type=click.IntRange(min=1), default=100_000, show_default=True, help="Documents to index.")
@click.option("--dim", type=click.IntRange(min=1), default=384, show_default=True)
@click.option("--queries", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
              help="New folder to build in (default: a temporary folder, removed afterwards).")
def bench_command(n, dim, queries, index_dir):
    """Time ingestion and search on random unit vectors; report the memory of a process holding the index."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = bench_index(index_dir or os.path.join(tmp, "index"), n, dim, queries)
    click.echo(json.dumps(result, indent=2))
