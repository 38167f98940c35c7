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

Failures: a full disk raises StorageFullError (the write was rolled back: nothing of it is stored);
a damaged file raises StoreDamagedError naming it and the way out, at open (where `PRAGMA
quick_check` runs, bounded by QUICK_CHECK_SECONDS) or on the read that meets the damaged page.
Text is stored only if it is valid Unicode (`unicode_problem`); metadata stored by older versions
with lone surrogates in it is read back with U+FFFD in their place.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..errors import InputError, MimicError

STORE_FILE = "docs.sqlite"
MODALITIES = ("text", "image")
FORMAT_VERSION = 1
_SQL_CHUNK = 500  # ids / labels per "IN (...)" query (SQLite's default limit is 32766 variables)
QUICK_CHECK_SECONDS = 10.0  # at open; a larger store starts without the rest of the check (logged)

log = logging.getLogger(__name__)


class IndexMismatchError(MimicError):
    """An index folder was built by another model (or for another dimension or format)."""


class StorageFullError(MimicError):
    """The disk (or quota) holding the index is full: the write was refused and nothing of it was stored."""


class StoreDamagedError(MimicError):
    """docs.sqlite is damaged (a malformed page, a header that is not SQLite's)."""


def damaged_store_message(path: str, detail: str) -> str:
    folder = os.path.dirname(path)
    return (f"the document store {path} is damaged ({detail}). Restore it (with its -wal file, if any) from a "
            f"backup, or stop the server and run 'mimic-engine index repair --index {folder}': it keeps every "
            f"document SQLite can still read (the damaged file is kept beside it), lists the ids of the documents "
            f"it lost where it can, and the graph is rebuilt at the next start; or rebuild the index from your "
            f"documents into a new folder ('mimic-engine index build')")


def _is_surrogate(ch: str) -> bool:
    return "\ud800" <= ch <= "\udfff"


def _valid_unicode(text: str) -> bool:
    return text.isascii() or not any(map(_is_surrogate, text))


def unicode_problem(value, path: str) -> str | None:
    """Why `value` (a str, or nested dicts / lists; dict keys included) cannot be stored, or None.

    JSON may carry lone UTF-16 surrogates ("\\ud800"); Python decodes them into a str that UTF-8, SQLite
    and every JSON response refuse, so such text must never reach the store. -> a message naming the
    path of the first bad string (`path` names `value`), the position of the surrogate and the fix."""
    if isinstance(value, str):
        if _valid_unicode(value):
            return None
        at = next(i for i, ch in enumerate(value) if _is_surrogate(ch))
        return (f"{path} holds a lone UTF-16 surrogate (\\u{ord(value[at]):04x} at character {at}), which is not a "
                "Unicode character and cannot be encoded as UTF-8 or stored; send valid Unicode text (a character "
                "beyond U+FFFF is written as a surrogate pair, high \\ud800-\\udbff then low \\udc00-\\udfff)")
    if isinstance(value, dict):
        for key, child in value.items():
            if isinstance(key, str) and not _valid_unicode(key):
                return unicode_problem(key, f"{path} key {key!r}")
            problem = unicode_problem(child, f"{path}.{key}" if path else str(key))
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for i, child in enumerate(value):
            problem = unicode_problem(child, f"{path}[{i}]")
            if problem is not None:
                return problem
    return None


def replace_lone_surrogates(value):
    """`value` (nested dicts / lists / str) with every lone surrogate replaced by U+FFFD."""
    if isinstance(value, str):
        return value if _valid_unicode(value) else "".join("\ufffd" if _is_surrogate(ch) else ch for ch in value)
    if isinstance(value, dict):
        return {replace_lone_surrogates(k): replace_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_lone_surrogates(v) for v in value]
    return value


def _load_metadata(raw: str, doc_id: str) -> dict:
    """Stored metadata JSON -> dict. Versions before text was validated stored lone surrogates (JSON escapes
    them as \\udXXX, as it does surrogate pairs, so only such rows take the slow path)."""
    metadata = json.loads(raw)
    if "\\ud" in raw or "\\uD" in raw:
        fixed = replace_lone_surrogates(metadata)
        if fixed != metadata:
            log.warning("document %r: its stored metadata holds lone UTF-16 surrogates (stored by an older version); "
                        "served with U+FFFD in their place; upsert the document again to store it so", doc_id)
        return fixed
    return metadata


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
        for name in ("id", "text", "caption", "image_ref", "metadata"):
            problem = unicode_problem(getattr(d, name), f"docs[{i}].{name}")
            if problem is not None:
                raise InputError(problem)


def _sqlite_errors(method):
    """Raise StorageFullError / StoreDamagedError for SQLite's disk-full / damaged-file errors in `method`."""
    @functools.wraps(method)
    def translating(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        except json.JSONDecodeError as exc:  # stored metadata that is no longer JSON: a damaged page
            log.error("the document store %s is damaged: stored metadata is unreadable (%s)", self.path, exc)
            raise StoreDamagedError(damaged_store_message(self.path, f"stored metadata is unreadable: {exc}")) from exc
    return translating


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
        self._w = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @_sqlite_errors
    def _open(self) -> None:
        self._w = self._connect()
        self._w.execute("PRAGMA journal_mode=WAL")
        self._quick_check()
        with self._txn():
            self._w.execute("CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, label INTEGER NOT NULL UNIQUE,"
                            " modality TEXT NOT NULL, text TEXT, caption TEXT, image_ref TEXT,"
                            " metadata TEXT NOT NULL, embedding BLOB NOT NULL)")
            self._w.execute("CREATE TABLE IF NOT EXISTS tombstones (label INTEGER PRIMARY KEY, seq INTEGER NOT NULL)")
            self._w.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._w.execute("CREATE TABLE IF NOT EXISTS thumbnails (id TEXT PRIMARY KEY, image BLOB NOT NULL)")
            self._w.execute("INSERT OR IGNORE INTO meta VALUES ('seq', '0')")

    def _quick_check(self) -> None:
        """StoreDamagedError unless SQLite's structural check passes (a store too large to check within
        QUICK_CHECK_SECONDS opens without the rest of the check, with a warning)."""
        deadline = time.monotonic() + QUICK_CHECK_SECONDS
        self._w.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            problems = [row[0] for row in self._w.execute("PRAGMA quick_check(3)")]
        except sqlite3.OperationalError as exc:
            if "interrupt" not in str(exc):
                raise
            log.warning("the check of %s did not finish within %.0f s; opening it unchecked", self.path,
                        QUICK_CHECK_SECONDS)
            return
        finally:
            self._w.set_progress_handler(None, 0)
        if problems != ["ok"]:
            raise StoreDamagedError(damaged_store_message(self.path, "SQLite's quick_check found: " + "; ".join(problems)))

    def _translate(self, exc: sqlite3.DatabaseError) -> Exception:
        """SQLite's error -> StorageFullError / StoreDamagedError (logged with the file), else `exc` itself."""
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # the primary result code
        if code == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
            return StorageFullError(f"the disk holding {self.path} is full (SQLite: {exc}); the write was not stored: "
                                    "free disk space (or raise the quota) and send it again")
        if (code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
                or any(sign in str(exc) for sign in ("malformed", "not a database", "Could not decode to UTF-8"))):
            log.error("the document store %s is damaged: %s", self.path, exc)
            return StoreDamagedError(damaged_store_message(self.path, str(exc)))
        return exc

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
            if exc_type is None:
                try:
                    self.con.execute("COMMIT")
                    return
                except BaseException:  # e.g. disk full at commit: the transaction is still open
                    self._rollback()
                    raise
            self._rollback()

        def _rollback(self):
            if not self.con.in_transaction:
                return
            try:
                self.con.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the error that got us here is the one to report
                log.error("rolling back a failed write failed too: %s", exc)

    def _txn(self) -> "_Txn":
        return self._Txn(self._w)

    # ---- meta ---------------------------------------------------------------------------------
    @_sqlite_errors
    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self._r.execute("SELECT key, value FROM meta")}

    @_sqlite_errors
    def set_meta(self, values: dict) -> None:
        with self._txn() as con:
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])

    @property
    @_sqlite_errors
    def seq(self) -> int:
        return int(self._r.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0])

    # ---- writes (caller serialises) -------------------------------------------------------------
    @_sqlite_errors
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

    @_sqlite_errors
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

    @_sqlite_errors
    def restore_rows(self, docs: list[tuple], tombstones: list[tuple], meta: dict[str, str]) -> None:
        """Fill an empty store with raw rows in table column order (`mimic-engine index repair`)."""
        with self._txn() as con:
            con.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", docs)
            con.executemany("INSERT INTO tombstones VALUES (?, ?)", tombstones)
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))

    @_sqlite_errors
    def prune_tombstones(self, upto_seq: int) -> None:
        """Forget tombstones a durable snapshot at `upto_seq` already reflects."""
        with self._txn() as con:
            con.execute("DELETE FROM tombstones WHERE seq <= ?", (upto_seq,))

    # ---- reads (any thread) ---------------------------------------------------------------------
    @staticmethod
    def _doc(row) -> StoredDocument:
        return StoredDocument(id=row[0], modality=row[1], text=row[2], caption=row[3], image_ref=row[4],
                              metadata=_load_metadata(row[5], row[0]))

    _DOC_COLUMNS = "id, modality, text, caption, image_ref, metadata"

    @_sqlite_errors
    def get(self, doc_id: str) -> StoredDocument | None:
        row = self._r.execute(f"SELECT {self._DOC_COLUMNS} FROM docs WHERE id=?", (doc_id,)).fetchone()
        return None if row is None else self._doc(row)

    @_sqlite_errors
    def thumbnail(self, doc_id: str) -> bytes | None:
        row = self._r.execute("SELECT image FROM thumbnails WHERE id=?", (doc_id,)).fetchone()
        return None if row is None else bytes(row[0])

    @_sqlite_errors
    def get_vector(self, doc_id: str) -> np.ndarray | None:
        row = self._r.execute("SELECT embedding FROM docs WHERE id=?", (doc_id,)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    @_sqlite_errors
    def by_labels(self, labels: Iterable[int]) -> dict[int, StoredDocument]:
        """{label: document} for the labels that are stored (a replaced or deleted label is absent)."""
        out = {}
        for part in _chunks(sorted({int(x) for x in labels})):
            q = f"SELECT label, {self._DOC_COLUMNS} FROM docs WHERE label IN ({','.join('?' * len(part))})"
            out.update((row[0], self._doc(row[1:])) for row in self._r.execute(q, part))
        return out

    @_sqlite_errors
    def existing_ids(self, ids: list[str]) -> set[str]:
        found = set()
        for part in _chunks(list(ids)):
            q = f"SELECT id FROM docs WHERE id IN ({','.join('?' * len(part))})"
            found.update(r[0] for r in self._r.execute(q, part))
        return found

    @_sqlite_errors
    def count(self, modality: str | None = None) -> int:
        if modality is None:
            return self._r.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        return self._r.execute("SELECT COUNT(*) FROM docs WHERE modality=?", (modality,)).fetchone()[0]

    def labels_and_modalities(self) -> Iterator[tuple[int, str]]:
        try:
            yield from self._r.execute("SELECT label, modality FROM docs")
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from exc

    def embeddings_after(self, label: int, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows with label > `label`, in label order, as (labels (n,) int64, vectors (n, dim) float32) chunks."""
        con = self._connect()  # its own connection: this runs while other reads may use _r
        try:
            cur = con.execute("SELECT label, embedding FROM docs WHERE label > ? ORDER BY label", (label,))
            while rows := cur.fetchmany(chunk):
                labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
                yield labels, vecs.astype(np.float32)
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from exc
        finally:
            con.close()

    @_sqlite_errors
    def tombstones_after(self, seq: int) -> list[tuple[int, int]]:
        """(label, seq) of versions removed after `seq`."""
        return self._r.execute("SELECT label, seq FROM tombstones WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    def close(self) -> None:
        with self._readers_lock:
            for con in self._readers:
                con.close()
            self._readers.clear()
        if self._w is not None:
            self._w.close()
