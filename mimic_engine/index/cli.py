"""`mimic-engine index build|info|stats|repair`: bulk ingestion of a dataset into an index (see build.py), its
stats, and the salvage of a damaged folder's document store (see repair.py).

--index (or MIMIC_INDEX) is a folder or milvus:<uri>[#<collection>] (selection.py)."""
from __future__ import annotations

import json
import time

import click

from ..cli_options import CAPTION_KEEP_RATE, data_options, device_option
from .build import build_index
from .document_index import DEFAULTS as HNSW_DEFAULTS


@click.group("index", context_settings={"help_option_names": ["-h", "--help"]})
def index_group():
    """Build and inspect persistent vector indexes (a folder: SQLite + HNSW graph; or a Milvus collection)."""


@index_group.command("build")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Checkpoint (ckpt.pt) whose encoder embeds the documents.")
@data_options()
@click.option("--index", "index_dir", required=True, envvar="MIMIC_INDEX", show_envvar=True,
              help="Index folder or milvus:<uri>[#<collection>] (created if missing; an interrupted build resumes in it).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Documents per encoder batch.")
@click.option("--caption-keep", type=CAPTION_KEEP_RATE, default=1.0, show_default=True,
              help="Fraction of image captions kept (deterministic per document id), as in WebQA+/EVQA+.")
@device_option()
@click.option("--m", "M", type=click.IntRange(min=2), default=None, show_default=str(HNSW_DEFAULTS["M"]),
              help="HNSW links per node for a new index.")
@click.option("--ef-construction", type=click.IntRange(min=1), default=None,
              show_default=str(HNSW_DEFAULTS["ef_construction"]), help="HNSW build breadth for a new index.")
@click.option("--thumbnails/--no-thumbnails", default=True, show_default=True,
              help="Store a small preview (WebP, <= 256 px) of each image document, shown by the search page.")
def build_command(model_path, data_kind, data_dir, index_dir, batch_size, caption_keep, device, M, ef_construction,
                  thumbnails):
    """Encode a dataset's corpus into an index folder (much faster than upserting over HTTP). Under
    `torchrun --nproc-per-node N --no-python mimic-engine index build ...` the N processes share the
    encoding and rank 0 writes the index."""
    import contextlib

    from .. import distributed
    from ..data import load_dataset
    from ..encoder import MimicEncoder
    from .selection import open_index

    encoder = MimicEncoder.from_checkpoint(model_path, device=distributed.init_from_env(device))
    dataset = load_dataset(data_kind, data_dir)
    t0 = time.perf_counter()
    opened = open_index(index_dir, dim=encoder.dim, model_id=encoder.model_id, M=M, ef_construction=ef_construction,
                        legacy_model_ids=encoder.legacy_model_ids) if distributed.is_main() else None
    with opened if opened is not None else contextlib.nullcontext() as index:
        before = index.count() if index is not None else 0
        added = build_index(encoder, dataset, index, batch_size=batch_size, caption_keep=caption_keep, source=data_kind,
                            thumbnails=thumbnails)
        seconds = time.perf_counter() - t0
        if index is not None:
            processes = f" by {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
            click.echo(f"added {added} documents ({before} were already there) in {seconds:.1f} s"
                       f" ({added / max(seconds, 1e-9):.1f} docs/s{processes}); the index holds {index.count()} "
                       f"({index.count('text')} text, {index.count('image')} image) at {index.path}")


@index_group.command("info")
@click.option("--index", "index_dir", required=True, envvar="MIMIC_INDEX", show_envvar=True,
              help="Index folder or milvus:<uri>[#<collection>].")
def info_command(index_dir):
    """Print an index's counts, parameters and state as JSON (a folder is read-only and safe while serving;
    a Milvus Lite file cannot be read while a server holds it: ask its /v1/info)."""
    from .selection import describe_index

    click.echo(json.dumps(describe_index(index_dir), indent=2, sort_keys=True))


index_group.add_command(info_command, "stats")  # the command's earlier name



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
