"""Benchmarks: `mimic-engine bench [serve|serve-matrix|index|gpu]`, one module per concern.

    inputs.py       deterministic benchmark inputs: texts of exact token counts, digit scans, random
                    pixel tensors and token ids, PNG payloads, random unit vectors
    timing.py       interleaved round-robin timing, CUDA-event timing, latency statistics, parity
    memory.py       peak-memory probes in a fresh process (`python -m mimic_engine.bench.memory JOB`)
    environment.py  CPU model and flags, cores, load, library versions, GPU: recorded in every report
    report.py       one report format (schema, created, environment, body), JSON, tables, PNG chart
    recall.py       the retrieval cost of a backend against the baseline (through `metrics.py`)
    model.py        the model benchmark (`mimic-engine bench`): model resolution, on-demand export,
                    backend loading, the whole run
    serve.py        the HTTP load generator (`bench serve`) and batching on/off (`bench serve-matrix`)
    compare.py      embedding servers side by side (`bench serve` with several --url): this project's
                    and OpenAI-style endpoints, CxK cells, interleaved repeats, server CPU per request
    index.py        ingestion and search of a DocumentIndex on random vectors (`bench index`)
    gpu.py          the GPU paths side by side on one model (`bench gpu`)
    cli.py          the click commands, nothing else

Only cli.py imports click; importing this package imports nothing heavy.
"""
from __future__ import annotations

import sys


def log(msg: str, prefix: str = "bench") -> None:
    """Progress for the person running a benchmark: stderr, so stdout keeps only the results."""
    print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)
