"""Train MiMIC (fusion-in-decoder) or the MARVEL-style (early) / UniVL-DR-style (late) baselines.

    python training/train.py --preset small                      # demo corpus, ~3-4 minutes on 2 CPU cores
    python training/train.py --preset small --fusion early       # MARVEL-style baseline
    python training/train.py --preset base --data webqa --data-dir WEBQA --device cuda \
        --text-model T5_ANCE_DIR --vision-model CLIP_VIT_B32_DIR --freeze vision

Writes OUT/ckpt.pt (best dev MRR@10), OUT/last.pt (resume), OUT/metrics.jsonl, OUT/curves.png and
OUT/results.json, and prints the final dev and test metrics at each caption-keep rate.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str] | None = None) -> str:
    """Run training; returns the path of the best checkpoint."""
    from mimic_engine.errors import MimicError
    from mimic_engine.evaluate import format_table
    from mimic_engine.training.loop import Trainer, final_report
    from mimic_engine.training.options import parse_options
    from mimic_engine.training.plots import plot_curves

    opts = parse_options(argv)
    try:
        trainer = Trainer(opts)
        ds = trainer.dataset
        print(f"training {opts.fusion} fusion ({opts.preset}) on {opts.data}: {len(ds.documents)} documents, "
              f"{len(trainer.stream.queries)} training queries, device {trainer.device}, "
              f"caption dropout {trainer.strategy.caption_dropout}, mix-in {trainer.strategy.mixin}", flush=True)
        ckpt = trainer.fit()
        plot_curves(trainer.log_path, os.path.join(opts.out, "curves.png"), f"{opts.preset} / {opts.fusion} fusion")
        report = final_report(ckpt, opts, ds)
    except MimicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    with open(os.path.join(opts.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(f"best checkpoint: {ckpt} (step {trainer.best_step}, dev MRR@10 {trainer.best:.2f} "
          f"averaged over caption-keep {opts.select_keep}, "
          f"{trainer.elapsed / 60:.1f} min in the loop)")
    for split in ("dev", "test"):
        if split in report:
            print(f"\n{split} metrics (x100):")
            print(format_table(report[split], report.get("diagnostics") if split == "test" else None))
    return ckpt


if __name__ == "__main__":
    main(sys.argv[1:])
