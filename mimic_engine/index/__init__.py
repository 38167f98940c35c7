"""Persistent vector index: an SQLite document store (the truth) + an hnswlib graph (a cache).

    from mimic_engine.index import DocumentIndex, StoredDocument
    with DocumentIndex("my-index", dim=encoder.dim, model_id=encoder.model_id) as index:
        index.upsert([StoredDocument("d1", "text", text="...")], vectors)   # durable on return
        hits = index.search(query_vector, k=10, modality="image")          # [(doc, score)]

Importing this package imports numpy and sqlite3 only; hnswlib loads when an index opens.
"""
from .build import build_index, stored_document
from .document_index import DocumentIndex, RWLock, describe
from .store import MODALITIES, DocumentStore, IndexMismatchError, StorageFullError, StoreDamagedError, StoredDocument

__all__ = ["DocumentIndex", "DocumentStore", "IndexMismatchError", "MODALITIES", "RWLock", "StorageFullError",
           "StoreDamagedError", "StoredDocument", "build_index", "describe", "stored_document"]
