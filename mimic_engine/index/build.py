"""Bulk ingestion of a dataset into an index (`mimic-engine index build` and the demo index use it).

Bulk building skips HTTP entirely: documents are encoded in batches and written in large upsert
transactions (one SQLite commit and one hnswlib add_items per `chunk` documents). It is
resumable: documents already in the index (same model: the index refuses another one) are
skipped, so an interrupted build continues where its last committed chunk ended. Image documents
get a thumbnail of their first image (index/thumbnails.py) unless `thumbnails=False`.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .store import IndexMismatchError, StoredDocument
from .thumbnails import make_thumbnail


def stored_document(doc, source: str, keep_caption: bool) -> StoredDocument:
    """A dataset `Document` as the index stores it. An image's caption is stored only when it was
    encoded (at caption-keep < 1 some are dropped, and the index must show what it indexed)."""
    meta = dict(doc.metadata)
    if doc.title:
        meta["title"] = doc.title
    if doc.modality == "text":
        return StoredDocument(doc.id, "text", text=doc.text, metadata=meta)
    if len(doc.image_ids) > 1:
        meta["image_refs"] = [f"dataset:{source}:{i}" for i in doc.image_ids]
    if not keep_caption and doc.text:
        meta["caption_dropped"] = True
    image_ref = f"dataset:{source}:{doc.image_ids[0]}" if doc.image_ids else None
    return StoredDocument(doc.id, "image", caption=doc.text if keep_caption else None, image_ref=image_ref, metadata=meta)


def build_index(encoder, dataset, index, batch_size: int = 64, progress: bool = True, caption_keep: float = 1.0,
                chunk: int = 1024, source: str | None = None, seed: int = 0, thumbnails: bool = True) -> int:
    """Encode every document of `dataset` (a RetrievalDataset) that `index` does not hold yet and upsert it.

    encoder: anything with .encode(items, role, batch_size) -> (N, dim) and .model_id / .dim
    (MimicEncoder); an index recorded under one of its `legacy_model_ids` is its own too. Documents are written `chunk` at a time (one transaction each); an image
    document's caption is kept with probability `caption_keep` (deterministic per id, see
    data.types.caption_kept). An image document stores a thumbnail of its first image unless
    `thumbnails` is False. -> the number of documents added.
    """
    from tqdm import tqdm

    from ..data.types import caption_kept
    from ..preprocess import load_image

    own_ids = (encoder.model_id, *getattr(encoder, "legacy_model_ids", ()))
    if index.model_id not in own_ids or encoder.dim != index.dim:
        raise IndexMismatchError(f"the encoder is model {encoder.model_id!r} (dim {encoder.dim}) but index {index.path} "
                                 f"is for {index.model_id!r} (dim {index.dim}); open the index with the encoder's model_id")
    if not 0.0 <= caption_keep <= 1.0:
        raise InputError(f"caption_keep={caption_keep}: must be in [0, 1] (1.0 keeps every caption)")
    source = source or dataset.name
    docs = dataset.documents
    added = 0
    with tqdm(total=len(docs), disable=not progress, unit="doc", desc=f"indexing {dataset.name}", smoothing=0.05) as bar:
        for start in range(0, len(docs), chunk):
            part = docs[start : start + chunk]
            have = index.existing_ids([d.id for d in part])
            todo = [d for d in part if d.id not in have]
            bar.update(len(part) - len(todo))
            if not todo:
                continue
            keep = [caption_kept(d.id, caption_keep, seed) for d in todo]
            vectors, stored = [], []
            for b in range(0, len(todo), batch_size):  # encode in steps so the bar moves per batch
                items = [d.to_item(dataset.images, k) for d, k in zip(todo[b : b + batch_size], keep[b : b + batch_size])]
                vectors.append(encoder.encode(items, role="document", batch_size=batch_size))
                for d, k, item in zip(todo[b : b + batch_size], keep[b : b + batch_size], items):
                    doc = stored_document(d, source, k)
                    if thumbnails and item.images:
                        doc.thumbnail = make_thumbnail(load_image(item.images[0], f"{d.id}.images[0]"))
                    stored.append(doc)
                bar.update(len(items))
            index.upsert(stored, np.concatenate(vectors))
            added += len(todo)
    return added
