"""The durable half of the index: a SQLite document store (the source of truth).

One file, `docs.sqlite`, in WAL mode. Each document row holds its id, modality, text, caption,
image ref, metadata (JSON) and its embedding (float32 blob), plus its *label*: the store's
sequence number at the moment the row was written. Labels are never reused, so a label names one
immutable (document version, vector) pair, and "what changed since sequence S" is simply:

    rows with label > S                      (added or replaced since S)
    tombstones with seq > S and label <= S   (versions that S knew and that are gone now)

That is what lets the HNSW graph (a cache, see hnsw.py) be replayed forward from any snapshot.
A thumbnail is written, replaced and deleted in the same transaction as its document's row, and
read only by `thumbnail(id)` (never with search results, which stay small).

    docs(id TEXT PRIMARY KEY, label INTEGER UNIQUE, modality, text, caption, image_ref,
         metadata TEXT /* JSON */, embedding BLOB /* dim float32, little-endian */)
    tombstones(label INTEGER PRIMARY KEY, seq INTEGER)   -- a removed version and when it went
    thumbnails(id TEXT PRIMARY KEY, image BLOB)           -- an image document's small preview (WebP/JPEG)
    meta(key TEXT PRIMARY KEY, value TEXT)                -- model_id, dim, M, ..., seq

Durability: a write method returns only after its transaction committed. `synchronous=FULL`
(default) also survives power loss; `NORMAL` survives a killed process (kill -9), the case the
index promises, but an OS crash or power cut may roll back the last commits.

Threads: writes go through one connection and must be serialised by the caller (DocumentIndex
holds its write lock); reads use one connection per thread, so readers run in parallel (WAL).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..errors import InputError, MimicError

STORE_FILE = "docs.sqlite"
MODALITIES = ("text", "image")
FORMAT_VERSION = 1
_SQL_CHUNK = 500  # ids / labels per "IN (...)" query (SQLite's default limit is 32766 variables)


class IndexMismatchError(MimicError):
    """An index folder was built by another model (or for another dimension or format)."""


@dataclass
class StoredDocument:
    id: str
    modality: str  # "text" | "image"
    text: str | None = None
    caption: str | None = None
    image_ref: str | None = None  # where the image came from (path, "dataset:<kind>:<id>", or "inline:<sha256>")
    metadata: dict = field(default_factory=dict)
    # a small preview image (index/thumbnails.py) written with the document; reads leave it None
    # (DocumentStore.thumbnail fetches it), so search results never carry image bytes
    thumbnail: bytes | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"id": self.id, "modality": self.modality, "text": self.text, "caption": self.caption,
                "image_ref": self.image_ref, "metadata": self.metadata}


def validate_documents(docs: list[StoredDocument]) -> None:
    """InputError naming the first bad document (empty id, unknown modality, duplicate id, non-JSON metadata)."""
    seen = set()
    for i, d in enumerate(docs):
        if not isinstance(d.id, str) or not d.id:
            raise InputError(f"docs[{i}].id={d.id!r}: a document id must be a non-empty string")
        if d.modality not in MODALITIES:
            raise InputError(f"document {d.id!r}: modality={d.modality!r}; expected one of {', '.join(MODALITIES)}")
        if d.id in seen:
            raise InputError(f"document id {d.id!r} appears twice in one upsert; send each id once")
        seen.add(d.id)
        if not isinstance(d.metadata, dict):
            raise InputError(f"document {d.id!r}: metadata must be a dict, got {type(d.metadata).__name__}")
        try:
            json.dumps(d.metadata)
        except (TypeError, ValueError) as exc:
            raise InputError(f"document {d.id!r}: metadata is not JSON-serialisable ({exc})") from None


def _chunks(seq: list, n: int = _SQL_CHUNK) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class DocumentStore:
    """SQLite document store with monotonically increasing labels. Not an index: no search here."""

    def __init__(self, folder: str, synchronous: str = "FULL"):
        if synchronous not in ("FULL", "NORMAL"):
            raise InputError(f"synchronous={synchronous!r}; expected 'FULL' (survives power loss) or 'NORMAL' (survives a killed process)")
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, STORE_FILE)
        self.synchronous = synchronous
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._w = self._connect()
        self._w.execute("PRAGMA journal_mode=WAL")
        with self._txn():
            self._w.execute("CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, label INTEGER NOT NULL UNIQUE,"
                            " modality TEXT NOT NULL, text TEXT, caption TEXT, image_ref TEXT,"
                            " metadata TEXT NOT NULL, embedding BLOB NOT NULL)")
            self._w.execute("CREATE TABLE IF NOT EXISTS tombstones (label INTEGER PRIMARY KEY, seq INTEGER NOT NULL)")
            self._w.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._w.execute("CREATE TABLE IF NOT EXISTS thumbnails (id TEXT PRIMARY KEY, image BLOB NOT NULL)")
            self._w.execute("INSERT OR IGNORE INTO meta VALUES ('seq', '0')")

    def _connect(self) -> sqlite3.Connection:
        # autocommit mode (isolation_level=None): every SELECT sees the latest commit; writes use
        # explicit BEGIN IMMEDIATE ... COMMIT. check_same_thread=False so close() may run anywhere.
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        con.execute(f"PRAGMA synchronous={self.synchronous}")
        return con

    @property
    def _r(self) -> sqlite3.Connection:
        """This thread's read connection."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = self._connect()
            with self._readers_lock:
                self._readers.append(con)
        return con

    class _Txn:
        def __init__(self, con):
            self.con = con

        def __enter__(self):
            self.con.execute("BEGIN IMMEDIATE")
            return self.con

        def __exit__(self, exc_type, *_):
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")

    def _txn(self) -> "_Txn":
        return self._Txn(self._w)

    # ---- meta ---------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self._r.execute("SELECT key, value FROM meta")}

    def set_meta(self, values: dict) -> None:
        with self._txn() as con:
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])

    @property
    def seq(self) -> int:
        return int(self._r.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0])

    # ---- writes (caller serialises) -------------------------------------------------------------
    def write(self, docs: list[StoredDocument], vectors: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Insert or replace `docs` with `vectors` (N, dim) float32 in one transaction.

        -> (new labels (N,) int64, labels of the versions they replaced). Durable on return.
        """
        ids = [d.id for d in docs]
        with self._txn() as con:
            old = {}
            for part in _chunks(ids):
                q = f"SELECT id, label FROM docs WHERE id IN ({','.join('?' * len(part))})"
                old.update(con.execute(q, part).fetchall())
            seq = int(con.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0])
            labels = np.arange(seq + 1, seq + 1 + len(docs), dtype=np.int64)
            replaced = [old[i] for i in ids if i in old]
            # a replaced version's tombstone carries the seq of the write that replaced it
            con.executemany("INSERT INTO tombstones VALUES (?, ?)", [(lbl, int(labels[-1])) for lbl in replaced])
            con.executemany(
                "INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(d.id, int(lbl), d.modality, d.text, d.caption, d.image_ref, json.dumps(d.metadata),
                  np.ascontiguousarray(v, dtype="<f4").tobytes()) for d, lbl, v in zip(docs, labels, vectors)])
            # a replaced document keeps no thumbnail of its old version
            con.executemany("DELETE FROM thumbnails WHERE id=?", [(i,) for i in ids if i in old])
            con.executemany("INSERT OR REPLACE INTO thumbnails VALUES (?, ?)",
                            [(d.id, d.thumbnail) for d in docs if d.thumbnail is not None])
            con.execute("UPDATE meta SET value=? WHERE key='seq'", (str(int(labels[-1])),))
        return labels, replaced

    def delete(self, doc_id: str) -> int | None:
        """Remove `doc_id`; -> the label it had, or None if it was not stored. Durable on return."""
        with self._txn() as con:
            row = con.execute("SELECT label FROM docs WHERE id=?", (doc_id,)).fetchone()
            if row is None:
                return None
            seq = int(con.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0]) + 1
            con.execute("DELETE FROM docs WHERE id=?", (doc_id,))
            con.execute("DELETE FROM thumbnails WHERE id=?", (doc_id,))
            con.execute("INSERT INTO tombstones VALUES (?, ?)", (row[0], seq))
            con.execute("UPDATE meta SET value=? WHERE key='seq'", (str(seq),))
        return row[0]

    def prune_tombstones(self, upto_seq: int) -> None:
        """Forget tombstones a durable snapshot at `upto_seq` already reflects."""
        with self._txn() as con:
            con.execute("DELETE FROM tombstones WHERE seq <= ?", (upto_seq,))

    # ---- reads (any thread) ---------------------------------------------------------------------
    @staticmethod
    def _doc(row) -> StoredDocument:
        return StoredDocument(id=row[0], modality=row[1], text=row[2], caption=row[3], image_ref=row[4],
                              metadata=json.loads(row[5]))

    _DOC_COLUMNS = "id, modality, text, caption, image_ref, metadata"

    def get(self, doc_id: str) -> StoredDocument | None:
        row = self._r.execute(f"SELECT {self._DOC_COLUMNS} FROM docs WHERE id=?", (doc_id,)).fetchone()
        return None if row is None else self._doc(row)

    def thumbnail(self, doc_id: str) -> bytes | None:
        row = self._r.execute("SELECT image FROM thumbnails WHERE id=?", (doc_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def get_vector(self, doc_id: str) -> np.ndarray | None:
        row = self._r.execute("SELECT embedding FROM docs WHERE id=?", (doc_id,)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    def by_labels(self, labels: Iterable[int]) -> dict[int, StoredDocument]:
        """{label: document} for the labels that are stored (a replaced or deleted label is absent)."""
        out = {}
        for part in _chunks(sorted({int(x) for x in labels})):
            q = f"SELECT label, {self._DOC_COLUMNS} FROM docs WHERE label IN ({','.join('?' * len(part))})"
            out.update((row[0], self._doc(row[1:])) for row in self._r.execute(q, part))
        return out

    def existing_ids(self, ids: list[str]) -> set[str]:
        found = set()
        for part in _chunks(list(ids)):
            q = f"SELECT id FROM docs WHERE id IN ({','.join('?' * len(part))})"
            found.update(r[0] for r in self._r.execute(q, part))
        return found

    def count(self, modality: str | None = None) -> int:
        if modality is None:
            return self._r.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        return self._r.execute("SELECT COUNT(*) FROM docs WHERE modality=?", (modality,)).fetchone()[0]

    def labels_and_modalities(self) -> Iterator[tuple[int, str]]:
        return iter(self._r.execute("SELECT label, modality FROM docs"))

    def embeddings_after(self, label: int, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows with label > `label`, in label order, as (labels (n,) int64, vectors (n, dim) float32) chunks."""
        con = self._connect()  # its own connection: this runs while other reads may use _r
        try:
            cur = con.execute("SELECT label, embedding FROM docs WHERE label > ? ORDER BY label", (label,))
            while rows := cur.fetchmany(chunk):
                labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
                yield labels, vecs.astype(np.float32)
        finally:
            con.close()

    def tombstones_after(self, seq: int) -> list[tuple[int, int]]:
        """(label, seq) of versions removed after `seq`."""
        return self._r.execute("SELECT label, seq FROM tombstones WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    def close(self) -> None:
        with self._readers_lock:
            for con in self._readers:
                con.close()
            self._readers.clear()
        self._w.close()
