"""Retrieval evaluation at several caption-keep rates, and the paper's two pilot-study diagnostics.

    result = evaluate(encoder, dataset, split="dev")          # metrics x100, overall and per modality
    diag = diagnostics(encoder, dataset)                       # modality collapse, misalignment
    print(format_table(result, diag))

`encoder` is anything with `.encode(items, role=..., batch_size=...) -> (N, E) float32` (a
`MimicEncoder` or a runtime `Backend`).

Sharded (`sharded=True` under torchrun, see mimic_engine/distributed.py): every process calls
`evaluate` / `diagnostics` with the same arguments, encodes its share of every chunk of items,
and rank 0 receives the vectors, scores and returns the result; the other processes return None.

Caption-keep protocol ("WebQA+"/"EVQA+": captions removed from some images; the paper does not say
how many, so we report several rates): at rate r, an image document keeps its caption iff
`caption_kept(doc.id, r, seed)` (a deterministic per-document coin, so every model and every run
sees the same caption-less documents). Text documents and queries never change.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

import numpy as np

from . import distributed
from .data.types import Document, RetrievalDataset, caption_kept
from .errors import DataError, InputError
from .metrics import METRICS, exact_topk, mean_metrics, per_query_metrics
from .preprocess import Item

DEFAULT_KEEP_RATES = (1.0, 0.5, 0.0)
MODALITIES = ("image", "text")
KIND_GROUP_PREFIX = "kind:"  # results[rate]["kind:conjunctive"]: the queries of that kind
ENCODE_CHUNK = 1024  # items built (images read) at a time: the image store is never loaded whole


def format_rate(rate: float) -> str:
    """The key of a caption-keep rate in results: 1.0 -> "1.0", 0.5 -> "0.5", 0.25 -> "0.25"."""
    text = f"{float(rate):.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _has_caption(doc: Document) -> bool:
    return doc.modality == "image" and bool(doc.image_ids) and doc.text is not None and doc.text.strip() != ""


def _encode(encoder, sources: Sequence, role: str, batch_size: int, to_item: Callable[..., Item] | None = None,
            sharded: bool = False) -> np.ndarray | None:
    """Encode `to_item(s)` for each of `sources` (the sources themselves when `to_item` is None) ->
    (len(sources), E) float32. Items are built a chunk at a time: the image store is never read whole.
    `sharded` under torchrun: each process encodes its share of every round of chunks (one chunk
    per process), rank 0 gets the vectors in order and the other processes get None."""
    world = distributed.world_size() if sharded else 1
    parts = []
    for start in range(0, len(sources), ENCODE_CHUNK * world):
        round_sources = sources[start : start + ENCODE_CHUNK * world]
        mine = distributed.shard_range(len(round_sources)) if world > 1 else range(len(round_sources))
        items = [s if to_item is None else to_item(s) for s in round_sources[mine.start : mine.stop]]
        vectors = np.asarray(encoder.encode(items, role=role, batch_size=batch_size), dtype=np.float32) if items \
            else np.zeros((0, 0), dtype=np.float32)
        if world > 1 and len(vectors) != len(items):
            raise InputError(f"the encoder returned {len(vectors)} vectors for {len(items)} items")
        parts.append(distributed.gather_rows(vectors) if world > 1 else vectors)
    if world > 1 and not distributed.is_main():
        return None
    out = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    if out.shape[0] != len(sources):
        raise InputError(f"the encoder returned {out.shape[0]} vectors for {len(sources)} items")
    return out


class _Log:
    def __init__(self, enabled: bool):
        self.enabled, self.t0 = enabled, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[eval {time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _check_rates(caption_keep: Sequence[float]) -> list[float]:
    rates = [float(r) for r in caption_keep]
    if not rates or any(not (0.0 <= r <= 1.0) for r in rates):
        raise InputError(f"caption-keep rates must be numbers in [0, 1], got {list(caption_keep)}; e.g. 1.0,0.5,0.0")
    return list(dict.fromkeys(rates))  # unique, in the given order


def evaluate(encoder, dataset: RetrievalDataset, split: str = "dev", caption_keep: Sequence[float] = DEFAULT_KEEP_RATES,
             seed: int = 0, batch_size: int = 64, max_queries: int | None = None, progress: bool = False,
             sharded: bool = False, corpus_memo: dict | None = None) -> dict | None:
    """Retrieve from the whole mixed corpus (exact inner-product top-100) and score the split.
    `sharded`: under torchrun the processes share the encoding; rank 0 returns the result, the others None.
    `corpus_memo`: a dict that keeps the corpus vectors for the next call with the same encoder, rates
    and seed (the splits of a dataset share one corpus: score dev and test with one encoding of it).

    Returns (metrics x100 at full precision; None for a modality with no query):
        {"split", "n_queries", "n_documents", "seed",
         "results": {format_rate(rate): {"all": {metric: float}, "image": {...}, "text": {...},
                                         "kind:<kind>": {...} for each query kind present}},
         "n_queries_by_modality": {"image": int, "text": int},
         "n_queries_by_kind": {"<kind>": int}}
    Groups by positive modality: queries whose positives mix modalities count in "all" and, when
    any exist, in an extra "mixed" group. Groups by kind (`Query.kind`, e.g. the demo's
    "conjunctive", "pixel-only", "caption-only", "text"): one "kind:<kind>" group per kind present,
    in sorted order; queries without a kind count in "all" only; {} / no such group when the data
    records no kinds. Every group maps to the same {metric: float} shape.

    Each document is encoded at most twice whatever the rates: text documents and caption-less
    image documents once; an image document with a caption once with it (if some rate keeps it)
    and once without (if some rate drops it).
    """
    log = _Log(progress and distributed.is_main())
    rates = _check_rates(caption_keep)
    queries = list(dataset.split(split))[: max_queries if max_queries is not None else None]
    queries = [q for q in queries if q.positives]
    if not queries:
        raise DataError(f"{dataset.name}: split {split!r} has no query with a positive to evaluate")
    docs = dataset.documents
    if not docs:
        raise DataError(f"{dataset.name}: the corpus has no documents")

    # ---- documents: encode each needed view once -------------------------------------------------
    captioned = [i for i, d in enumerate(docs) if _has_caption(d)]
    keeps = {i: [caption_kept(docs[i].id, r, seed) for r in rates] for i in captioned}
    full_idx = [i for i in range(len(docs)) if i not in keeps or any(keeps[i])]  # as given (caption kept)
    bare_idx = [i for i in captioned if not all(keeps[i])]  # caption dropped at some rate
    memo_key = (tuple(rates), seed, len(docs))
    if corpus_memo is not None and memo_key in corpus_memo:
        full, bare = corpus_memo[memo_key]
    else:
        log(f"encoding {len(full_idx)} documents as given and {len(bare_idx)} image documents without caption")
        full = _encode(encoder, [docs[i] for i in full_idx], "document", batch_size,
                       lambda d: d.to_item(dataset.images, keep_caption=True), sharded)
        bare = _encode(encoder, [docs[i] for i in bare_idx], "document", batch_size,
                       lambda d: d.to_item(dataset.images, keep_caption=False), sharded)
        if corpus_memo is not None:
            corpus_memo[memo_key] = (full, bare)
    log(f"encoding {len(queries)} {split} queries")
    q_vecs = _encode(encoder, queries, "query", batch_size, lambda q: q.to_item(dataset.images), sharded)
    if q_vecs is None:  # another process of a sharded evaluation: rank 0 scores
        return None
    # row of each document in `full` / `bare` (-1: that view was not needed)
    full_row = np.full(len(docs), -1, dtype=np.int64)
    full_row[full_idx] = np.arange(len(full_idx))
    bare_row = np.full(len(docs), -1, dtype=np.int64)
    bare_row[bare_idx] = np.arange(len(bare_idx))
    dim = full.shape[1] if len(full_idx) else bare.shape[1]

    # ---- queries -------------------------------------------------------------------------------
    qrels = {q.id: {d: 1 for d in q.positives} for q in queries}
    groups: dict[str, list[str]] = {m: [] for m in MODALITIES}
    kinds: dict[str, list[str]] = {}
    for q in queries:
        groups.setdefault(dataset.positive_modality(q), []).append(q.id)
        if q.kind is not None:
            kinds.setdefault(q.kind, []).append(q.id)
    kinds = {k: kinds[k] for k in sorted(kinds)}
    n_by_modality = {name: len(qids) for name, qids in groups.items()}
    groups.update({KIND_GROUP_PREFIX + k: qids for k, qids in kinds.items()})

    # ---- per rate: assemble the corpus matrix, search, score ------------------------------------
    results = {}
    for j, rate in enumerate(rates):
        drop = np.zeros(len(docs), dtype=bool)  # (N,) caption dropped at this rate
        drop[[i for i in captioned if not keeps[i][j]]] = True
        doc_vecs = np.empty((len(docs), dim), dtype=np.float32)  # (N, E)
        if (~drop).any():
            doc_vecs[~drop] = full[full_row[~drop]]
        if drop.any():
            doc_vecs[drop] = bare[bare_row[drop]]
        _, top = exact_topk(q_vecs, doc_vecs, k=100)  # (Q, 100) doc indices
        run = {q.id: [docs[t].id for t in top[n]] for n, q in enumerate(queries)}
        per_query = per_query_metrics(run, qrels)
        rate_result = {"all": _percent(mean_metrics(per_query))}
        for name, qids in groups.items():
            rate_result[name] = _percent(mean_metrics({qid: per_query[qid] for qid in qids})) if qids else \
                {m: None for m in METRICS}
        results[format_rate(rate)] = rate_result
        log(f"caption-keep {format_rate(rate)}: {int(drop.sum())}/{len(captioned)} captions dropped, "
            f"MRR@10 {rate_result['all']['MRR@10']:.2f}")

    return {
        "split": split,
        "n_queries": len(queries),
        "n_documents": len(docs),
        "seed": seed,
        "results": results,
        "n_queries_by_modality": n_by_modality,
        "n_queries_by_kind": {k: len(qids) for k, qids in kinds.items()},
    }


def _percent(metrics: dict) -> dict:
    return {m: 100.0 * v for m, v in metrics.items()}


# ---- diagnostics ------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def diagnostics(encoder, dataset: RetrievalDataset, max_items: int = 500, seed: int = 0, batch_size: int = 64,
                sharded: bool = False) -> dict | None:
    """The paper's pilot-study diagnostics on image documents that have a caption.
    `sharded`: under torchrun the processes share the encoding; rank 0 returns the result, the others None.

    Up to `max_items` such documents are drawn (seeded). For document i with image(s) I_i and
    caption c_i, all encoded as documents and L2-normalised; cos = cosine similarity, dist = 1 - cos:

    (a) visual modality collapse
        full_i    = enc(I_i + c_i)
        bare_i    = enc(I_i)                 caption removed
        swap_i    = enc(I_{s(i)} + c_i)      image replaced by another drawn document's image
                                             (s = a random cyclic shift: never the document itself)
        caption_removal_shift = mean_i dist(full_i, bare_i)
        image_swap_shift      = mean_i dist(full_i, swap_i)
        collapse_ratio        = caption_removal_shift / max(image_swap_shift, 1e-6)
        A model that ignores pixels barely moves when the image is swapped: a high ratio is collapse.
        The swapped-in image is a random document's, so it usually contradicts the caption (a "3"
        under "a seven from Anna's notebook"); a model can react to that contradiction and still
        ignore every pixel the caption does not describe. Hence also:
        same_caption_image_swap_shift = mean over pairs (a, b) of different documents of the
                                 corpus with one and the same caption c (and different image bytes)
                                 of dist(enc(I_a + c), enc(I_b + c)); both images fit the caption.
                                 Zero: the image is ignored when a caption is present (the images
                                 differ only in what the caption does not say, e.g. the demo's ink
                                 colour). Pairs: consecutive documents of each caption's group, up to
                                 max(1, max_items // 2), seeded; `same_caption_pairs` = how many were
                                 measured, and the shift is None when no two images share a caption.

    (b) semantic misalignment, with text_i = enc(c_i) (the caption as a text item) and bare_i:
        matched_cosine   = mean_i cos(text_i, bare_i)
        unmatched_cosine = mean_{i != j} cos(text_i, bare_j)
        alignment_gap    = matched_cosine - unmatched_cosine   (small = related items not closer)
        modality_gap     = || mean_i bare_i - mean_i text_i ||_2  (distance between the centroids of
                           the image-only and the text-only embeddings)

    Returns {"n_items", "seed", "modality_collapse": {...}, "semantic_alignment": {...}}.
    Raises DataError when fewer than 2 image documents have a caption.
    """
    eligible = [d for d in dataset.documents if _has_caption(d)]
    if len(eligible) < 2:
        raise DataError(f"{dataset.name}: diagnostics need at least 2 image documents with a caption, "
                        f"found {len(eligible)}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(eligible), size=min(max_items, len(eligible)), replace=False))
    docs = [eligible[i] for i in pick]
    n = len(docs)
    swap = (np.arange(n) + rng.integers(1, n)) % n  # cyclic shift by 1..n-1: no document keeps its image

    images = dataset.images
    items = {
        "full": [d.to_item(images, keep_caption=True) for d in docs],
        "bare": [d.to_item(images, keep_caption=False) for d in docs],
        "swap": [Item(text=d.text, images=[images.get(i) for i in docs[s].image_ids], name=f"{d.id}+image-of-{docs[s].id}")
                 for d, s in zip(docs, swap)],
        "text": [Item(text=d.text, name=f"{d.id}:caption") for d in docs],
    }
    vec = {k: _encode(encoder, v, "document", batch_size, sharded=sharded) for k, v in items.items()}  # each (n, E)
    same_caption_shift, n_pairs = _same_caption_shift(encoder, eligible, images, rng, max(1, max_items // 2),
                                                      batch_size, sharded)
    if vec["full"] is None:  # another process of a sharded run: rank 0 computes
        return None
    vec = {k: _unit(v) for k, v in vec.items()}

    def dist(a, b):
        return float(np.mean(1.0 - np.sum(vec[a] * vec[b], axis=1)))

    removal, swapped = dist("full", "bare"), dist("full", "swap")
    sims = vec["text"] @ vec["bare"].T  # (n, n): caption i vs image j
    matched = float(np.mean(np.diag(sims)))
    unmatched = float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
    return {
        "n_items": n,
        "seed": seed,
        "modality_collapse": {
            "caption_removal_shift": removal,
            "image_swap_shift": swapped,
            "collapse_ratio": removal / max(swapped, 1e-6),
            "same_caption_image_swap_shift": same_caption_shift,
            "same_caption_pairs": n_pairs,
        },
        "semantic_alignment": {
            "matched_cosine": matched,
            "unmatched_cosine": unmatched,
            "alignment_gap": matched - unmatched,
            "modality_gap": float(np.linalg.norm(vec["bare"].mean(axis=0) - vec["text"].mean(axis=0))),
        },
    }


def _same_caption_shift(encoder, eligible: list[Document], images, rng, max_pairs: int,
                        batch_size: int, sharded: bool = False) -> tuple[float | None, int]:
    """-> (mean dist(enc(I_a + c), enc(I_b + c)) over pairs of documents sharing caption c, or None
    when there is no pair; number of pairs). Documents are encoded as given (their caption is c)."""
    by_caption: dict[str, list[Document]] = {}
    for d in eligible:
        by_caption.setdefault(d.text.strip(), []).append(d)
    pairs = [(a, b) for group in by_caption.values() for a, b in zip(group, group[1:])]
    if len(pairs) > max_pairs:
        pairs = [pairs[i] for i in np.sort(rng.choice(len(pairs), size=max_pairs, replace=False))]
    items = {d.id: d.to_item(images, keep_caption=True) for pair in pairs for d in pair}
    pairs = [(a.id, b.id) for a, b in pairs if items[a.id].images != items[b.id].images]  # same bytes: not two images
    if not pairs:
        return None, 0
    used = list(dict.fromkeys(i for pair in pairs for i in pair))
    vec = _encode(encoder, [items[i] for i in used], "document", batch_size, sharded=sharded)  # (M, E)
    if vec is None:  # another process of a sharded run
        return None, len(pairs)
    vec = _unit(vec)
    row = {i: k for k, i in enumerate(used)}
    a, b = vec[[row[i] for i, _ in pairs]], vec[[row[j] for _, j in pairs]]  # (P, E) each
    return float(np.mean(1.0 - np.sum(a * b, axis=1))), len(pairs)


# ---- presentation -----------------------------------------------------------------------------

def format_table(result: dict, diagnostics: dict | None = None) -> str:
    """Fixed-width table: one row per (caption-keep rate, query group): "all", each positive modality,
    then each query kind ("kind:<kind>"); metrics x100, 2 decimals; then the diagnostics."""
    counts = {**result.get("n_queries_by_modality", {}),
              **{KIND_GROUP_PREFIX + k: n for k, n in result.get("n_queries_by_kind", {}).items()}}
    names = [name for groups in result["results"].values() for name in groups]
    width = max([len("queries of"), *map(len, names)])
    head = f"{'caption-keep':>12}  {'queries of':<{width}} {'queries':>7}" + "".join(f"{m:>11}" for m in METRICS)
    lines = [f"{result['split']} split: {result['n_queries']} queries, {result['n_documents']} documents "
             f"(caption coin seed {result['seed']})", head, "-" * len(head)]
    for rate, groups in result["results"].items():
        for name, metrics in groups.items():
            n = result["n_queries"] if name == "all" else counts.get(name, "")
            cells = "".join(f"{'-' if metrics[m] is None else format(metrics[m], '.2f'):>11}" for m in METRICS)
            lines.append(f"{rate:>12}  {name:<{width}} {n:>7}{cells}")
    if diagnostics:
        mc, sa = diagnostics["modality_collapse"], diagnostics["semantic_alignment"]
        same = mc.get("same_caption_image_swap_shift")
        same_text = (f"{same:.4f} over {mc['same_caption_pairs']} pairs" if same is not None
                     else "n/a (no two captioned images share a caption)")
        lines += [
            "",
            f"diagnostics on {diagnostics['n_items']} captioned image documents (cosine distance = 1 - cos):",
            f"  modality collapse:   caption removal shift {mc['caption_removal_shift']:.4f}, "
            f"image swap shift {mc['image_swap_shift']:.4f} (a random document's image under the caption), "
            f"ratio {mc['collapse_ratio']:.2f} (high = ignores pixels)",
            f"  same-caption image swap shift {same_text} (two documents, one caption, different images; "
            f"0 = the image is ignored when a caption is present)",
            f"  semantic alignment:  caption-image cos matched {sa['matched_cosine']:.4f}, "
            f"unmatched {sa['unmatched_cosine']:.4f}, gap {sa['alignment_gap']:.4f}; "
            f"modality gap {sa['modality_gap']:.4f}",
        ]
    return "\n".join(lines)
