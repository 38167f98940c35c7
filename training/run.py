"""One training run, start to finish: resolve the options, train, plot, evaluate the best checkpoint.

    from mimic_engine.training.options import TrainOptions
    from mimic_engine.training.run import run_training
    outcome = run_training(TrainOptions(preset="small", fusion="late", out="runs/late"))
    outcome.checkpoint, outcome.steps, outcome.minutes, outcome.report["test"]

Writes OUT/ckpt.pt (best dev MRR@10), OUT/last.pt (resume), OUT/metrics.jsonl, OUT/curves.png and
OUT/results.json. `mimic-engine train`, `compare` and the demo model's first start call this.

Under torchrun (`torchrun --nproc-per-node N training/train.py ...`) every process runs this: they
train together (training/loop.py), share the final report's encoding, and rank 0 alone writes and
prints; every process returns the same outcome.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from .options import ResolvedTraining, TrainOptions, resolve_options


@dataclass(frozen=True)
class TrainingOutcome:
    checkpoint: str  # OUT/ckpt.pt
    run: ResolvedTraining  # the options and model config that were used
    report: dict  # OUT/results.json: dev and test metrics per caption-keep rate, diagnostics
    steps: int  # optimisation steps taken (resumed runs included)
    best_step: int  # the step of the selected checkpoint
    best_select: float  # its dev MRR@10 averaged over the select_keep rates
    minutes: float  # time in the training loop (dev evaluations included, final report not)
    stop_reason: str  # "steps", "time budget" or "early stopping"


def run_training(options: TrainOptions, echo: Callable[[str], None] = print) -> TrainingOutcome:
    from mimic_engine.evaluate import format_table

    from .loop import Trainer, final_report
    from .plots import plot_curves

    run = resolve_options(options)
    opts, strategy = run.options, run.config.strategy
    trainer = Trainer(run)
    if not trainer.is_main:
        echo = _silent
    ds = trainer.dataset
    processes = (f", {trainer.world_size} processes sharing each global batch of {opts.batch_size} queries"
                 if trainer.world_size > 1 else "")
    echo(f"training {opts.fusion} fusion ({opts.preset}) on {opts.data}: {len(ds.documents)} documents, "
         f"{len(trainer.stream.queries)} training queries, device {trainer.device}, "
         f"caption dropout {strategy.caption_dropout}, mix-in {strategy.mixin}, "
         f"query caption dropout {'on' if strategy.caption_dropout_queries else 'off'}{processes}")
    ckpt = trainer.fit()
    if trainer.is_main:
        plot_curves(trainer.log_path, os.path.join(opts.out, "curves.png"), f"{opts.preset} / {opts.fusion} fusion")
    report = final_report(ckpt, opts, ds)
    if trainer.is_main:
        with open(os.path.join(opts.out, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    echo(f"best checkpoint: {ckpt} (step {trainer.best_step}, dev MRR@10 {trainer.best:.2f} "
         f"averaged over caption-keep {list(opts.select_keep)}, {trainer.step} steps, "
         f"{trainer.elapsed / 60:.1f} min in the loop, stopped by {trainer.stop_reason})")
    for split in ("dev", "test"):
        if split in report:
            echo(f"\n{split} metrics (x100):")
            echo(format_table(report[split], report.get("diagnostics") if split == "test" else None))
    return TrainingOutcome(ckpt, run, report, trainer.step, trainer.best_step, trainer.best,
                           round(trainer.elapsed / 60, 3), trainer.stop_reason)


def _silent(_message: str) -> None:
    """The echo of the processes other than rank 0 (which prints for the job)."""
