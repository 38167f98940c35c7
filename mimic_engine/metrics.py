"""Retrieval metrics as the seed systems (MARVEL, UniVL-DR) compute them, and exact top-k search.

Inputs:
- a run: `{qid: [(doc_id, score), ...]}` (ranked by score, highest first; equal scores keep list
  order) or `{qid: [doc_id, ...]}` (already ranked, best first). A doc id repeated in one ranking
  counts once, at its best rank (as UniVL-DR's `seen_pid` check).
- qrels: `{qid: {doc_id: relevance}}`; relevance > 0 is relevant (binary, as the WebQA qrels).

Per query (rank r counts from 1; `rel` = the query's relevant docs; `top_k` = the first k ranked):
- MRR@10     = 1 / r of the first relevant doc with r <= 10, else 0 (MS MARCO's script).
- NDCG@10    = DCG@10 / IDCG@10 with binary gains, DCG@10 = sum over relevant docs at r <= 10 of
               1 / log2(r + 1), IDCG@10 = sum_{r=1}^{min(|rel|, 10)} 1 / log2(r + 1) (trec_eval's ndcg_cut_10).
- Recall@k   = |rel ∩ top_k| / |rel|, for k = 20 and 100 (trec_eval's recall_k).

Averages are over ALL evaluated queries: every query of the qrels with at least one relevant doc.
A query missing from the run scores 0 on every metric (MS MARCO's script divides MRR by the number
of qrels queries the same way). Queries with no relevant doc cannot be scored and are left out.
Values here are fractions in [0, 1] at full precision; x100 and rounding happen where results are
shown (`evaluate.format_table`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .errors import InputError

METRICS = ("MRR@10", "NDCG@10", "Recall@20", "Recall@100")

Ranking = Sequence  # [doc_id, ...] or [(doc_id, score), ...]


def ranked_ids(ranking: Ranking) -> list[str]:
    """A ranking in either form -> doc ids best first, duplicates removed (first occurrence wins)."""
    if len(ranking) and isinstance(ranking[0], (tuple, list)):
        # stable sort: equal scores keep the order they were given in
        ids = [d for d, _ in sorted(ranking, key=lambda pair: -float(pair[1]))]
    else:
        ids = list(ranking)
    seen: set = set()
    return [d for d in ids if not (d in seen or seen.add(d))]


def _relevant_set(relevant: Mapping[str, float] | set) -> set:
    rel = {d for d, r in relevant.items() if r > 0} if isinstance(relevant, Mapping) else set(relevant)
    if not rel:
        raise InputError("query metrics need at least one relevant document; queries without one cannot be scored")
    return rel


def recall_at_k(ranking: Ranking, relevant: Mapping[str, float] | set, k: int) -> float:
    """Recall@k of one query: |rel ∩ top_k| / |rel| (a fraction). `relevant` as in `query_metrics`."""
    rel = _relevant_set(relevant)
    return len(rel.intersection(ranked_ids(ranking)[:k])) / len(rel)


def query_metrics(ranking: Ranking, relevant: Mapping[str, float] | set) -> dict[str, float]:
    """Metrics of one query (fractions). `relevant` must hold at least one relevant doc."""
    rel = _relevant_set(relevant)
    ids = ranked_ids(ranking)
    hits = np.array([d in rel for d in ids[:100]], dtype=bool)  # (<=100,) relevance of each rank
    first = np.flatnonzero(hits[:10])
    discounts = 1.0 / np.log2(np.arange(2, 12))  # 1 / log2(r + 1) for r = 1..10
    dcg = float(discounts[: len(hits[:10])][hits[:10]].sum())
    idcg = float(discounts[: min(len(rel), 10)].sum())
    return {
        "MRR@10": 1.0 / (first[0] + 1) if len(first) else 0.0,
        "NDCG@10": dcg / idcg,
        "Recall@20": recall_at_k(ids, rel, 20),
        "Recall@100": recall_at_k(ids, rel, 100),
    }


def per_query_metrics(run: Mapping[str, Ranking], qrels: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{qid: {metric: fraction}} for every evaluated query (qrels queries with a relevant doc)."""
    out = {}
    for qid, judged in qrels.items():
        if not any(r > 0 for r in judged.values()):
            continue
        out[qid] = query_metrics(run.get(qid, []), judged)
    return out


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Average of `per_query_metrics` output; an empty set of queries gives NaN for every metric."""
    if not per_query:
        return {m: float("nan") for m in METRICS}
    return {m: float(np.mean([v[m] for v in per_query.values()])) for m in METRICS}


def compute_metrics(run: Mapping[str, Ranking], qrels: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{metric: fraction} averaged over all evaluated queries (see the module docstring)."""
    return mean_metrics(per_query_metrics(run, qrels))


def exact_topk(query_vecs: np.ndarray, doc_vecs: np.ndarray, k: int = 100,
               max_scores: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (Q, E) x (N, E) -> scores (Q, k') float32, indices (Q, k') int64,
    best first, k' = min(k, N).

    Queries are scored in chunks of at most `max_scores` scores (64 MiB of float32 by default; at
    least one query per chunk), so memory stays bounded for million-document corpora. Within a
    chunk, `argpartition` finds the k best per row in O(N); equal scores are ordered by document
    index (lower first), including at the k-th place, so the result is deterministic.
    """
    q = np.asarray(query_vecs, dtype=np.float32)
    d = np.asarray(doc_vecs, dtype=np.float32)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise InputError(f"exact_topk needs (Q, E) queries and (N, E) documents with the same E; "
                         f"got {q.shape} and {d.shape}")
    if k < 1:
        raise InputError(f"exact_topk: k={k} must be >= 1")
    n_q, n_d = q.shape[0], d.shape[0]
    k = min(k, n_d)
    top_scores = np.zeros((n_q, k), dtype=np.float32)
    top_idx = np.zeros((n_q, k), dtype=np.int64)
    if k == 0 or n_q == 0:
        return top_scores, top_idx
    rows_per_chunk = max(1, max_scores // max(n_d, 1))
    for start in range(0, n_q, rows_per_chunk):
        scores = q[start : start + rows_per_chunk] @ d.T  # (C, N)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n_d else np.tile(np.arange(n_d), (len(scores), 1))
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1)  # (C,) the k-th best score
        for row in range(len(scores)):
            # every doc scoring >= the k-th best; more than k only when there are ties at the boundary
            cand = part[row] if k == n_d else np.flatnonzero(scores[row] >= kth[row])
            order = np.lexsort((cand, -scores[row, cand]))[:k]  # by score desc, then doc index asc
            top_idx[start + row] = cand[order]
            top_scores[start + row] = scores[row, cand[order]]
    return top_scores, top_idx
