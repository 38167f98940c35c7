"""`mimic-engine eval`: the command line over `mimic_engine.evaluate`."""
from __future__ import annotations

import click

from .cli_options import caption_keep_option, data_options, device_option, seed_option
from .errors import DataError
from .evaluate import DEFAULT_KEEP_RATES, diagnostics, evaluate, format_table

@click.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@data_options()
@click.option("--split", type=click.Choice(["dev", "test"]), default="dev", show_default=True)
@caption_keep_option(default=DEFAULT_KEEP_RATES)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results here.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@device_option()
@click.option("--max-queries", type=click.IntRange(min=1), default=None, help="Evaluate the first N queries only.")
@seed_option(help="Seed of the caption coin and diagnostics draw.")
@click.option("--no-diagnostics", is_flag=True, help="Skip the modality-collapse / misalignment diagnostics.")
def eval_command(checkpoint, data_kind, data_dir, split, caption_keep, json_path, batch_size, device,
                 max_queries, seed, no_diagnostics):
    """Evaluate CHECKPOINT on a dataset: MRR@10, NDCG@10, Recall@20/100 at each caption-keep rate.
    Under `torchrun --nproc-per-node N --no-python mimic-engine eval ...` the N processes share the
    encoding and rank 0 prints and writes the results."""
    import json

    from . import distributed
    from .data import load_dataset
    from .encoder import MimicEncoder

    encoder = MimicEncoder.from_checkpoint(checkpoint, device=distributed.init_from_env(device))
    dataset = load_dataset(data_kind, data_dir)
    result = evaluate(encoder, dataset, split=split, caption_keep=caption_keep, seed=seed,
                      batch_size=batch_size, max_queries=max_queries, progress=True, sharded=True)
    diag, diag_note = None, None
    if not no_diagnostics:
        try:
            diag = diagnostics(encoder, dataset, seed=seed, batch_size=batch_size, sharded=True)
        except DataError as exc:
            diag_note = f"diagnostics skipped: {exc}"
    if not distributed.is_main():
        return
    click.echo(format_table(result, diag))
    if diag_note:
        click.echo(diag_note)
    if json_path:
        cfg = encoder.config
        report = {
            **result,
            "diagnostics": diag,
            "model_id": encoder.model_id,
            "config": {
                "checkpoint": checkpoint,
                "preset": cfg.preset,
                "fusion": cfg.fusion.fusion,
                "embed_dim": encoder.dim,
                "strategy": {"caption_dropout": cfg.strategy.caption_dropout, "mixin": cfg.strategy.mixin},
                "data": data_kind,
                "data_dir": data_dir,
                "dataset": dataset.name,
                "caption_keep": list(caption_keep),
                "max_queries": max_queries,
            },
        }
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2)
        click.echo(f"wrote {json_path}")
