"""`mimic-engine demo`: build (or summarise) the demo corpus."""
from __future__ import annotations

import time
from pathlib import Path

import click

from . import default_demo_dir
from .demo import build_demo_corpus, demo_info, ensure_demo_corpus, older_version, summary
from .webqa import read_webqa


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder to build in (default: $MIMIC_HOME/demo, or ~/.cache/mimic-engine/demo).")
@click.option("--force", is_flag=True, help="Rebuild even if the folder already holds the demo corpus.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for captions, splits and phrasings.")
def demo_command(out, force, seed):
    """Build the demo corpus (coloured handwritten-digit scans + number facts, WebQA format) and print a summary."""
    folder = Path(out) if out else default_demo_dir()
    t0 = time.perf_counter()
    info = demo_info(folder)
    built = force or info is None or older_version(info)  # an earlier version's corpus is rebuilt
    info = build_demo_corpus(folder, seed, force=info is not None) if built else ensure_demo_corpus(folder, seed)
    dataset = read_webqa(folder, strict=True, name="demo")  # the demo exercises the WebQA reader
    click.echo(summary(dataset, info, folder, time.perf_counter() - t0, built))
    if not built:
        click.echo("(pass --force to rebuild)")
