"""Mine hard negatives with a trained model (the `mine` step, `mimic-engine mine`).

For each training query: retrieve the top `top` documents (exact inner product, captions kept)
and keep those that are not positives, in rank order. Written as WebQA query lines
(`qid`, `Q`, `img_posFacts`, `txt_posFacts`, `all_negFacts`), the format of the released mined
`train_all.json`; training then draws 1 image + 1 text negative per query from `all_negFacts`
(`--hard-negatives FILE`, read by `training.loop.load_hard_negatives`).
"""
from __future__ import annotations

import json
import os

DEFAULT_TOP = 100  # documents retrieved per query


def mine(encoder, dataset, split: str = "train", top: int = DEFAULT_TOP, batch_size: int = 128) -> list[dict]:
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


def write_mined(rows: list[dict], path: str) -> str:
    """One JSON line per query, written atomically (a crash leaves no half file behind)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path
