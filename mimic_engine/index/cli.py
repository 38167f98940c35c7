"""`mimic-engine index build|stats|repair`: bulk ingestion of a dataset into an index folder (see build.py), its
stats, and the salvage of a damaged document store (see repair.py)."""
from __future__ import annotations

import json
import time

import click

from ..cli_options import CAPTION_KEEP_RATE, data_options, device_option
from .build import build_index
from .document_index import DEFAULTS as HNSW_DEFAULTS


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
    with DocumentIndex(index_dir, dim=encoder.dim, model_id=encoder.model_id, M=M, ef_construction=ef_construction,
                       legacy_model_ids=encoder.legacy_model_ids) as index:
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



@index_group.command("repair")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder.")
def repair_command(index_dir):
    """Salvage a damaged docs.sqlite: keep every document SQLite can still read, list lost ids (stop the server first)."""
    from .repair import repair_store

    report = repair_store(index_dir)
    lost = report["documents_lost_known"]
    click.echo(f"kept {report['documents_kept']} documents; the damaged file is now {report['damaged_copy']}")
    if lost:
        click.echo(f"lost {len(lost)} documents whose ids are known (upsert them again): {', '.join(lost[:50])}"
                   + (" ..." if len(lost) > 50 else ""))
    if report["rows_unusable"]:
        click.echo(f"dropped {report['rows_unusable']} rows whose stored values no longer parse")
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}")
    click.echo("the graph is rebuilt from the kept documents when the index is next opened")
