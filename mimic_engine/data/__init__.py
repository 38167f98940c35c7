"""Retrieval datasets: `load_dataset(kind, data_dir)` -> RetrievalDataset (see `types.py`).

Kinds: "demo" (the bundled handwritten-digit corpus, built on first use), "webqa" (the WebQA
retrieval release), "evqa" (Encyclopedic-VQA), "jsonl" (users' own corpora). This module stays
light: readers (and torch, through the dataset types) are imported when a dataset is loaded.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .types import RetrievalDataset

KINDS = ("demo", "webqa", "evqa", "jsonl")


def default_home() -> Path:
    """Where mimic-engine keeps generated data: $MIMIC_HOME, or ~/.cache/mimic-engine."""
    home = os.environ.get("MIMIC_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "mimic-engine"


def default_demo_dir() -> Path:
    return default_home() / "demo"


def _reader(kind: str):
    if kind in ("demo", "webqa"):
        from .webqa import read_webqa
        return read_webqa
    if kind == "evqa":
        from .evqa import read_evqa
        return read_evqa
    from .jsonl import read_jsonl
    return read_jsonl


def load_dataset(kind: str, data_dir: str | os.PathLike | None = None, **options) -> "RetrievalDataset":
    """Read a dataset folder of the given kind; `options` go to its reader (e.g. strict=True).

    For "demo", `data_dir` defaults to `default_demo_dir()` and the corpus is built there first if
    missing (option `seed`, default 0).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
    reader = _reader(kind)
    seed = options.pop("seed", 0) if kind == "demo" else None
    allowed = [p for p in inspect.signature(reader).parameters if p != "data_dir"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        extra = ["seed"] if kind == "demo" else []
        raise ConfigError(f"unknown option(s) {unknown} for dataset kind {kind!r}; accepted: {extra + allowed}")
    if kind == "demo":
        from .demo import ensure_demo_corpus

        data_dir = default_demo_dir() if data_dir is None else data_dir
        ensure_demo_corpus(data_dir, seed)
        options.setdefault("name", "demo")
    elif data_dir is None:
        raise ConfigError(f"dataset kind {kind!r} needs a data folder (data_dir); only 'demo' has a default")
    return reader(data_dir, **options)
