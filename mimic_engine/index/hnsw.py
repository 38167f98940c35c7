"""The fast half of the index: an hnswlib graph over L2-normalised vectors (space "ip").

This graph is a cache of the document store: everything in it can be rebuilt from the stored
embeddings. hnswlib facts this wrapper is shaped around (hnswlib 0.8):
- `add_items` is not safe concurrently with `knn_query`, and `resize_index` blocks everything:
  the caller (DocumentIndex) holds a readers-writer lock around every call here.
- `ef` is not saved by `save_index` (a loaded index has ef=10): the caller stores it beside the
  snapshot and sets it again after loading.
- Deleted (or filtered-out) elements can leave fewer than k reachable results; knn_query then
  raises "Cannot return the results in a contiguous 2D array". `knn` clamps k to the live count,
  and on that error answers that query exactly (small live sets) or with the largest k that works.
- distance in space "ip" is 1 - <q, x>, so score = 1 - distance = inner product (= cosine here).
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from ..errors import require

EXACT_FALLBACK_MAX = 20_000  # live elements up to which a failed query is answered by exact search
TEMP_MARK = ".tmp-"  # in the name of a file being written; such files are removed when the folder is opened
# hnswlib 0.8's file: a 96-byte header, then element_count fixed-size level-0 records, then per
# element a uint32 byte count and that many bytes of upper-level links (the file ends with the last)
_HEADER = struct.Struct("<6QiI3QdQ")  # offsetLevel0, max_elements, element_count, size_data_per_element,
#                                       label_offset, offsetData, maxlevel, enterpoint, maxM, maxM0, M, mult, ef_construction


class SnapshotWriteError(OSError):
    """A graph file came out incomplete (hnswlib's save_index does not report failed writes, e.g. a full disk)."""


def saved_graph_problem(path: str, elements: int) -> str | None:
    """Why the hnswlib file at `path` is not a complete save of a graph of `elements` slots, or None."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        header = fh.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return f"{size} bytes, shorter than hnswlib's header"
        fields = _HEADER.unpack(header)
        count, record = fields[2], fields[3]
        if count != elements:
            return f"it records {count} elements, the graph has {elements}"
        fh.seek(_HEADER.size + count * record)
        links = fh.read()
    pos = 0
    for _ in range(count):
        if pos + 4 > len(links):
            return f"it ends inside the link lists ({size} bytes)"
        pos += 4 + int.from_bytes(links[pos:pos + 4], "little")
    if pos != len(links):
        return f"{size} bytes where the graph needs {_HEADER.size + count * record + pos}"
    return None


def _hnswlib():
    return require("hnswlib", "pip install 'mimic-engine[serve]'", "the vector index")


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def fsync_dir(folder: str) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HnswGraph:
    """One hnswlib.Index with geometric growth, slot reuse and a forgiving knn. Not thread-safe."""

    def __init__(self, index, dim: int):
        self.index = index
        self.dim = dim

    @classmethod
    def create(cls, dim: int, M: int, ef_construction: int, ef: int, capacity: int, seed: int = 100) -> "HnswGraph":
        index = _hnswlib().Index(space="ip", dim=dim)
        # allow_replace_deleted: a new version may take the memory slot of a deleted one, so an
        # upsert-heavy index does not grow without bound (labels themselves are never reused)
        index.init_index(max_elements=max(1, capacity), M=M, ef_construction=ef_construction,
                         random_seed=seed, allow_replace_deleted=True)
        index.set_ef(ef)
        return cls(index, dim)

    @classmethod
    def load(cls, path: str, dim: int, ef: int) -> "HnswGraph":
        """Raises RuntimeError (hnswlib's) on a truncated or foreign file."""
        index = _hnswlib().Index(space="ip", dim=dim)
        index.load_index(path, allow_replace_deleted=True)
        index.set_ef(ef)
        return cls(index, dim)

    @property
    def slots(self) -> int:
        """Elements stored, deleted ones included (hnswlib's element_count)."""
        return self.index.element_count

    @property
    def capacity(self) -> int:
        return self.index.get_max_elements()

    def reserve(self, new_elements: int, free_slots: int) -> None:
        """Grow (geometrically: at least x2) so `new_elements` fit, counting deleted slots as reusable."""
        needed = self.slots + max(0, new_elements - free_slots)
        if needed > self.capacity:
            self.index.resize_index(max(needed, 2 * self.capacity))

    def add(self, vectors: np.ndarray, labels: np.ndarray, free_slots: int, num_threads: int = -1) -> None:
        """vectors (N, dim) unit float32, labels (N,) never seen before by this graph."""
        if len(labels):
            self.reserve(len(labels), free_slots)
            self.index.add_items(vectors, labels, num_threads=num_threads, replace_deleted=free_slots > 0)

    def mark_deleted(self, label: int) -> None:
        self.index.mark_deleted(int(label))

    def set_ef(self, ef: int) -> None:
        self.index.set_ef(ef)

    def save(self, path: str) -> int:
        """Write the graph to `path` atomically (temp file, fsync, check, rename); -> its CRC32.

        SnapshotWriteError (nothing under `path` changed) when the file came out incomplete."""
        tmp = f"{path}{TEMP_MARK}{os.getpid()}"
        try:
            self.index.save_index(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            problem = saved_graph_problem(tmp, self.slots)
            if problem is not None:
                raise SnapshotWriteError(f"saving the graph to {path} failed ({problem}); is the disk full? The previous "
                                         "snapshot is kept")
            crc = file_crc32(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        return crc

    # ---- search ---------------------------------------------------------------------------------
    def knn(self, queries: np.ndarray, k: int, allowed: bytearray | None, live_labels,
            num_threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k per query among live elements (restricted to labels with allowed[label] != 0).

        queries (Q, dim) unit float32; `live_labels()` -> (L,) labels that may be returned (used only
        on the fallback path). -> per query (labels (k',) int64, scores (k',) float32), best first,
        k' = min(k, L) normally, fewer only if the graph cannot reach that many.
        """
        # bytearray.__getitem__ is a C function: the cheapest filter hnswlib can call back
        filt = allowed.__getitem__ if allowed is not None else None
        try:
            labels, dist = self.index.knn_query(queries, k=k, num_threads=num_threads, filter=filt)
            return [(labels[i].astype(np.int64), 1.0 - dist[i]) for i in range(len(queries))]
        except RuntimeError as exc:
            if "contiguous 2D array" not in str(exc):
                raise
        live = None
        out = []
        for q in queries:
            try:
                labels, dist = self.index.knn_query(q[None], k=k, num_threads=1, filter=filt)
                out.append((labels[0].astype(np.int64), 1.0 - dist[0]))
                continue
            except RuntimeError as exc:
                if "contiguous 2D array" not in str(exc):
                    raise
            live = live_labels() if live is None else live
            out.append(self.exact(q[None], k, live)[0] if len(live) <= EXACT_FALLBACK_MAX
                       else self._largest_k(q, k, filt))
        return out

    def exact(self, queries: np.ndarray, k: int, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Brute force over `labels` (L,), their vectors read back from the graph (~10 us each).

        queries (Q, dim) -> per query (labels (min(k, L),) int64, scores float32), best first.
        """
        if len(labels) == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in queries]
        scores = queries @ self.index.get_items(labels, return_type="numpy").astype(np.float32).T  # (Q, L)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [(labels[t].astype(np.int64), row[t]) for t, row in zip(top, scores)]

    def _largest_k(self, q: np.ndarray, k: int, filt) -> tuple[np.ndarray, np.ndarray]:
        """Binary search for the largest k' < k the graph can answer (a large, badly damaged index)."""
        lo, hi, best = 0, k, (np.zeros(0, np.int64), np.zeros(0, np.float32))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                labels, dist = self.index.knn_query(q[None], k=mid, num_threads=1, filter=filt)
                lo, best = mid, (labels[0].astype(np.int64), 1.0 - dist[0])
            except RuntimeError:
                hi = mid
        return best
