"""Persistent vector index behind one interface (`VectorIndex`, base.py), two backends: an SQLite
document store (the truth) + an hnswlib graph (a cache) in a folder (`DocumentIndex`, the default),
or a Milvus collection (`MilvusIndex`: Milvus Lite in-process, or a Milvus server by URI).

    from mimic_engine.index import StoredDocument, open_index
    with open_index("my-index", dim=encoder.dim, model_id=encoder.model_id) as index:   # or "milvus:./x.db"
        index.upsert([StoredDocument("d1", "text", text="...")], vectors)   # acknowledged on return
        hits = index.search(query_vector, k=10, modality="image")          # [(doc, score)]

Importing this package imports numpy and sqlite3 only; hnswlib / pymilvus load when an index opens.
"""
from .build import build_index, stored_document
from .base import IndexClosedError, VectorIndex
from .document_index import DocumentIndex, RWLock, describe
from .selection import describe_index, open_index
from .store import MODALITIES, DocumentStore, IndexMismatchError, StorageFullError, StoreDamagedError, StoredDocument

__all__ = ["DocumentIndex", "DocumentStore", "IndexClosedError", "IndexMismatchError", "MODALITIES", "RWLock",
           "StorageFullError", "StoreDamagedError", "StoredDocument", "VectorIndex", "build_index", "describe",
           "describe_index", "open_index", "stored_document"]
