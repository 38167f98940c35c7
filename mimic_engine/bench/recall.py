"""The retrieval cost of a faster backend: how much of the baseline's result it keeps, and what it
does to Recall@10 and MRR@10 (computed by `mimic_engine.metrics`, as `mimic-engine eval` does)."""
from __future__ import annotations

import time

import numpy as np

from ..errors import ConfigError
from . import log

TOP_K = 10


def recall_cost(backends: dict, baseline: str, data: str, data_dir: str | None, split: str, max_queries: int,
                batch_size: int = 64) -> dict:
    """Encode the corpus and up to `max_queries` queries with every backend (same collated batches)
    and compare each backend's exact top-10 with the `baseline` backend's.

    -> {"dataset", "split", "n_queries", "n_documents", "per_backend": {name: {"overlap_at_10",
        "recall_at_10", "mrr_at_10", "delta_recall_at_10", "delta_mrr_at_10", "encode_s"}}}, all x100.
    overlap_at_10 = mean |top10 ∩ baseline top10| / 10 (how much of the fp32 result a backend keeps);
    recall_at_10 / mrr_at_10 are against the dataset's relevance judgements.
    """
    from ..data import load_dataset
    from ..metrics import exact_topk, query_metrics, recall_at_k

    dataset = load_dataset(data, data_dir)
    queries = [q for q in dataset.split(split) if q.positives][:max_queries]
    docs = dataset.documents
    if not queries or not docs:
        raise ConfigError(f"--recall: {dataset.name} split {split!r} has {len(queries)} queries with positives and "
                          f"{len(docs)} documents; both must be non-empty")
    pre = backends[baseline].preprocessor
    doc_batches = collated(pre, [d.to_item(dataset.images) for d in docs], batch_size)
    query_batches = collated(pre, [q.to_item(dataset.images) for q in queries], batch_size)
    log(f"recall: {len(docs)} documents, {len(queries)} {split} queries, {len(backends)} backends")

    tops, per = {}, {}
    for name, backend in backends.items():
        t0 = time.perf_counter()
        d_vecs = encode_collated(backend, doc_batches, len(docs), "document")
        q_vecs = encode_collated(backend, query_batches, len(queries), "query")
        _, tops[name] = exact_topk(q_vecs, d_vecs, k=TOP_K)  # (Q, 10) document rows
        per[name] = {"encode_s": round(time.perf_counter() - t0, 2)}
    ref = tops[baseline]
    for name in backends:
        top = tops[name]
        overlap = np.mean([len(set(top[i]) & set(ref[i])) / ref.shape[1] for i in range(len(queries))])
        rankings = [[docs[j].id for j in top[i]] for i in range(len(queries))]
        recall = [recall_at_k(ranked, q.positives, TOP_K) for ranked, q in zip(rankings, queries)]
        mrr = [query_metrics(ranked, q.positives)["MRR@10"] for ranked, q in zip(rankings, queries)]
        per[name].update(overlap_at_10=100 * float(overlap), recall_at_10=100 * float(np.mean(recall)),
                         mrr_at_10=100 * float(np.mean(mrr)))
    for name in backends:
        per[name]["delta_recall_at_10"] = per[name]["recall_at_10"] - per[baseline]["recall_at_10"]
        per[name]["delta_mrr_at_10"] = per[name]["mrr_at_10"] - per[baseline]["mrr_at_10"]
    return {"dataset": dataset.name, "split": split, "n_queries": len(queries), "n_documents": len(docs),
            "per_backend": per}


def collated(preprocessor, items: list, batch_size: int) -> list:
    """Length-sorted batches as Backend.encode makes them -> [(row indices, EncoderBatch)]."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i].images), len(items[i].text or "")))
    return [(idx, preprocessor.collate([items[i] for i in idx]))
            for idx in (order[s : s + batch_size] for s in range(0, len(order), batch_size))]


def encode_collated(backend, batches: list, n: int, role: str) -> np.ndarray:
    """The (n, E) vectors of `collated` batches, in the items' original order."""
    out = np.zeros((n, backend.dim), dtype=np.float32)
    for idx, batch in batches:
        out[idx] = backend.encode_batch(batch, role)
    return out
