"""The index under a hostile environment, without root: a full disk (SQLite's own SQLITE_FULL through
max_page_count; hnswlib's silently incomplete save), damaged docs.sqlite files, left-over temp files,
and an index.json that points out of its folder."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from mimic_engine.errors import MimicError
from mimic_engine.index import DocumentIndex, StorageFullError, StoreDamagedError, describe
from mimic_engine.index import store as store_module
from mimic_engine.index.hnsw import HnswGraph, SnapshotWriteError, saved_graph_problem
from mimic_engine.index.store import STORE_FILE
from tests.test_index import DIM, docs_for, unit

pytest.importorskip("hnswlib")


def build(path, n=300, seed=0, text_chars=0):
    vecs = unit(np.random.default_rng(seed), n)
    docs = docs_for(range(n))
    for d in docs:
        d.metadata["pad"] = "p" * text_chars
    with DocumentIndex(str(path), dim=DIM, model_id="m") as idx:
        idx.upsert(docs, vecs)
    return vecs


# ---- a full disk --------------------------------------------------------------------------------
def test_sqlite_disk_full_raises_storage_full_and_stores_nothing(tmp_path):
    vecs = build(tmp_path / "i", n=50)
    more = unit(np.random.default_rng(1), 200)
    with DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m") as idx:
        pages = idx.store._w.execute("PRAGMA page_count").fetchone()[0]
        idx.store._w.execute(f"PRAGMA max_page_count={pages}")  # SQLite answers SQLITE_FULL beyond it
        big = docs_for(range(50, 250))
        for d in big:
            d.metadata["pad"] = "x" * 2000
        with pytest.raises(StorageFullError, match=r"disk holding .*docs\.sqlite is full.*not stored.*free disk space"):
            idx.upsert(big, more)
        assert idx.count() == 50 and idx.get("d60") is None  # rolled back, graph untouched
        assert idx.search(vecs[7], k=1)[0][0].id == "d7"
        idx.store._w.execute("PRAGMA max_page_count=1073741823")  # space again: the writer is usable
        idx.upsert(big[:3], more[:3])
        assert idx.count() == 53
    with DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m") as idx:
        assert idx.count() == 53 and idx.get("d52").metadata["pad"] == "x" * 2000


def test_saved_graph_check_finds_every_truncation(tmp_path):
    graph = HnswGraph.create(DIM, 8, 50, 32, 100)
    graph.add(unit(np.random.default_rng(0), 60), np.arange(60), 0)
    path = str(tmp_path / "g.bin")
    graph.index.save_index(path)
    assert saved_graph_problem(path, graph.slots) is None
    data = open(path, "rb").read()
    for cut in (0, 50, 96, len(data) // 2, len(data) - 1):
        with open(path, "wb") as fh:
            fh.write(data[:cut])
        assert saved_graph_problem(path, graph.slots) is not None, cut
    with open(path, "wb") as fh:
        fh.write(data + b"\0")
    assert saved_graph_problem(path, graph.slots) is not None


class TruncatingSave:
    """hnswlib's save_index on a full disk: no exception, the file is cut short (here: at 0 bytes)."""

    def __init__(self, index):
        self.index = index

    def __getattr__(self, name):
        return getattr(self.index, name)

    def save_index(self, path):
        self.index.save_index(path)
        os.truncate(path, 0)


def test_failed_snapshot_keeps_the_last_good_one_and_close_still_works(tmp_path, caplog):
    vecs = build(tmp_path / "i", n=40)
    folder = tmp_path / "i"
    before = json.loads((folder / "index.json").read_text())
    idx = DocumentIndex(str(folder), dim=DIM, model_id="m")
    idx.upsert(docs_for(range(40, 60)), unit(np.random.default_rng(2), 20))
    idx.graph.index = TruncatingSave(idx.graph.index)
    with pytest.raises(SnapshotWriteError, match="is the disk full"):
        idx.flush()
    with caplog.at_level(logging.WARNING):
        idx.close()  # shutdown while "full": the snapshot fails, the folder is still released
    assert "graph snapshot" in caplog.text and "at close failed" in caplog.text
    assert json.loads((folder / "index.json").read_text()) == before
    assert sorted(f for f in os.listdir(folder) if f.startswith("hnsw-")) == [before["snapshot"]["file"]]
    with DocumentIndex(str(folder), dim=DIM, model_id="m") as idx:
        assert idx.count() == 60 and not idx.opened["rebuilt"] and idx.opened["replayed_upserts"] == 20
        assert idx.search(vecs[3], k=1)[0][0].id == "d3"


def test_temp_files_of_failed_writes_are_removed_at_open(tmp_path):
    build(tmp_path / "i", n=10)
    for name in ("index.json.tmp-4242", "hnsw-000000000010.bin.tmp-4242"):
        (tmp_path / "i" / name).write_bytes(b"half written")
    with DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m") as idx:
        assert idx.count() == 10
    assert not [f for f in os.listdir(tmp_path / "i") if ".tmp-" in f]


def test_snapshot_name_outside_the_folder_is_not_followed(tmp_path):
    build(tmp_path / "i", n=20)
    params_file = tmp_path / "i" / "index.json"
    params = json.loads(params_file.read_text())
    outside = tmp_path / "outside.bin"
    (tmp_path / "i" / params["snapshot"]["file"]).rename(outside)
    params["snapshot"]["file"] = "../outside.bin"  # size and CRC match: only the name is wrong
    params_file.write_text(json.dumps(params))
    with DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m") as idx:
        assert idx.opened["rebuilt"] and "'../outside.bin'" in idx.opened["reason"]
        assert idx.count() == 20
    assert json.loads(params_file.read_text())["snapshot"]["file"].startswith("hnsw-")


# ---- a damaged docs.sqlite ------------------------------------------------------------------------
PAGE = 4096


def damage(path, offset, nbytes=PAGE):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("where", ["header", "middle page"])
def test_damaged_store_is_refused_at_open_naming_the_file_and_the_way_out(tmp_path, where):
    build(tmp_path / "i", n=300, text_chars=200)
    store = tmp_path / "i" / STORE_FILE
    assert not os.path.exists(str(store) + "-wal") or os.path.getsize(str(store) + "-wal") == 0
    pages = os.path.getsize(store) // PAGE
    damage(store, 0 if where == "header" else (pages // 2) * PAGE, 100 if where == "header" else PAGE)
    with pytest.raises(StoreDamagedError) as caught:
        DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m")
    message = str(caught.value)
    assert str(store) in message and "backup" in message and "index repair" in message and "index build" in message
    assert isinstance(caught.value, MimicError)  # the CLI prints it as one line, no traceback
    # the folder is not left locked, and the read-only stats say the same
    with pytest.raises(StoreDamagedError):
        DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m")
    if where == "header":
        from mimic_engine.index.repair import repair_store

        with pytest.raises(StoreDamagedError, match="damaged"):
            describe(str(tmp_path / "i"))
        with pytest.raises(StoreDamagedError, match="nothing in .* can be read.*backup"):
            repair_store(str(tmp_path / "i"))


def damage_id_index(store) -> None:
    """Overwrite a middle leaf page of the documents' id index (opening the index never reads it)."""
    import sqlite3

    con = sqlite3.connect(str(store))
    try:
        pages = [p for (p,) in con.execute("SELECT pageno FROM dbstat WHERE name='sqlite_autoindex_docs_1' "
                                           "AND pagetype='leaf' ORDER BY pageno")]
    except sqlite3.OperationalError as exc:
        pytest.skip(f"this SQLite has no dbstat table to find an index page by ({exc})")
    finally:
        con.close()
    assert len(pages) >= 3, pages
    damage(store, (pages[len(pages) // 2] - 1) * PAGE)


def test_damage_met_at_run_time_fails_only_that_read(tmp_path, monkeypatch, caplog):
    """A store too large to check at open (here: no time at all) with one damaged page: reads that meet
    it raise StoreDamagedError (logged with the file); every other read answers."""
    build(tmp_path / "i", n=2000)
    store = tmp_path / "i" / STORE_FILE
    damage_id_index(store)
    monkeypatch.setattr(store_module, "QUICK_CHECK_SECONDS", 0.0)
    with caplog.at_level(logging.WARNING):
        idx = DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m")
    assert "did not finish" in caplog.text
    with idx:
        ok, damaged = 0, 0
        for i in range(2000):
            try:
                ok += idx.get(f"d{i}").id == f"d{i}"
            except StoreDamagedError as exc:
                damaged += 1
                assert str(store) in str(exc)
        assert ok > 0 and damaged > 0, (ok, damaged)
        assert "is damaged" in caplog.text and str(store) in caplog.text


def test_repair_keeps_the_readable_documents_and_names_the_lost(tmp_path):
    from click.testing import CliRunner

    from mimic_engine.index.cli import index_group

    vecs = build(tmp_path / "i", n=2000)
    store = tmp_path / "i" / STORE_FILE
    damage(store, (os.path.getsize(store) // PAGE // 2) * PAGE)  # a page in the middle of the documents
    with pytest.raises(StoreDamagedError, match="mimic-engine index repair"):
        DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m")
    result = CliRunner().invoke(index_group, ["repair", "--index", str(tmp_path / "i")])
    assert result.exit_code == 0, result.output
    assert "kept " in result.output and "damaged file is now" in result.output
    kept = int(result.output.split("kept ")[1].split()[0])
    assert 1000 < kept < 2000, result.output
    assert len([f for f in os.listdir(tmp_path / "i") if ".damaged-" in f]) >= 1
    with DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m") as idx:
        assert idx.count() == kept and idx.opened["rebuilt"]
        present = [i for i in range(2000) if idx.get(f"d{i}") is not None]
        assert len(present) == kept
        for i in present[:: max(1, kept // 20)]:
            assert idx.search(vecs[i], k=1)[0][0].id == f"d{i}"
        # labels stay above every label ever issued: a new document never takes a lost one's label
        idx.upsert(docs_for([5000]), unit(np.random.default_rng(9), 1))
        assert idx.store.seq > 2000
