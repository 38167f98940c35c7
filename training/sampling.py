"""Training batches: in-batch candidates, random caption dropout, single-modality mix-in, hard negatives.

One step samples `B` training queries. Each query contributes one *row* (the query) whose target is
one of its positives (a *candidate*). The candidates of all rows are every row's negatives.

Random caption dropout (MiMIC): each image document that has a caption loses it with probability
`p` (positives and hard negatives alike), so the model has to find the answer in the pixels. With
`caption_dropout_queries`, an image query (image + text, e.g. EVQA) loses its text with the same p.

Single-modality mix-in (MiMIC), exact formulation used here: for every positive that is still
multimodal after dropout (image + caption), add `n = floor(r) + Bernoulli(r - floor(r))` unimodal
views of it, alternating image-only / caption-only starting from a random one. Each view is a new
candidate and a new row `(same query -> that view)`, so image-only and caption-only versions of a
document are both pulled to the query and hence towards each other. `r` is `mixin` (1.0: one view
per multimodal positive).

`p`, `caption_dropout_queries` and `r` are the model's `config.strategy` (mimic_engine.config.TrainingStrategy,
where their defaults live), so a checkpoint says how it was trained.

Hard negatives (MARVEL/UniVL-DR "modality-balanced"): 1 image + 1 text document per query, drawn
from the query's mined list (`all_negFacts`), added as extra candidates.

Candidates that are positives of a row but not its target (the other views of the same document, or
another query's positive that also answers this one) are masked out of that row's softmax, so
in-batch false negatives are never pushed away.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from mimic_engine.config import TrainingStrategy
from mimic_engine.data.types import Document, Query, RetrievalDataset
from mimic_engine.preprocess import Item


@dataclass
class TrainingBatch:
    query_items: list  # R items (rows) of this process's share
    candidate_items: list  # the candidates of this process's share
    targets: list  # R ints: the candidate index of each row's positive, among the whole batch's candidates
    ignore: np.ndarray  # (R, C) bool over the whole batch's C candidates: positives of the row other than its target
    stats: dict = field(default_factory=dict)  # of the whole batch
    total_rows: int = 0  # rows of the whole batch (R when the share is the whole batch)


def _doc_item(doc: Document, dataset: RetrievalDataset, keep_caption: bool) -> Item:
    return doc.to_item(dataset.images, keep_caption=keep_caption)


def _is_multimodal(doc: Document, keep_caption: bool) -> bool:
    return doc.modality == "image" and bool(doc.image_ids) and keep_caption and bool(doc.text and doc.text.strip())


def make_batch(queries: list[Query], dataset: RetrievalDataset, rng: random.Random, s: TrainingStrategy,
               hard_negatives: dict[str, list[str]] | None = None, share: range | None = None) -> TrainingBatch:
    """One step's batch. `s` is the model's `config.strategy`; `hard_negatives` (query id -> mined
    document ids, see `load_hard_negatives`) adds the modality-balanced negatives, None = none.

    `share` (data-parallel training): the positions in `queries` whose rows and candidates this
    process encodes; None = all of them. Every process draws the coins of the whole batch, in the
    same order, so they depend on the seed, the step and the row, never on how many processes
    share the batch; items are built (images read) for the share only. The share's candidates are
    a contiguous block of the whole batch's, so the processes' blocks in rank order are the
    candidates one process would have, and `targets` / `ignore` index those."""
    rows_positives: list[set] = []  # per row of the whole batch: its query's positives
    row_in_share: list[bool] = []
    all_targets: list[int] = []
    query_items, cand_items, cand_doc_ids = [], [], []
    stats = {"captions_dropped": 0, "captions_seen": 0, "mixin_views": 0, "hard_negatives": 0, "query_text_dropped": 0}

    def add_candidate(doc: Document, keep_caption: bool, mine: bool, view: str | None = None) -> int:
        if mine:
            if view == "image":
                item = Item(images=[dataset.images.get(i) for i in doc.image_ids], name=doc.id)
            elif view == "caption":
                item = Item(text=doc.text, name=doc.id)
            else:
                item = _doc_item(doc, dataset, keep_caption)
            cand_items.append(item)
        cand_doc_ids.append(doc.id)
        return len(cand_doc_ids) - 1

    def add_row(query: Query, item: Item | None, target: int) -> None:
        rows_positives.append(set(query.positives))
        row_in_share.append(item is not None)
        if item is not None:
            query_items.append(item)
        all_targets.append(target)

    def keep_caption_of(doc: Document) -> bool:
        if doc.modality != "image" or not (doc.text and doc.text.strip()):
            return True
        stats["captions_seen"] += 1
        dropped = rng.random() < s.caption_dropout
        stats["captions_dropped"] += int(dropped)
        return not dropped

    for n, q in enumerate(queries):
        positives = [d for d in q.positives if dataset.has_doc(d)]
        if not positives:
            continue
        mine = share is None or n in share
        has_text = bool(q.text and q.text.strip())
        drop_text = bool(s.caption_dropout_queries and q.image_ids and has_text and rng.random() < s.caption_dropout)
        q_item = None
        if mine:
            q_item = Item(images=[dataset.images.get(i) for i in q.image_ids], name=q.id) if drop_text \
                else q.to_item(dataset.images)
        stats["query_text_dropped"] += int(drop_text)
        pos = dataset.doc(rng.choice(positives))
        keep = keep_caption_of(pos)
        add_row(q, q_item, add_candidate(pos, keep, mine))
        if _is_multimodal(pos, keep) and s.mixin > 0:
            n_views = math.floor(s.mixin) + int(rng.random() < s.mixin - math.floor(s.mixin))
            first = rng.choice(["image", "caption"])
            for k in range(n_views):
                view = first if k % 2 == 0 else ("caption" if first == "image" else "image")
                add_row(q, q_item, add_candidate(pos, True, mine, view))
                stats["mixin_views"] += 1
        if hard_negatives:
            mined = [d for d in hard_negatives.get(q.id, q.hard_negatives) if d not in set(q.positives) and dataset.has_doc(d)]
            for modality in ("image", "text"):
                pool = [d for d in mined if dataset.doc(d).modality == modality]
                if pool:
                    neg = dataset.doc(rng.choice(pool[:100]))
                    add_candidate(neg, keep_caption_of(neg), mine)
                    stats["hard_negatives"] += 1

    rows = [r for r, inside in enumerate(row_in_share) if inside]
    ignore = np.zeros((len(rows), len(cand_doc_ids)), dtype=bool)
    for i, r in enumerate(rows):
        for c, doc_id in enumerate(cand_doc_ids):
            if c != all_targets[r] and doc_id in rows_positives[r]:
                ignore[i, c] = True
    return TrainingBatch(query_items, cand_items, [all_targets[r] for r in rows], ignore, stats, len(all_targets))


class QueryStream:
    """Endless shuffled passes over the training queries (a new order each epoch, seeded)."""

    def __init__(self, queries: list[Query], rng: random.Random):
        self.queries = [q for q in queries if q.positives]
        self.rng = rng
        self.order: list[int] = []
        self.epoch = 0

    def take(self, n: int) -> list[Query]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.queries)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            out.append(self.queries[self.order.pop()])
        return out

    def state(self) -> dict:
        return {"order": list(self.order), "epoch": self.epoch}

    def load_state(self, state: dict) -> None:
        self.order, self.epoch = list(state["order"]), int(state["epoch"])
