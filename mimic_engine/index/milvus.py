"""MilvusIndex: the index interface (base.py) over Milvus, through `pymilvus.MilvusClient`.

The same client code runs embedded and as a cluster: a URI ending in `.db` runs Milvus Lite inside this
process (one process per `.db`; a second one is refused), `http(s)://host:port` talks to Milvus
Standalone, Milvus Distributed or Zilliz Cloud (token from MIMIC_MILVUS_TOKEN, see selection.py).

One collection per index, schema (Milvus 2.3 servers have no nullable fields, hence `absent`):

    id         VARCHAR primary key (the document id), at most ID_MAX_BYTES of UTF-8
    vector     FLOAT_VECTOR(dim), L2-normalised; HNSW index, metric IP (score = cosine)
    modality   VARCHAR "text" | "image"
    text, caption, image_ref   VARCHAR, at most VARCHAR_MAX_BYTES of UTF-8 each ("" when absent)
    absent     INT8 bit mask of the fields among text, caption, image_ref that are None
    metadata   JSON, at most JSON_MAX_BYTES

and collection properties `mimic.model_id`, `mimic.dim`, `mimic.format`, `mimic.M`, `mimic.ef_construction`,
`mimic.ef` (the model the vectors came from: another model is refused, as a folder does).

Consistency is Strong (collection and every read), so an acknowledged write is visible to the next
search. Milvus's own limits are checked before a write reaches it (InputError, answered 422).
Durability: see DURABILITY and docs/index.md.
"""
from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np

from ..errors import InputError, MimicError, require
from .base import (IndexClosedError, VectorIndex, check_ef, check_k, check_modality, checked_upsert, model_mismatch,
                   unit_rows)
from .document_index import DEFAULTS, RWLock
from .store import IndexMismatchError, MODALITIES, StoredDocument

log = logging.getLogger(__name__)

INSTALL = "pip install 'mimic-engine[milvus]'  (or: pip install \"pymilvus[milvus-lite]\")"
BACKEND = "milvus"
FORMAT = 1
ID_MAX_BYTES = 2048  # 512 characters of up to 4 UTF-8 bytes: the server's default max_id_chars
VARCHAR_MAX_BYTES = 65_535  # Milvus's largest VARCHAR max_length (a server counts UTF-8 bytes)
JSON_MAX_BYTES = 65_536  # Milvus's default limit on one JSON value
MAX_TOPK = 16_384  # Milvus refuses limit above this
REQUEST_MAX_BYTES = 32 << 20  # rows per upsert request, well below gRPC's 64 MiB message limit
CONNECT_TIMEOUT_S = 10.0
OPTIONAL_FIELDS = ("text", "caption", "image_ref")  # bit i of `absent`: OPTIONAL_FIELDS[i] is None
OUTPUT_FIELDS = ["modality", *OPTIONAL_FIELDS, "absent", "metadata"]
STRONG = "Strong"
DURABILITY = {
    "lite": "an acknowledged write is in Milvus Lite's write-ahead log in the OS page cache: it survives the "
            "process being killed (kill -9, OOM); an OS crash or power cut can lose the writes since the last "
            "clean close, because Milvus Lite fsyncs its log only on close",
    "server": "an acknowledged write is in the Milvus server's log (message queue): what survives a crash of "
              "the server is what its deployment promises (docs/index.md)",
}
_lite_open: set[str] = set()  # .db paths a MilvusIndex holds in this process
_lite_open_lock = threading.Lock()


def _pymilvus():
    return require("pymilvus", INSTALL, "a Milvus index")


def is_lite(uri: str) -> bool:
    return uri.endswith(".db")


def default_collection_name(model_id: str) -> str:
    """`mimic_<first 16 characters of the model id>` (the folder index's default name, made a legal collection name)."""
    return "mimic_" + "".join(c if c.isalnum() or c == "_" else "_" for c in model_id[:16])


class MilvusConnection:
    """One MilvusClient for `uri`, with the errors a user can act on. A Milvus Lite file is claimed for
    this process (one MilvusIndex per `.db`) and released on close, which fsyncs its log."""

    def __init__(self, uri: str, token: str | None = None):
        pymilvus = _pymilvus()
        self.lite = is_lite(uri)
        self.uri = os.path.abspath(uri) if self.lite else uri
        if self.lite:
            os.makedirs(os.path.dirname(self.uri), exist_ok=True)
            with _lite_open_lock:
                if self.uri in _lite_open:
                    raise MimicError(f"Milvus Lite file {self.uri} is already open in this process; close that index "
                                     "first (Milvus Lite allows one user per .db)")
                _lite_open.add(self.uri)
        try:
            self.client = pymilvus.MilvusClient(uri=self.uri, token="" if self.lite else (token or ""),
                                                timeout=CONNECT_TIMEOUT_S)
        except pymilvus.exceptions.MilvusException as exc:
            self._release_lite()
            raise self._open_error(exc) from None

    def _open_error(self, exc) -> MimicError:
        if self.lite and _lite_locked(self.uri):
            return MimicError(f"Milvus Lite file {self.uri} is open in another process; Milvus Lite allows one process "
                              "per .db: stop that process, or let it serve the index (mimic-engine serve) and use its "
                              "HTTP API, or use a Milvus server (--index milvus:http://HOST:19530)")
        if self.lite:
            return MimicError(f"Milvus Lite could not open {self.uri} ({exc.__class__.__name__}: {exc}); "
                              "it must be a new path or a Milvus Lite data folder")
        return MimicError(f"cannot reach the Milvus server at {self.uri} ({exc.__class__.__name__}: {exc}); check the "
                          "address, that the server runs, and MIMIC_MILVUS_TOKEN if it needs a token")

    def _release_lite(self):
        if not self.lite:
            return
        with _lite_open_lock:
            if self.uri not in _lite_open:
                return
            _lite_open.discard(self.uri)
        try:  # stops the in-process Milvus Lite server: fsyncs and checkpoints its log, releases its LOCK
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:
            return
        server_manager_instance.release_server(self.uri)

    def close(self):
        try:
            self.client.close()
        finally:
            self._release_lite()


def _lite_locked(path: str) -> bool:
    """Whether another process holds Milvus Lite's LOCK on the data folder `path`."""
    import fcntl

    lock = os.path.join(path, "LOCK")
    if not os.path.exists(lock):
        return False
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _utf8_size(value: str, what: str) -> int:
    """Bytes of `value` in UTF-8; InputError on a lone UTF-16 surrogate (JSON can carry one, UTF-8 cannot)."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} contains a lone UTF-16 surrogate ({value[exc.start]!r} at position {exc.start}), "
                         "which Milvus (UTF-8) cannot store; send valid Unicode text") from None


def _row(doc: StoredDocument, vector: np.ndarray) -> dict:
    """A document as a Milvus row; InputError when it breaks one of Milvus's limits."""
    name = f"document {doc.id[:80]!r}"
    if _utf8_size(doc.id, f"{name}: the id") > ID_MAX_BYTES:
        raise InputError(f"{name}: the id is {len(doc.id.encode())} bytes in UTF-8; this Milvus index takes ids of at "
                         f"most {ID_MAX_BYTES} bytes: shorten it")
    row = {"id": doc.id, "vector": vector.tolist(), "modality": doc.modality, "absent": 0}
    for bit, field in enumerate(OPTIONAL_FIELDS):
        value = getattr(doc, field)
        if value is None:
            row["absent"] |= 1 << bit
            value = ""
        size = _utf8_size(value, f"{name}: {field}")
        if size > VARCHAR_MAX_BYTES:
            raise InputError(f"{name}: {field} is {size} bytes in UTF-8; a Milvus VARCHAR field holds at most "
                             f"{VARCHAR_MAX_BYTES}: shorten it, or use a folder index, which has no such limit")
        row[field] = value
    size = _utf8_size(json.dumps(doc.metadata, ensure_ascii=False), f"{name}: metadata")
    if size > JSON_MAX_BYTES:
        raise InputError(f"{name}: metadata is {size} bytes as JSON; a Milvus JSON field holds at most {JSON_MAX_BYTES}: "
                         "store less metadata, or use a folder index")
    row["metadata"] = doc.metadata
    return row


def _document(doc_id: str, entity: dict) -> StoredDocument:
    absent = int(entity["absent"])
    optional = {f: None if absent >> bit & 1 else entity[f] for bit, f in enumerate(OPTIONAL_FIELDS)}
    return StoredDocument(id=doc_id, modality=entity["modality"], metadata=entity["metadata"] or {}, **optional)


def _requests(rows: list[dict]):
    """Rows in consecutive groups of at most REQUEST_MAX_BYTES (estimated), at least one row each."""
    group, size = [], 0
    for row in rows:
        row_size = 4 * len(row["vector"]) + sum(len(row[f]) for f in OPTIONAL_FIELDS) + 256
        if group and size + row_size > REQUEST_MAX_BYTES:
            yield group
            group, size = [], 0
        group.append(row)
        size += row_size
    if group:
        yield group


class MilvusIndex(VectorIndex):
    """A Milvus collection behind the index interface (module doc). Thread-safe: reads run concurrently
    (the client is a gRPC channel); writes are serialised within this process."""

    def __init__(self, uri: str, dim: int, model_id: str, collection: str | None = None, M: int | None = None,
                 ef_construction: int | None = None, ef: int | None = None, token: str | None = None,
                 legacy_model_ids: tuple = ()):
        """Open or create the collection (default: named after the model id, or after one of
        `legacy_model_ids` when such a collection exists). M / ef_construction apply when the collection
        is created; ef (search breadth) defaults to the saved value, else 128; passing it saves it."""
        if not isinstance(dim, int) or dim <= 0:
            raise InputError(f"dim={dim!r}: the embedding dimension must be a positive integer")
        if not model_id:
            raise InputError("model_id is empty: pass the encoder's model_id, so the index can refuse vectors of another model")
        if ef is not None:
            check_ef(ef)
        self.dim, self.model_id = dim, model_id
        self._rw = RWLock()  # reads and writes take the shared side; close() the exclusive one
        self._write_mutex = threading.Lock()
        self._closed = False
        self._notes: list[str] = []
        self._conn = MilvusConnection(uri, token)
        self.uri, self.lite, self._client = self._conn.uri, self._conn.lite, self._conn.client
        try:
            existing = set(self._client.list_collections())
            if collection is None:
                own = [default_collection_name(m) for m in (model_id, *legacy_model_ids)]
                collection = next((c for c in own if c in existing), own[0])
            self.collection = collection
            self.path = f"milvus:{self.uri}#{collection}"
            if collection in existing:
                self._check_existing(M, ef_construction, legacy_model_ids)
            else:
                self._create(M, ef_construction)
            saved_ef = self._properties().get("mimic.ef")
            self.ef = int(ef if ef is not None else saved_ef or DEFAULTS["ef"])
            if ef is not None and str(ef) != saved_ef:
                self._client.alter_collection_properties(collection, {"mimic.ef": str(ef)})
            self._client.load_collection(collection)  # a reopened collection starts released
        except BaseException:
            self._conn.close()
            raise

    # ---- opening ------------------------------------------------------------------------------
    def _properties(self) -> dict:
        return self._client.describe_collection(self.collection).get("properties") or {}

    def _create(self, M, ef_construction):
        from pymilvus import DataType, MilvusClient

        self.M = int(M or DEFAULTS["M"])
        self.ef_construction = int(ef_construction or DEFAULTS["ef_construction"])
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("modality", DataType.VARCHAR, max_length=max(map(len, MODALITIES)))
        for field in OPTIONAL_FIELDS:
            schema.add_field(field, DataType.VARCHAR, max_length=VARCHAR_MAX_BYTES)
        schema.add_field("absent", DataType.INT8)
        schema.add_field("metadata", DataType.JSON)
        index_params = self._client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                               params={"M": self.M, "efConstruction": self.ef_construction})
        self._client.create_collection(self.collection, schema=schema, index_params=index_params,
                                       consistency_level=STRONG)
        self._client.alter_collection_properties(self.collection, {
            "mimic.model_id": self.model_id, "mimic.dim": str(self.dim), "mimic.format": str(FORMAT),
            "mimic.M": str(self.M), "mimic.ef_construction": str(self.ef_construction)})

    def _check_existing(self, M, ef_construction, legacy_model_ids):
        props = self._properties()
        if "mimic.model_id" not in props:
            raise IndexMismatchError(f"Milvus collection {self.path} was not made by mimic-engine (it has no "
                                     "mimic.model_id property); choose another collection with --index ...#<name>")
        found, found_dim = props["mimic.model_id"], int(props.get("mimic.dim", -1))
        if found in legacy_model_ids:
            self.model_id = found
        if found != self.model_id or found_dim != self.dim:
            raise model_mismatch(f"Milvus collection {self.path}", found, found_dim, self.model_id, self.dim,
                                 "Use a new --index collection (milvus:<uri>#<name>), or drop this one")
        if int(props.get("mimic.format", FORMAT)) > FORMAT:
            raise IndexMismatchError(f"Milvus collection {self.path} has format {props['mimic.format']}, newer than "
                                     f"this mimic-engine understands ({FORMAT}); upgrade mimic-engine or rebuild the index")
        self.M, self.ef_construction = int(props["mimic.M"]), int(props["mimic.ef_construction"])
        for name, asked in (("M", M), ("ef_construction", ef_construction)):
            if asked is not None and asked != getattr(self, name):
                note = (f"{name}={asked} ignored: this collection was built with {name}={getattr(self, name)}; "
                        "build into a new collection to change it")
                log.warning(note)
                self._notes.append(note)

    # ---- writes -------------------------------------------------------------------------------
    def upsert(self, docs: list[StoredDocument], vectors: np.ndarray) -> int:
        """Insert or replace documents by id. Acknowledged (and visible to searches) on return; an
        upsert larger than REQUEST_MAX_BYTES goes in several requests, each applied on its own."""
        self._check_open()
        if len(docs) == 0:
            return 0
        vecs = checked_upsert(docs, vectors, self.dim)
        rows = [_row(d, v) for d, v in zip(docs, vecs)]
        with self._write_mutex, self._rw.read():
            self._check_open()
            for group in _requests(rows):
                self._client.upsert(self.collection, group)
        return len(docs)

    def delete(self, doc_id: str) -> bool:
        """Remove a document; False if it was not stored (checked first: Milvus counts a delete of a
        missing id as done)."""
        self._check_open()
        with self._write_mutex, self._rw.read():
            self._check_open()
            if not self._client.query(self.collection, filter=_ids_filter([doc_id]), output_fields=["id"],
                                      consistency_level=STRONG):
                return False
            self._client.delete(self.collection, filter=_ids_filter([doc_id]))
        return True

    def flush(self) -> None:
        """Seal the collection's growing data into indexed segments (Milvus Lite: writes its log out)."""
        with self._rw.read():
            self._check_open()
            self._client.flush(self.collection)

    # ---- reads --------------------------------------------------------------------------------
    def _get(self, ids: list[str], fields: list[str]) -> list[dict]:
        with self._rw.read():
            self._check_open()
            return self._client.query(self.collection, filter=_ids_filter(ids), output_fields=fields,
                                      consistency_level=STRONG)

    def get(self, doc_id: str) -> StoredDocument | None:
        rows = self._get([doc_id], OUTPUT_FIELDS)
        return _document(rows[0]["id"], rows[0]) if rows else None

    def get_vector(self, doc_id: str) -> np.ndarray | None:
        rows = self._get([doc_id], ["vector"])
        return np.asarray(rows[0]["vector"], dtype=np.float32) if rows else None

    def existing_ids(self, ids: list[str]) -> set[str]:
        ids = list(ids)  # in parts: a Milvus query returns at most 16384 rows
        return {r["id"] for lo in range(0, len(ids), 4096) for r in self._get(ids[lo:lo + 4096], ["id"])}

    def count(self, modality: str | None = None) -> int:
        check_modality(modality)
        with self._rw.read():
            self._check_open()
            rows = self._client.query(self.collection, filter=_modality_filter(modality), output_fields=["count(*)"],
                                      consistency_level=STRONG)
        return int(rows[0]["count(*)"])

    def search_batch(self, vectors: np.ndarray, k: int, modality: str | None = None) -> list[list[tuple[StoredDocument, float]]]:
        """Per row of vectors (Q, dim): the top-k (document, score) of `modality` (Milvus filters inside
        the HNSW search), best first; fewer when fewer are stored."""
        self._check_open()
        check_k(k)
        if k > MAX_TOPK:
            raise InputError(f"k={k}: Milvus returns at most {MAX_TOPK} results per query; ask for fewer")
        check_modality(modality)
        queries = unit_rows(vectors, self.dim, "search vectors")
        with self._rw.read():
            self._check_open()
            results = self._client.search(
                self.collection, data=queries.tolist(), limit=int(k), filter=_modality_filter(modality),
                output_fields=OUTPUT_FIELDS, consistency_level=STRONG,
                search_params={"metric_type": "IP", "params": {"ef": max(self.ef, int(k))}})  # Milvus needs ef >= k
        return [[(_document(h["id"], h["entity"]), float(h["distance"])) for h in hits] for hits in results]

    def stats(self) -> dict:
        by_modality = {m: self.count(m) for m in MODALITIES}
        return {"backend": BACKEND, "path": self.path, "uri": self.uri, "collection": self.collection,
                "milvus_lite": self.lite, "model_id": self.model_id, "dim": self.dim, "format": FORMAT,
                "count": sum(by_modality.values()), "count_by_modality": by_modality,
                "params": {"space": "ip", "M": self.M, "ef_construction": self.ef_construction, "ef": self.ef},
                "consistency_level": STRONG, "durability": DURABILITY["lite" if self.lite else "server"],
                "notes": list(self._notes)}

    # ---- lifecycle ----------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise IndexClosedError(f"index {self.path} is closed")

    def close(self) -> None:
        """Close the client (Milvus Lite: stop its in-process server, which fsyncs its log). Idempotent."""
        with self._rw.write():
            if self._closed:
                return
            self._closed = True
            self._conn.close()

    def __repr__(self):
        return f"MilvusIndex({self.path!r}, dim={self.dim}, model_id={self.model_id!r})"


def _ids_filter(ids: list[str]) -> str:
    """`id in [...]` with each id a JSON string literal: pymilvus's own ids= path does not escape a backslash,
    and a quote or backslash inside an id must never change the expression."""
    return "id in [" + ", ".join(json.dumps(i, ensure_ascii=False) for i in ids) + "]"


def _modality_filter(modality: str | None) -> str:
    return "" if modality is None else f'modality == "{modality}"'  # modality is checked: one of MODALITIES


def describe_milvus(uri: str, collection: str | None, token: str | None = None) -> dict:
    """Stats of a mimic-engine collection without knowing its model (`mimic-engine index info`). With no
    collection, the database's only mimic-engine collection, or the list of them. Milvus Lite: fails
    while another process holds the file (ask that server's /v1/info instead)."""
    conn = MilvusConnection(uri, token)
    try:
        client = conn.client
        names = [c for c in client.list_collections()
                 if "mimic.model_id" in (client.describe_collection(c).get("properties") or {})]
        if collection is None and len(names) != 1:
            return {"backend": BACKEND, "uri": conn.uri, "collections": names,
                    "note": "name one with --index milvus:<uri>#<collection>" if names else
                            "no mimic-engine collection here; build one with 'mimic-engine index build'"}
        collection = collection or names[0]
        if collection not in names:
            raise MimicError(f"no mimic-engine collection {collection!r} at {conn.uri}; it has "
                             f"{', '.join(names) or 'none'}")
        props = client.describe_collection(collection)["properties"]
    finally:
        conn.close()
    index = MilvusIndex(uri, int(props["mimic.dim"]), props["mimic.model_id"], collection, token=token)
    try:
        return index.stats()
    finally:
        index.close()
