"""Bulk ingestion of a dataset into an index (`mimic-engine index build` and the demo index use it).

Bulk building skips HTTP entirely: documents are encoded in batches and written in large upsert
transactions (one SQLite commit and one hnswlib add_items per `chunk` documents). It is
resumable: documents already in the index (same model: the index refuses another one) are
skipped, so an interrupted build continues where its last committed chunk ended. Image documents
get a thumbnail of their first image (index/thumbnails.py) unless `thumbnails=False`.

Sharded under torchrun (mimic_engine/distributed.py): rank 0 alone holds the index; per round it
finds the round's documents not stored yet (`chunk` per process), every process encodes its
contiguous share of them, and rank 0 writes the round in one upsert. A process that dies fails the
run with a DistributedError on the others; what was upserted stays (acknowledged = stored), so the
same command resumes.
"""
from __future__ import annotations

import numpy as np

from .. import distributed
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
    Under torchrun every process calls this with the same dataset and `index` is rank 0's (None on
    the others): the processes share the encoding (see the module doc).

    encoder: anything with .encode(items, role, batch_size) -> (N, dim) and .model_id / .dim
    (MimicEncoder); an index recorded under one of its `legacy_model_ids` is its own too. Documents are written `chunk` at a time (`chunk` per process under torchrun; one transaction each); an image
    document's caption is kept with probability `caption_keep` (deterministic per id, see
    data.types.caption_kept). An image document stores a thumbnail of its first image unless
    `thumbnails` is False. -> the number of documents added.
    """
    own_ids = (encoder.model_id, *getattr(encoder, "legacy_model_ids", ()))
    if distributed.is_main() and (index.model_id not in own_ids or encoder.dim != index.dim):
        raise IndexMismatchError(f"the encoder is model {encoder.model_id!r} (dim {encoder.dim}) but index {index.path} "
                                 f"is for {index.model_id!r} (dim {index.dim}); open the index with the encoder's model_id")
    if not 0.0 <= caption_keep <= 1.0:
        raise InputError(f"caption_keep={caption_keep}: must be in [0, 1] (1.0 keeps every caption)")
    source = source or dataset.name
    try:
        return _build_rounds(encoder, dataset, index, batch_size, progress, caption_keep, chunk, source, seed,
                             thumbnails)
    except distributed.DistributedError as exc:
        if index is None:
            raise
        raise distributed.DistributedError(f"{exc}. The index holds the {index.count()} documents stored before; run "
                                           f"the same command again to resume (stored documents are skipped)") from exc


def _stored(doc, dataset, source: str, keep_caption: bool, thumbnails: bool):
    """The StoredDocument of a dataset document, with a thumbnail of its first image when asked."""
    from ..preprocess import load_image

    stored = stored_document(doc, source, keep_caption)
    if thumbnails and doc.image_ids:
        stored.thumbnail = make_thumbnail(load_image(dataset.images.get(doc.image_ids[0]), f"{doc.id}.images[0]"))
    return stored


def _build_rounds(encoder, dataset, index, batch_size, progress, caption_keep, chunk, source, seed, thumbnails) -> int:
    from tqdm import tqdm

    from ..data.types import caption_kept

    world, main = distributed.world_size(), distributed.is_main()
    docs = dataset.documents
    added = 0
    with tqdm(total=len(docs), disable=not progress or not main, unit="doc", desc=f"indexing {dataset.name}",
              smoothing=0.05) as bar:
        for start in range(0, len(docs), chunk * world):  # a round: up to `chunk` documents per process
            part = docs[start : start + chunk * world]
            if main:
                have = index.existing_ids([d.id for d in part])
                todo_at = [i for i, d in enumerate(part) if d.id not in have]
            todo = [part[i] for i in distributed.broadcast_object(todo_at if main else None)]
            bar.update(len(part) - len(todo))
            if not todo:
                continue
            keep = [caption_kept(d.id, caption_keep, seed) for d in todo]
            mine = distributed.shard_range(len(todo))  # all of them in one process
            vectors = []
            for b in range(mine.start, mine.stop, batch_size):  # encode in steps so the bar moves per batch
                hi = min(b + batch_size, mine.stop)
                items = [d.to_item(dataset.images, k) for d, k in zip(todo[b:hi], keep[b:hi])]
                vectors.append(encoder.encode(items, role="document", batch_size=batch_size))
                if world == 1:
                    bar.update(len(items))
            if world > 1:  # rank 0 gets the round's vectors in order, the others None
                vectors = [distributed.gather_rows(np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32))]
                bar.update(len(todo))
            if main:
                index.upsert([_stored(d, dataset, source, k, thumbnails) for d, k in zip(todo, keep)],
                             np.concatenate(vectors))
            added += len(todo)
    return added
