"""`mimic-engine index repair`: salvage the readable documents of a damaged docs.sqlite.

A scan stops at the first page SQLite cannot read, so each table is read from both ends (rowid
order, then reverse order, as the sqlite3 tool's .dump does): every row before the first and after
the last damaged page is kept, rows in between are lost, and so are rows whose stored values no
longer parse. The ids of lost documents are listed where the id index can still be read, so they
can be upserted again. The damaged file is kept beside the new one (docs.sqlite.damaged-<time>),
and the graph snapshots are removed: the next open rebuilds the graph from the salvaged rows.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time

from ..errors import MimicError
from .document_index import lock_folder
from .hnsw import TEMP_MARK
from .store import STORE_FILE, DocumentStore, StoreDamagedError

DOC_COLUMNS = "id, label, modality, text, caption, image_ref, metadata, embedding"  # the docs table, in order


def _readable_rows(con: sqlite3.Connection, table: str, columns: str) -> dict[int, tuple]:
    """{rowid: row} of the rows of `table` a forward and a backward scan reach."""
    rows = {}
    for order in ("ASC", "DESC"):
        try:
            for row in con.execute(f"SELECT rowid, {columns} FROM {table} ORDER BY rowid {order}"):
                rows[row[0]] = row[1:]
        except sqlite3.DatabaseError:
            continue  # damaged from here on: read what the other end reaches
        break  # the whole table was read
    return rows


def _indexed_ids(con: sqlite3.Connection) -> set[str]:
    """The document ids the id index still knows (also those whose rows are lost)."""
    ids = set()
    for order in ("ASC", "DESC"):
        try:
            ids.update(r[0] for r in con.execute(f"SELECT id FROM docs INDEXED BY sqlite_autoindex_docs_1 ORDER BY id {order}"))
        except sqlite3.DatabaseError:
            continue
        break
    return ids


def _usable(row: tuple, dim: int | None) -> bool:
    """A salvaged docs row whose values still parse: JSON metadata, a float32 vector of the index's dim."""
    try:
        json.loads(row[6])
    except (TypeError, ValueError):
        return False
    return isinstance(row[7], bytes) and (dim is None or len(row[7]) == 4 * dim)


def repair_store(folder: str) -> dict:
    """Replace the folder's damaged docs.sqlite by the rows that can be read. -> a report: documents
    kept and lost, the lost ids known, where the damaged file went, and warnings."""
    folder = os.path.abspath(folder)
    path = os.path.join(folder, STORE_FILE)
    if not os.path.isfile(path):
        raise MimicError(f"{folder} is not an index folder (no {STORE_FILE})")
    lock = lock_folder(folder)  # no server may have it open meanwhile
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            docs = _readable_rows(src, "docs", DOC_COLUMNS)
            tombstones = list(_readable_rows(src, "tombstones", "label, seq").values())
            meta = dict(_readable_rows(src, "meta", "key, value").values())
            indexed = _indexed_ids(src)
        finally:
            src.close()
        if not docs and not meta:
            raise StoreDamagedError(f"nothing in {path} can be read (its header or schema is damaged); restore it "
                                    "from a backup, or rebuild the index ('mimic-engine index build')")
        warnings = []
        if "model_id" not in meta:
            warnings.append("the record of the model that built this index is lost: open it only with that model")
        dim = json.loads(meta["dim"]) if "dim" in meta else None
        kept = [row for row in docs.values() if _usable(row, dim)]
        # the sequence must stay above every label ever issued (labels are never reused)
        meta["seq"] = str(max([int(json.loads(meta.get("seq", "0")))] + [r[1] for r in kept] + [t[0] for t in tombstones]))
        work = os.path.join(folder, f"repair{TEMP_MARK}{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        store = DocumentStore(work)
        try:
            store.restore_rows(kept, tombstones, meta)
        finally:
            store.close()
        damaged = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):  # the damaged file keeps its WAL: it holds committed rows too
            if os.path.exists(path + suffix):
                os.replace(path + suffix, damaged + suffix)
        os.replace(os.path.join(work, STORE_FILE), path)
        shutil.rmtree(work, ignore_errors=True)
        for name in os.listdir(folder):
            if name.startswith("hnsw-"):  # the graph is rebuilt from the salvaged rows at the next open
                os.remove(os.path.join(folder, name))
        kept_ids = {r[0] for r in kept}
        return {"path": folder, "documents_kept": len(kept), "documents_lost_known": sorted(indexed - kept_ids),
                "rows_unusable": len(docs) - len(kept), "damaged_copy": damaged, "warnings": warnings}
    finally:
        lock.close()
