"""The one index interface the server, `search` and `index build|info` use, and the checks every backend shares.

Two implementations: `DocumentIndex` (document_index.py, an hnswlib + SQLite folder, the default) and
`MilvusIndex` (milvus.py, Milvus Lite in-process or a Milvus server). `open_index` (selection.py)
picks one from an `--index` value.

Semantics every backend keeps: vectors are L2-normalised on the way in and scored by inner product
(the cosine the model was trained with); `search(..., modality=m)` returns the best k documents *of
modality m*; an acknowledged `upsert` / `delete` is visible to the next search; an index built by
another model is refused with `IndexMismatchError`; bad input raises `InputError`; any call after
`close()` raises `IndexClosedError`. What survives a crash is backend-specific (docs/index.md).
"""
from __future__ import annotations

import abc

import numpy as np

from ..errors import InputError, MimicError
from .store import MODALITIES, IndexMismatchError, StoredDocument, validate_documents


class IndexClosedError(MimicError):
    """The index was closed (the server is shutting down)."""


class VectorIndex(abc.ABC):
    """A persistent index of text and image documents with cosine search (see the module doc).

    Attributes every backend sets: `path` (where the index lives, as `--index` names it; never a
    secret), `dim`, `model_id` (the id it was built with, which may be a legacy id of the model).
    """

    path: str
    dim: int
    model_id: str

    @abc.abstractmethod
    def upsert(self, docs: list[StoredDocument], vectors: np.ndarray) -> int:
        """Insert or replace documents by id; vectors (N, dim). -> N once acknowledged."""

    @abc.abstractmethod
    def delete(self, doc_id: str) -> bool:
        """Remove a document; False if it was not stored."""

    @abc.abstractmethod
    def get(self, doc_id: str) -> StoredDocument | None:
        ...

    @abc.abstractmethod
    def get_vector(self, doc_id: str) -> np.ndarray | None:
        """-> (dim,) float32 unit vector as stored, or None."""

    def thumbnail(self, doc_id: str) -> bytes | None:
        """The document's thumbnail (WebP or JPEG bytes) for the search page, or None: no such document,
        none stored, or a backend that keeps no thumbnails (Milvus today)."""
        return None

    @abc.abstractmethod
    def existing_ids(self, ids: list[str]) -> set[str]:
        """The subset of `ids` that is stored (resumable bulk builds skip these)."""

    @abc.abstractmethod
    def count(self, modality: str | None = None) -> int:
        ...

    def search(self, vector: np.ndarray, k: int, modality: str | None = None) -> list[tuple[StoredDocument, float]]:
        """Top-k documents by cosine similarity to `vector` (dim,), best first, as (document, score)."""
        vector = np.asarray(vector)
        if vector.ndim != 1:
            raise InputError(f"search takes one vector of shape ({self.dim},), got shape {vector.shape}; use search_batch for several")
        return self.search_batch(vector[None], k, modality)[0]

    @abc.abstractmethod
    def search_batch(self, vectors: np.ndarray, k: int, modality: str | None = None) -> list[list[tuple[StoredDocument, float]]]:
        """Per row of vectors (Q, dim): top-k (document, score), best first; fewer when fewer are stored."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """JSON-able: at least backend, path, model_id, dim, count, count_by_modality, params."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Persist what the backend defers (a graph snapshot, a Milvus segment); writes are durable without it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def unit_rows(vectors, dim: int, what: str) -> np.ndarray:
    """-> (N, dim) float32 L2-normalised rows; InputError for wrong shape, empty, NaN/inf or zero rows."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] == 0:
        raise InputError(f"{what}: expected shape (N, {dim}) (or ({dim},) for one vector) with N >= 1, "
                         f"got {tuple(np.shape(vectors))}; vectors must come from the model this index was built with")
    if not np.isfinite(arr).all():
        raise InputError(f"{what}: vector contains NaN or infinity")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError(f"{what}: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is the zero vector, which has no direction")
    return arr / norms


def checked_upsert(docs: list[StoredDocument], vectors, dim: int) -> np.ndarray:
    """The argument checks of every backend's upsert: -> (N, dim) unit rows, one per document;
    InputError for a vector count that differs from the documents' or an invalid document."""
    vecs = unit_rows(vectors, dim, "upsert vectors")
    if len(vecs) != len(docs):
        raise InputError(f"upsert got {len(docs)} documents but {len(vecs)} vectors; send one vector per document")
    validate_documents(docs)
    return vecs


def check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InputError(f"k={k!r}: the number of results must be a positive integer")


def check_modality(modality) -> None:
    if modality is not None and modality not in MODALITIES:
        raise InputError(f"modality={modality!r}; expected one of {', '.join(MODALITIES)} or None (both)")


def check_ef(ef) -> None:
    if isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef < 1:
        raise InputError(f"ef={ef!r}: must be an integer >= 1 (typical 64-512; higher = better recall, slower)")


def model_mismatch(where: str, found_model: str, found_dim, model_id: str, dim: int, fix: str) -> IndexMismatchError:
    """The one refusal of an index built by another model, for every backend; `fix` names the way out."""
    return IndexMismatchError(
        f"{where} holds vectors of model {found_model!r} (dim {found_dim}), but this encoder is model {model_id!r} "
        f"(dim {dim}); vectors of different models cannot be compared. {fix}, and rebuild it ('mimic-engine index build').")
