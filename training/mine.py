"""Mine hard negatives with a trained model (the `mine` step).

    python training/mine.py --model runs/mimic/ckpt.pt --data demo --out runs/mimic/train_mined.json
    python training/train.py --hard-negatives runs/mimic/train_mined.json ...

For each training query: retrieve the top `--top` documents (exact inner product, captions kept)
and keep those that are not positives, in rank order. Written as WebQA query lines
(`qid`, `Q`, `img_posFacts`, `txt_posFacts`, `all_negFacts`), the format of the released mined
`train_all.json`; training then draws 1 image + 1 text negative per query from `all_negFacts`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def mine(encoder, dataset, split: str = "train", top: int = 100, batch_size: int = 128) -> list[dict]:
    from mimic_engine.metrics import exact_topk

    docs = dataset.documents
    doc_vecs = encoder.encode([d.to_item(dataset.images) for d in docs], role="document", batch_size=batch_size)
    queries = [q for q in dataset.split(split) if q.positives]
    q_vecs = encoder.encode([q.to_item(dataset.images) for q in queries], role="query", batch_size=batch_size)
    _, idx = exact_topk(q_vecs, doc_vecs, k=min(top, len(docs)))  # (Q, top)
    rows = []
    for q, ranked in zip(queries, idx):
        positives = set(q.positives)
        kinds = {d: dataset.doc(d).modality for d in q.positives if dataset.has_doc(d)}
        rows.append({
            "qid": q.id, "Q": q.text or "",
            "img_posFacts": [d for d, m in kinds.items() if m == "image"],
            "txt_posFacts": [d for d, m in kinds.items() if m == "text"],
            "all_negFacts": [docs[i].id for i in ranked if docs[i].id not in positives],
        })
    return rows


def main(argv: list[str] | None = None) -> str:
    from mimic_engine.data import load_dataset
    from mimic_engine.encoder import MimicEncoder
    from mimic_engine.errors import MimicError

    p = argparse.ArgumentParser(prog="python training/mine.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ckpt.pt of the model that mines")
    p.add_argument("--data", default="demo", choices=["demo", "webqa", "evqa", "jsonl"])
    p.add_argument("--data-dir")
    p.add_argument("--split", default="train")
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        encoder = MimicEncoder.from_checkpoint(args.model, args.device)
        rows = mine(encoder, load_dataset(args.data, args.data_dir), args.split, args.top)
    except MimicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(args.out + ".tmp", args.out)
    print(f"mined {len(rows)} {args.split} queries -> {args.out}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
