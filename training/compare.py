"""MiMIC against the early- and late-fusion baselines, same data, same budget, one table.

    python training/compare.py                       # small preset, demo corpus, 3 runs of ~3 min each
    python training/compare.py --ablations           # + MiMIC without its strategies, early fusion with them
    python training/compare.py --variants early-1000-steps --out runs/compare-extra

Each variant is trained by `training/train.py` with the same preset, data, seed and time budget,
then its best checkpoint is evaluated on the test split at caption-keep rates 1.0 / 0.5 / 0.0
(image documents lose their captions at the given rate; the same documents for every model),
with the modality-collapse diagnostic. Writes OUT/compare.json and OUT/compare.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# short name -> (label, fusion, caption dropout, mix-in, extra train.py flags). The baselines train as
# their papers do: no caption dropout, no mix-in. The ablations separate the architecture from the
# training strategies, and give early fusion as many steps as MiMIC gets in its time budget.
VARIANTS = {
    "mimic": ("MiMIC (decoder + dropout + mix-in)", "decoder", None, None, []),
    "early": ("MARVEL-style (early)", "early", 0.0, 0.0, []),
    "late": ("UniVL-DR-style (late)", "late", 0.0, 0.0, []),
}
ABLATIONS = {
    "decoder-plain": ("decoder, no dropout, no mix-in", "decoder", 0.0, 0.0, []),
    "decoder-dropout": ("decoder + dropout, no mix-in", "decoder", None, 0.0, []),
    "early-strategies": ("early + dropout + mix-in", "early", None, None, []),
    "early-1000-steps": ("early, 1000 steps (no time limit)", "early", 0.0, 0.0,
                         ["--steps", "1000", "--max-minutes", "0", "--patience", "1000"]),
}


def run_variants(args) -> list[dict]:
    from mimic_engine.training.train import main as train

    known = {**VARIANTS, **ABLATIONS}
    names = args.variants.split(",") if args.variants else list(VARIANTS) + (list(ABLATIONS) if args.ablations else [])
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(known)}")
    rows = []
    for key in names:
        name, fusion, dropout, mixin, extra = known[key]
        out = os.path.join(args.out, key)
        argv = ["--preset", args.preset, "--fusion", fusion, "--data", args.data, "--out", out, "--seed", str(args.seed),
                "--no-progress"]
        if args.data_dir:
            argv += ["--data-dir", args.data_dir]
        if args.minutes is not None:
            argv += ["--max-minutes", str(args.minutes)]
        if dropout is not None:
            argv += ["--caption-dropout", str(dropout)]
        if mixin is not None:
            argv += ["--mixin", str(mixin)]
        argv += extra
        print(f"\n=== {name}: python training/train.py {' '.join(argv)}", flush=True)
        train(argv)
        with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
            report = json.load(fh)
        log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
        stopped = next((r for r in log if r.get("event") == "stopped"), {})
        rows.append({"key": key, "name": name, "fusion": fusion, "argv": argv, "report": report,
                     "steps": stopped.get("step"), "best_step": stopped.get("best_step"),
                     "train_minutes": round(max((r.get("elapsed_s") or 0) for r in log) / 60, 2)})
    return rows


def table(rows: list[dict], split: str = "test") -> str:
    """Markdown: per variant and caption-keep rate, MRR@10 / NDCG@10 / R@100 over all queries and
    MRR@10 of the image-seeking queries; then the collapse diagnostic and the training steps."""
    rates = list(rows[0]["report"][split]["results"])
    head = ["variant"]
    for r in rates:
        head += [f"keep {r}: MRR@10 / NDCG@10 / R@100", f"keep {r}: image-query MRR@10"]
    head += ["collapse ratio (caption-removal / image-swap shift)", "alignment gap", "steps (best) / minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = row["report"][split]["results"]
        cells = [row["name"]]
        for r in rates:
            a, im = res[r]["all"], res[r]["image"]
            cells.append(f"{a['MRR@10']:.2f} / {a['NDCG@10']:.2f} / {a['Recall@100']:.2f}")
            cells.append(f"{im['MRR@10']:.2f}" if im and im.get("MRR@10") is not None else "-")
        diag = row["report"].get("diagnostics", {})
        mc, sa = diag.get("modality_collapse", {}), diag.get("semantic_alignment", {})
        cells.append(f"{mc['collapse_ratio']:.2f} ({mc['caption_removal_shift']:.3f} / {mc['image_swap_shift']:.3f})"
                     if mc else "-")
        cells.append(f"{sa['alignment_gap']:.3f}" if sa else "-")
        cells.append(f"{row.get('steps')} ({row.get('best_step')}) / {row.get('train_minutes')}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python training/compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--data", default="demo")
    p.add_argument("--data-dir")
    p.add_argument("--minutes", type=float, default=None, help="training budget per variant (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablations", action="store_true", help=f"also run: {', '.join(ABLATIONS)}")
    p.add_argument("--variants", help=f"comma-separated subset to run, of: {', '.join({**VARIANTS, **ABLATIONS})}")
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = run_variants(args)
    md = table(rows)
    with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=2)
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as fh:
        fh.write(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main(sys.argv[1:])
