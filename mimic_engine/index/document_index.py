"""DocumentIndex: the SQLite document store (truth) + an HNSW graph (cache), kept consistent.

Folder layout:

    docs.sqlite (+ -wal, -shm)   documents, embeddings, labels, tombstones, meta, thumbnails (store.py)
    hnsw-<seq>.bin               the graph as of store sequence <seq>              (hnsw.py)
    index.json                   params (dim, model_id, M, ef_construction, ef, format) and which
                                 snapshot file is current, the seq it reflects, its size and CRC32
    LOCK                         flock held by the one process that has the folder open

Durability contract: `upsert` / `delete` return after the SQLite transaction committed; the graph
is updated in memory right after, under the same exclusive lock. The graph file is written only
by `flush()` / `close()` / automatically when the graph lags the last snapshot by
`max(snapshot_every, count // 4)` changes (geometric, so snapshots cost O(N) in total). Writes
are temp file + rename, then index.json (temp + rename) names the new file, so a kill at any
moment leaves either the old or the new snapshot fully described. On open, the snapshot is
replayed forward to the store's sequence (labels > seq are added, tombstones after seq are
marked deleted), or rebuilt from the stored embeddings when it is missing, fails its CRC, or
disagrees with the store. A `kill -9` therefore loses nothing that was acknowledged.

Thread safety: any number of threads may call search / search_batch / get / get_vector / count /
stats concurrently; upsert / delete / flush serialise against them through a writer-preferring
readers-writer lock (hnswlib's add_items is not safe concurrently with knn_query, resize_index
blocks everything). One process per folder (LOCK): a second one gets a MimicError naming the
holder's pid. `describe(path)` reads stats without opening the folder (works while it is held).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time

import numpy as np

from ..errors import InputError, MimicError
from .base import IndexClosedError, VectorIndex, check_ef, check_k, check_modality, checked_upsert, model_mismatch
from .base import unit_rows as _unit_rows
from .hnsw import TEMP_MARK, HnswGraph, file_crc32, fsync_dir
from .store import (MODALITIES, STORE_FILE, DocumentStore, IndexMismatchError, StoreDamagedError, StoredDocument,
                    damaged_store_message)

log = logging.getLogger(__name__)

PARAMS_FILE = "index.json"
LOCK_FILE = "LOCK"
INDEX_FORMAT = 1
BACKEND = "folder"  # stats()["backend"]
SNAPSHOT_NAME = re.compile(r"hnsw-\d{12}\.bin")  # the only file names index.json may point to
DEFAULTS = {"M": 32, "ef_construction": 200, "ef": 128}
GRAPH_STEP = 256  # documents added to the graph per exclusive-lock hold
# A modality filter that keeps few documents makes the graph search visit many rejected nodes: with 384-d
# vectors and 100k documents, k=10 took 26 ms at a 1% share and 80 ms at 0.1%. Brute force over the kept
# documents costs ~10 us each (vectors read back from the graph) and is exact, so it answers when the
# filtered modality has at most FILTERED_EXACT_MAX documents and at most FILTERED_EXACT_SHARE of the index.
FILTERED_EXACT_MAX = 1024
FILTERED_EXACT_SHARE = 0.05


def lock_folder(path: str):
    """Hold the folder's LOCK (flock, released when the returned file closes); MimicError naming the holder."""
    import fcntl

    fh = open(os.path.join(path, LOCK_FILE), "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise MimicError(f"index folder {path} is open in another process (pid {holder}); stop it, or use "
                         f"'mimic-engine index stats' (read-only), or another --index folder") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    class _Guard:
        def __init__(self, acquire, release):
            self.acquire, self.release = acquire, release

        def __enter__(self):
            self.acquire()

        def __exit__(self, *_):
            self.release()

    def read(self):
        return self._Guard(self.acquire_read, self.release_read)

    def write(self):
        return self._Guard(self.acquire_write, self.release_write)


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}{TEMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed (disk full): no half-written file stays behind
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s); the graph will be rebuilt from the store", path, exc)
        return None


class DocumentIndex(VectorIndex):
    """A persistent, crash-safe vector index of text and image documents (see the module doc)."""

    def __init__(self, path: str, dim: int, model_id: str, M: int | None = None, ef_construction: int | None = None,
                 ef: int | None = None, capacity: int = 1024, snapshot_every: int = 20_000,
                 synchronous: str = "FULL", num_threads: int = -1, legacy_model_ids: tuple = ()):
        """Open or create the index folder `path`.

        An existing index opens when it was built with `model_id` or with one of `legacy_model_ids`
        (older ids of the same model, e.g. its checkpoint file's sha256, which indexes recorded
        before model ids hashed the model's content); it keeps the id it was built with
        (`self.model_id`), so every encoder that answers to that id still opens it.

        M / ef_construction apply when the graph is created; an existing index keeps the values it
        was built with (changing them needs a rebuild: a new folder). ef (search breadth) defaults
        to the saved value, else 128; passing it sets and saves it.
        """
        if not isinstance(dim, int) or dim <= 0:
            raise InputError(f"dim={dim!r}: the embedding dimension must be a positive integer")
        if not model_id:
            raise InputError("model_id is empty: pass the encoder's model_id, so the index can refuse vectors of another model")
        self.path = os.path.abspath(path)
        self.dim, self.model_id = dim, model_id
        self._legacy_model_ids = tuple(legacy_model_ids)
        self.snapshot_every = snapshot_every
        self.num_threads = num_threads
        self._lock = RWLock()
        self._write_mutex = threading.Lock()  # serialises upsert / delete / flush (see upsert)
        self._closed = False
        self._notes: list[str] = []
        os.makedirs(self.path, exist_ok=True)
        self._lock_fh = self._lock_folder()
        try:
            self._remove_temp_files()
            self.store = DocumentStore(self.path, synchronous)
            self._check_or_init_meta(M, ef_construction)
            params = _read_json(os.path.join(self.path, PARAMS_FILE)) or {}
            self.ef = int(ef if ef is not None else params.get("ef", DEFAULTS["ef"]))
            if self.ef < 1:
                raise InputError(f"ef={self.ef}: must be >= 1")
            self._load_masks()
            self.opened = self._open_graph(params, capacity)
            if ef is not None and params.get("ef") not in (None, self.ef):
                self._write_params(self._snapshot)  # remember the new ef now, not only at the next snapshot
        except BaseException:
            self._release_folder()
            raise

    # ---- opening ------------------------------------------------------------------------------
    def _lock_folder(self):
        return lock_folder(self.path)

    def _remove_temp_files(self):
        """Temp files of writers that were killed or failed (this process holds the folder now)."""
        for name in os.listdir(self.path):
            if TEMP_MARK in name and (name.startswith(PARAMS_FILE) or name.startswith("hnsw-")):
                log.info("removing %s, left behind by an interrupted write", name)
                os.remove(os.path.join(self.path, name))

    def _release_folder(self):
        if getattr(self, "store", None) is not None:
            self.store.close()
        self._lock_fh.close()  # closing the file releases the flock

    def _check_or_init_meta(self, M, ef_construction):
        meta = self.store.meta()
        if "model_id" not in meta:
            self.M = int(M or DEFAULTS["M"])
            self.ef_construction = int(ef_construction or DEFAULTS["ef_construction"])
            self.store.set_meta({"model_id": self.model_id, "dim": self.dim, "format": INDEX_FORMAT,
                                 "M": self.M, "ef_construction": self.ef_construction, "created": time.time()})
            return
        if meta["model_id"] in self._legacy_model_ids:
            self.model_id = meta["model_id"]
        if meta["model_id"] != self.model_id or meta["dim"] != self.dim:
            raise model_mismatch(f"index folder {self.path}", meta["model_id"], meta["dim"], self.model_id, self.dim,
                                 "Use a new --index folder, or delete this one")
        if meta.get("format", INDEX_FORMAT) > INDEX_FORMAT:
            raise IndexMismatchError(f"index folder {self.path} has format {meta['format']}, newer than this "
                                     f"mimic-engine understands ({INDEX_FORMAT}); upgrade mimic-engine or rebuild the index")
        self.M, self.ef_construction = int(meta["M"]), int(meta["ef_construction"])
        for name, asked in (("M", M), ("ef_construction", ef_construction)):
            if asked is not None and asked != getattr(self, name):
                note = (f"{name}={asked} ignored: this index was built with {name}={getattr(self, name)}; "
                        f"build into a new folder to change it")
                log.warning(note)
                self._notes.append(note)

    def _load_masks(self):
        """Per modality, a bytearray indexed by label: 1 where that label is a live document.

        One byte per label ever issued (labels are never reused): the filter hnswlib calls back
        during a modality-restricted search is then a C-level bytearray lookup.
        """
        size = max(1024, self.store.seq + 1)  # every label issued so far is <= seq
        self._masks = {m: bytearray(size) for m in MODALITIES}
        self._counts = dict.fromkeys(MODALITIES, 0)
        for label, modality in self.store.labels_and_modalities():
            self._mask_set(modality, label, 1)

    def _mask_set(self, modality: str, label: int, value: int):
        mask = self._masks[modality]
        if label >= len(mask):  # grow every mask alike: a filter sees the labels of all modalities
            size = max(label + 1, 2 * len(mask))
            for m in self._masks.values():
                m.extend(bytes(size - len(m)))
        if mask[label] != value:
            mask[label] = value
            self._counts[modality] += 1 if value else -1

    def _live_labels(self, modality: str | None) -> np.ndarray:
        mods = MODALITIES if modality is None else (modality,)
        return np.concatenate([np.flatnonzero(np.frombuffer(self._masks[m], np.uint8)) for m in mods]).astype(np.int64)

    def _open_graph(self, params: dict, capacity: int) -> dict:
        """Load + replay the snapshot, or rebuild. -> a report for stats()["opened"]."""
        store_seq = self.store.seq
        t0 = time.perf_counter()
        report = {"store_seq": store_seq, "snapshot_seq": None, "replayed_upserts": 0, "replayed_deletes": 0,
                  "rebuilt": False, "reason": None}
        snap = params.get("snapshot")
        problem = self._snapshot_problem(params, snap, store_seq)
        if problem is None:
            try:
                self.graph = HnswGraph.load(os.path.join(self.path, snap["file"]), self.dim, self.ef)
                self._graph_live = int(snap["live"])
                self._snapshot = snap
                report["snapshot_seq"] = snap["seq"]
                report["replayed_upserts"], report["replayed_deletes"] = self._replay(snap["seq"])
                if self._graph_live != self.count():
                    problem = f"after replay the graph holds {self._graph_live} live elements, the store {self.count()}"
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                problem = f"snapshot {snap.get('file')} could not be loaded or replayed ({exc})"
        if problem is not None:
            if snap is None and store_seq == 0:
                problem = "new index"
            else:
                log.warning("rebuilding the graph of %s from the store: %s", self.path, problem)
            report.update(rebuilt=True, reason=problem, replayed_upserts=0, replayed_deletes=0)
            self._rebuild(capacity)
            self._try_snapshot("after the rebuild")
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return report

    def _snapshot_problem(self, params: dict, snap: dict | None, store_seq: int) -> str | None:
        """Why the snapshot described by index.json cannot be trusted, or None."""
        if not snap:
            return "no snapshot"
        if not isinstance(snap, dict) or not {"file", "seq", "live", "bytes", "crc32"} <= snap.keys():
            return f"{PARAMS_FILE} has a malformed 'snapshot' entry"
        if params.get("model_id") != self.model_id or params.get("dim") != self.dim or params.get("M") != self.M:
            return f"{PARAMS_FILE} describes another model or parameters than the store"
        if not isinstance(snap["file"], str) or not SNAPSHOT_NAME.fullmatch(snap["file"]):
            return f"{PARAMS_FILE} names the snapshot file {snap['file']!r}, not a file name hnsw-<seq>.bin in the folder"
        if snap["seq"] > store_seq:
            return f"snapshot reflects seq {snap['seq']}, newer than the store's {store_seq} (store replaced?)"
        file = os.path.join(self.path, snap["file"])
        if not os.path.isfile(file):
            return f"snapshot file {snap['file']} is missing"
        if os.path.getsize(file) != snap["bytes"] or file_crc32(file) != snap["crc32"]:
            return f"snapshot file {snap['file']} is damaged (size or CRC32 differs from {PARAMS_FILE})"
        return None

    def _replay(self, since: int) -> tuple[int, int]:
        """Bring the loaded snapshot (as of seq `since`) up to the store. -> (added, deleted)."""
        deleted = 0
        for label, _ in self.store.tombstones_after(since):
            if label <= since:  # a version the snapshot knows; later versions were never in it
                self.graph.mark_deleted(label)
                self._graph_live -= 1
                deleted += 1
        added = 0
        for labels, vecs in self.store.embeddings_after(since):
            self.graph.add(vecs, labels, self._free_slots(), self.num_threads)
            self._graph_live += len(labels)
            added += len(labels)
        return added, deleted

    def _rebuild(self, capacity: int):
        n = self.count()
        self.graph = HnswGraph.create(self.dim, self.M, self.ef_construction, self.ef, max(capacity, n + n // 4))
        self._graph_live = 0
        self._snapshot = None
        for labels, vecs in self.store.embeddings_after(-1):
            self.graph.add(vecs, labels, 0, self.num_threads)
            self._graph_live += len(labels)

    def _free_slots(self) -> int:
        return self.graph.slots - self._graph_live

    # ---- snapshots ----------------------------------------------------------------------------
    def _write_params(self, snap: dict | None):
        _write_json_atomic(os.path.join(self.path, PARAMS_FILE), {
            "format": INDEX_FORMAT, "model_id": self.model_id, "dim": self.dim, "space": "ip",
            "M": self.M, "ef_construction": self.ef_construction, "ef": self.ef, "snapshot": snap})

    def _save_snapshot(self):
        """Write the graph (caller holds _write_mutex and the read lock, or is __init__)."""
        seq = self.store.seq
        name = f"hnsw-{seq:012d}.bin"
        file = os.path.join(self.path, name)
        crc = self.graph.save(file)
        snap = {"file": name, "seq": seq, "live": self._graph_live, "bytes": os.path.getsize(file),
                "crc32": crc, "capacity": self.graph.capacity, "saved": time.time()}
        try:
            self._write_params(snap)  # from here on, the new snapshot is the one open() uses
        except BaseException:
            os.remove(file)  # index.json still names the previous snapshot, which stays
            raise
        self._snapshot = snap
        for f in os.listdir(self.path):  # older snapshots and temp files of killed writers
            if f.startswith("hnsw-") and f != name:
                os.remove(os.path.join(self.path, f))
        self.store.prune_tombstones(seq)

    def flush(self) -> None:
        """Snapshot the graph now if it lags the store (searches go on meanwhile; writes wait)."""
        with self._write_mutex:
            self._check_open()
            self._flush_locked()

    def _flush_locked(self):
        with self._lock.read():
            if self._snapshot is None or self._snapshot["seq"] != self.store.seq:
                self._save_snapshot()

    def _maybe_snapshot(self):
        """Save the graph when it lags the store enough. Runs after a write is durable, so a failure
        here (disk full, index closed meanwhile) must not fail that write: the snapshot is only a
        cache, replayed from the store on the next open."""
        lag = self.store.seq - (self._snapshot["seq"] if self._snapshot else 0)
        if lag >= max(self.snapshot_every, self.count() // 4):
            self._try_snapshot("after a write", self.flush)

    def _try_snapshot(self, when: str, save=None) -> None:
        """Snapshot (`save`, default `_save_snapshot`), logging a failure instead of raising it: the
        previous snapshot stays valid and the store holds every acknowledged write."""
        try:
            (save or self._save_snapshot)()
        except (OSError, MimicError) as exc:
            log.warning("graph snapshot of %s %s failed (%s: %s); the acknowledged writes are in the store and "
                        "the graph is replayed from it on the next open", self.path, when, exc.__class__.__name__, exc)

    # ---- writes -------------------------------------------------------------------------------
    def upsert(self, docs: list[StoredDocument], vectors: np.ndarray) -> int:
        """Insert or replace documents by id. vectors (N, dim), normalised here. Durable on return. -> N."""
        self._check_open()
        if len(docs) == 0:
            return 0
        vecs = checked_upsert(docs, vectors, self.dim)
        with self._write_mutex:  # one writer at a time: store and graph change in the same order
            self._check_open()
            with self._lock.write():  # store commit + removal of replaced versions: atomic for searches
                labels, replaced = self.store.write(docs, vecs)
                with self._repair_on_error():
                    for label in replaced:
                        self._forget(label)
            # the new versions go into the graph in steps, releasing the lock in between, so a bulk
            # upsert does not stall searches for its whole duration (it is acknowledged only at the end)
            for lo in range(0, len(docs), GRAPH_STEP):
                hi = min(len(docs), lo + GRAPH_STEP)
                with self._lock.write(), self._repair_on_error():
                    self.graph.add(vecs[lo:hi], labels[lo:hi], self._free_slots(), self.num_threads)
                    self._graph_live += hi - lo
                    for d, label in zip(docs[lo:hi], labels[lo:hi]):
                        self._mask_set(d.modality, int(label), 1)
        self._maybe_snapshot()
        return len(docs)

    def delete(self, doc_id: str) -> bool:
        """Remove a document; False if it was not stored. Durable on return."""
        self._check_open()
        with self._write_mutex, self._lock.write():
            self._check_open()
            label = self.store.delete(doc_id)
            if label is None:
                return False
            with self._repair_on_error():
                self._forget(label)
        self._maybe_snapshot()
        return True

    def _forget(self, label: int):
        """A stored version is gone: drop it from the graph and the modality masks."""
        self.graph.mark_deleted(label)
        self._graph_live -= 1
        for m in MODALITIES:
            if label < len(self._masks[m]) and self._masks[m][label]:
                self._mask_set(m, label, 0)

    @contextlib.contextmanager
    def _repair_on_error(self):
        """The store has committed: if updating the graph fails half-way, rebuild it from the store."""
        try:
            yield
        except BaseException:
            log.exception("updating the graph of %s failed after the store committed; rebuilding it", self.path)
            self._load_masks()
            self._rebuild(self.graph.capacity)
            raise

    def set_ef(self, ef: int) -> None:
        """Search breadth (hnswlib uses max(ef, k)); saved in index.json at once."""
        check_ef(ef)
        with self._write_mutex, self._lock.write():
            self._check_open()
            self.ef = int(ef)
            self.graph.set_ef(self.ef)
            self._write_params(self._snapshot)

    # ---- reads --------------------------------------------------------------------------------
    # store reads also hold the read lock: close() must not close a connection another thread is using
    def get(self, doc_id: str) -> StoredDocument | None:
        with self._lock.read():
            self._check_open()
            return self.store.get(doc_id)

    def thumbnail(self, doc_id: str) -> bytes | None:
        """The document's thumbnail (WebP or JPEG bytes), or None (no such document, or none was stored)."""
        with self._lock.read():
            self._check_open()
            return self.store.thumbnail(doc_id)

    def get_vector(self, doc_id: str) -> np.ndarray | None:
        """-> (dim,) float32 unit vector as stored, or None."""
        with self._lock.read():
            self._check_open()
            return self.store.get_vector(doc_id)

    def existing_ids(self, ids: list[str]) -> set[str]:
        """The subset of `ids` that is stored (resumable bulk builds skip these)."""
        with self._lock.read():
            self._check_open()
            return self.store.existing_ids(ids)

    def count(self, modality: str | None = None) -> int:
        if modality is None:
            return sum(self._counts.values())
        self._check_modality(modality)
        return self._counts[modality]

    def search_batch(self, vectors: np.ndarray, k: int, modality: str | None = None) -> list[list[tuple[StoredDocument, float]]]:
        """Per row of vectors (Q, dim): top-k (document, score), best first; fewer when fewer are stored."""
        self._check_open()
        check_k(k)
        self._check_modality(modality)
        queries = _unit_rows(vectors, self.dim, "search vectors")
        with self._lock.read():
            self._check_open()
            live = self.count(modality)
            if live == 0:
                return [[] for _ in range(len(queries))]
            k = min(int(k), live)
            if modality is not None and live <= min(FILTERED_EXACT_MAX, FILTERED_EXACT_SHARE * self.count()):
                hits = self.graph.exact(queries, k, self._live_labels(modality))  # a rare modality: brute force
            else:
                # modality filter: hnswlib calls the mask per visited element and keeps only allowed ones
                allowed = self._masks[modality] if modality is not None else None
                hits = self.graph.knn(queries, k, allowed, lambda: self._live_labels(modality),
                                      num_threads=1 if len(queries) == 1 else self.num_threads)
            docs = self.store.by_labels(np.concatenate([labels for labels, _ in hits]))
        return [[(docs[int(l)], float(s)) for l, s in zip(labels, scores) if int(l) in docs] for labels, scores in hits]

    def stats(self) -> dict:
        with self._lock.read():
            self._check_open()
            return {
                "backend": BACKEND, "path": self.path, "model_id": self.model_id, "dim": self.dim, "format": INDEX_FORMAT,
                "count": self.count(), "count_by_modality": dict(self._counts),
                "params": {"space": "ip", "M": self.M, "ef_construction": self.ef_construction, "ef": self.ef},
                "capacity": self.graph.capacity, "slots_used": self.graph.slots, "free_slots": self._free_slots(),
                "store_seq": self.store.seq, "snapshot": self._snapshot, "opened": self.opened,
                "snapshot_lag": self.store.seq - (self._snapshot["seq"] if self._snapshot else 0),
                "synchronous": self.store.synchronous, "notes": list(self._notes),
            }

    # ---- lifecycle ----------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise IndexClosedError(f"index {self.path} is closed")

    def _check_modality(self, modality):
        check_modality(modality)

    def close(self) -> None:
        """Snapshot if needed, close the store, release the folder. Idempotent."""
        with self._write_mutex:
            if self._closed:
                return
            self._try_snapshot("at close", self._flush_locked)  # e.g. a full disk must not keep the folder locked
            with self._lock.write():
                self._closed = True
                self._release_folder()

    def __repr__(self):
        return f"DocumentIndex({self.path!r}, dim={self.dim}, model_id={self.model_id!r}, count={self.count()})"


def describe(path: str) -> dict:
    """Stats of an index folder without opening it for writing (works while a server holds it)."""
    import sqlite3

    store = os.path.join(path, STORE_FILE)
    if not os.path.isfile(store):
        raise MimicError(f"{path} is not an index folder (no {STORE_FILE}); build one with 'mimic-engine index build'")
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        by_mod = dict(con.execute("SELECT modality, COUNT(*) FROM docs GROUP BY modality").fetchall())
    except sqlite3.DatabaseError as exc:
        raise StoreDamagedError(damaged_store_message(store, str(exc))) from exc
    finally:
        con.close()
    params = _read_json(os.path.join(path, PARAMS_FILE)) or {}
    snap = params.get("snapshot") or {}
    return {"backend": BACKEND, "path": os.path.abspath(path), "model_id": meta.get("model_id"), "dim": meta.get("dim"),
            "format": meta.get("format"), "count": sum(by_mod.values()), "count_by_modality": by_mod,
            "params": {"space": "ip", "M": meta.get("M"), "ef_construction": meta.get("ef_construction"), "ef": params.get("ef")},
            "store_seq": meta.get("seq"), "snapshot": snap or None,
            "snapshot_lag": (meta.get("seq", 0) - snap["seq"]) if snap else None,
            "store_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.startswith(STORE_FILE))}
