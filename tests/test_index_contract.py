"""The index interface's contract, run against every backend: the hnswlib + SQLite folder, Milvus Lite,
and (marked slow) a real Milvus standalone server from PyPI's `milvus` package on loopback ports.

upsert / replace / delete / get / search / modality filter / reopen / model-id refusal / bad input; then
what only Milvus has (its field limits, one process per Milvus Lite file) and the `--index` selection.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from mimic_engine.errors import ConfigError, InputError, MimicError
from mimic_engine.index import IndexClosedError, IndexMismatchError, StoredDocument, VectorIndex, open_index
from mimic_engine.index.selection import MilvusTarget, milvus_target

DIM = 16
MODEL = "contract-model-0123456789"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def docs_for(ids, modality=lambda i: "text" if i % 4 else "image"):
    return [StoredDocument(f"d{i}", modality(i), text=f"passage {i}" if modality(i) == "text" else None,
                           caption=f"caption {i}" if modality(i) == "image" else None,
                           image_ref=f"dataset:demo:{i}" if modality(i) == "image" else None, metadata={"n": i})
            for i in ids]


SERVER_START_S = 300  # the first start unpacks the server's binaries
SERVER_LIFETIME_S = 900  # a watchdog kills the server after this, so a hung call cannot hang the run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """PyPI's `milvus` standalone server in its own process group, stopped by SIGKILL to that group (it
    ignores SIGTERM). -> its URI. It listens on all interfaces whatever its configuration says; the
    components advertise 127.0.0.1, so all of this test's traffic stays on loopback."""
    pytest.importorskip("milvus", reason="the Milvus server package is not installed: pip install milvus")
    pytest.importorskip("pymilvus", reason="pymilvus is not installed: pip install 'mimic-engine[milvus]'")
    import shutil

    exe = shutil.which("milvus-server") or pytest.skip("the milvus package's milvus-server command is not on PATH")
    root = tmp_path_factory.mktemp("milvus-server")
    port = free_port()
    loopback = [a for c in ("proxy", "rootCoord", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
                for a in ("--extra-config", f"{c}.ip=127.0.0.1")]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([exe, "--data", str(root / "data"), "--proxy-port", str(port), *loopback],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: the wrapper and the milvus binary it started
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(SERVER_LIFETIME_S, kill)
    watchdog.start()
    try:
        deadline = time.time() + SERVER_START_S
        while b"Welcome to use Milvus" not in (root / "server.log").read_bytes():
            if proc.poll() is not None or time.time() > deadline:
                tail = (root / "server.log").read_bytes()[-2000:].decode(errors="replace")
                pytest.fail(f"the Milvus server did not start within {SERVER_START_S} s (exit code {proc.poll()}): {tail}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        watchdog.cancel()
        kill()
        proc.wait(30)
        log.close()


@pytest.fixture(params=["folder", "milvus-lite", pytest.param("milvus-server", marks=pytest.mark.slow)])
def spec(request, tmp_path):
    """An `--index` value of each backend, in a fresh temporary place (a new collection on the server)."""
    if request.param == "folder":
        pytest.importorskip("hnswlib", reason="hnswlib is not installed: pip install 'mimic-engine[serve]'")
        return str(tmp_path / "folder-index")
    if request.param == "milvus-server":
        return f"milvus:{request.getfixturevalue('milvus_server')}#t_{uuid.uuid4().hex[:12]}"
    pytest.importorskip("pymilvus", reason="pymilvus is not installed: pip install 'mimic-engine[milvus]'")
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install 'mimic-engine[milvus]'")
    return f"milvus:{tmp_path / 'lite.db'}"


@pytest.fixture
def index(spec):
    idx = open_index(spec, DIM, MODEL)
    yield idx
    idx.close()


def test_upsert_get_replace_delete(index):
    assert isinstance(index, VectorIndex)
    rng = np.random.default_rng(0)
    vecs = unit(rng, 20)
    assert index.upsert(docs_for(range(20)), vecs * 3.0) == 20  # stored normalised
    assert (index.count(), index.count("text"), index.count("image")) == (20, 15, 5)
    assert index.get("d1") == StoredDocument("d1", "text", text="passage 1", metadata={"n": 1})
    assert index.get("d4") == StoredDocument("d4", "image", caption="caption 4", image_ref="dataset:demo:4",
                                             metadata={"n": 4})
    np.testing.assert_allclose(index.get_vector("d1"), vecs[1], atol=1e-6)
    assert index.get("nope") is None and index.get_vector("nope") is None
    assert index.existing_ids(["d2", "d19", "nope"]) == {"d2", "d19"} and index.existing_ids([]) == set()

    # an empty string and None stay apart; nested metadata comes back as sent
    odd = StoredDocument("d1", "image", text=None, caption="", image_ref="", metadata={"a": [1, {"b": None}], "é": "ü"})
    index.upsert([odd], vecs[0])  # replaces d1: now an image with d0's vector
    assert index.get("d1") == odd and index.count() == 20 and index.count("image") == 6
    hits = index.search(vecs[0], k=2)
    assert {d.id for d, _ in hits} == {"d0", "d1"} and all(s == pytest.approx(1.0, abs=1e-5) for _, s in hits)

    assert index.delete("d1") is True and index.delete("d1") is False
    assert index.get("d1") is None and index.count() == 19
    assert "d1" not in [d.id for d, _ in index.search(vecs[0], k=5)]  # a delete is visible to the next search


def test_search_scores_and_order_match_exact_search(index):
    rng = np.random.default_rng(1)
    vecs = unit(rng, 200)
    index.upsert(docs_for(range(200)), vecs)
    for q in (3, 77, 150):
        hits = index.search(vecs[q], k=10)
        assert hits[0][0].id == f"d{q}" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose([s for _, s in hits], np.sort(vecs @ vecs[q])[::-1][:10], atol=1e-4)
    batch = index.search_batch(vecs[:3], k=4)
    assert [hits[0][0].id for hits in batch] == ["d0", "d1", "d2"] and all(len(h) == 4 for h in batch)
    assert len(index.search(vecs[0], k=1000)) == 200  # k beyond the count: all of them


def test_modality_filter_returns_the_best_k_of_that_modality(index):
    rng = np.random.default_rng(2)
    vecs = unit(rng, 300)
    images = {i for i in range(300) if i % 25 == 0}  # 12 image documents among 300
    index.upsert(docs_for(range(300), lambda i: "image" if i in images else "text"), vecs)
    q = unit(rng, 1)[0]
    order = [i for i in np.argsort(-(vecs @ q), kind="stable") if i in images]
    hits = index.search(q, k=5, modality="image")
    assert [d.id for d, _ in hits] == [f"d{i}" for i in order[:5]]
    assert all(d.modality == "image" for d, _ in hits)
    assert len(index.search(q, k=50, modality="image")) == 12
    assert all(d.modality == "text" for d, _ in index.search(q, k=20, modality="text"))


def test_reopen_keeps_documents_and_ef(spec):
    rng = np.random.default_rng(3)
    vecs = unit(rng, 30)
    with open_index(spec, DIM, MODEL, ef=77) as idx:
        idx.upsert(docs_for(range(30)), vecs)
        idx.delete("d5")
    with open_index(spec, DIM, MODEL) as idx:
        assert idx.count() == 29 and idx.get("d5") is None and idx.get("d6").text == "passage 6"
        assert idx.stats()["params"]["ef"] == 77
        assert idx.search(vecs[6], k=1)[0][0].id == "d6"
        idx.upsert(docs_for([5]), vecs[5])
    with open_index(spec, DIM, MODEL) as idx:
        assert idx.search(vecs[5], k=1)[0][0].id == "d5"


def test_another_model_is_refused_and_a_legacy_id_accepted(spec):
    with open_index(spec, DIM, MODEL) as idx:
        idx.upsert(docs_for([1]), unit(np.random.default_rng(4), 1))
    target = milvus_target(spec)
    where = spec if target is None or target.collection else spec + "#mimic_" + MODEL[:16].replace("-", "_")
    for model, dim in (("other-model", DIM), (MODEL, DIM + 1)):
        with pytest.raises(IndexMismatchError, match="vectors of different models cannot be compared") as err:
            open_index(where, dim, model)
        assert MODEL in str(err.value) and "mimic-engine index build" in str(err.value)
    # an index recorded under an older id of the same model opens with it and keeps that id
    with open_index(spec, DIM, "new-content-hash-id", legacy_model_ids=(MODEL,)) as idx:
        assert idx.model_id == MODEL and idx.count() == 1


def test_bad_input_is_refused_with_the_bad_value(index):
    rng = np.random.default_rng(5)
    good = unit(rng, 1)
    cases = [
        (lambda: index.upsert(docs_for([1]), np.zeros((1, DIM))), "zero vector"),
        (lambda: index.upsert(docs_for([1]), np.full((1, DIM), np.nan)), "NaN"),
        (lambda: index.upsert(docs_for([1]), unit(rng, 1, DIM + 1)), f"expected shape \\(N, {DIM}\\)"),
        (lambda: index.upsert(docs_for([1, 2]), good), "2 documents but 1 vectors"),
        (lambda: index.upsert(docs_for([1, 1]), unit(rng, 2)), "appears twice"),
        (lambda: index.upsert([StoredDocument("", "text", text="x")], good), "non-empty string"),
        (lambda: index.upsert([StoredDocument("x", "video", text="x")], good), "modality='video'"),
        (lambda: index.upsert([StoredDocument("x", "text", text="x", metadata={"f": object()})], good), "JSON"),
        (lambda: index.search(good[0], k=0), "k=0"),
        (lambda: index.search(good[0], k=3, modality="audio"), "modality='audio'"),
        (lambda: index.search(good, k=3), "use search_batch"),
        (lambda: index.count("audio"), "modality='audio'"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()
    assert index.count() == 0 and index.upsert([], np.zeros((0, DIM))) == 0
    assert index.search(good[0], k=3) == [] and index.search(good[0], k=3, modality="image") == []


def test_ids_with_quotes_slashes_and_unicode(index):
    ids = ['a"b', "c\\d", "e'f", "ü/ñ 中", 'x" or id != "y']
    rng = np.random.default_rng(6)
    vecs = unit(rng, len(ids))
    index.upsert([StoredDocument(i, "text", text=f"text of {i}") for i in ids], vecs)
    for i, v in zip(ids, vecs):
        assert index.get(i).text == f"text of {i}" and index.search(v, k=1)[0][0].id == i
    assert index.delete('x" or id != "y') is True and index.count() == len(ids) - 1  # deletes only itself
    assert index.existing_ids(ids) == set(ids[:-1])


def test_a_closed_index_refuses_calls(spec):
    idx = open_index(spec, DIM, MODEL)
    idx.close()
    idx.close()  # idempotent
    for call in (lambda: idx.get("x"), lambda: idx.search(np.ones(DIM), k=1), lambda: idx.delete("x"),
                 lambda: idx.upsert(docs_for([1]), np.ones((1, DIM)))):
        with pytest.raises(IndexClosedError):
            call()


def test_stats_name_the_backend_and_its_parameters(index):
    index.upsert(docs_for(range(4)), unit(np.random.default_rng(7), 4))
    stats = index.stats()
    assert stats["backend"] in ("folder", "milvus") and stats["model_id"] == MODEL and stats["dim"] == DIM
    assert stats["count"] == 4 and stats["count_by_modality"] == {"text": 3, "image": 1}
    assert stats["params"] == {"space": "ip", "M": 32, "ef_construction": 200, "ef": 128}


# ---- Milvus only ----------------------------------------------------------------------------------
@pytest.fixture
def lite(tmp_path):
    pytest.importorskip("pymilvus", reason="pymilvus is not installed: pip install 'mimic-engine[milvus]'")
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install 'mimic-engine[milvus]'")
    return str(tmp_path / "lite.db")


def test_milvus_limits_are_checked_before_the_call(lite):
    from mimic_engine.index.milvus import ID_MAX_BYTES, JSON_MAX_BYTES, VARCHAR_MAX_BYTES

    v = np.ones((1, DIM), np.float32)
    with open_index(f"milvus:{lite}", DIM, MODEL) as idx:
        cases = [
            (StoredDocument("a", "text", text="é" * (VARCHAR_MAX_BYTES // 2 + 1)), f"at most {VARCHAR_MAX_BYTES}"),
            (StoredDocument("a", "image", caption="x" * (VARCHAR_MAX_BYTES + 1)), "caption is 65536 bytes"),
            (StoredDocument("a", "text", text="x", metadata={"k": "x" * JSON_MAX_BYTES}), "metadata is"),
            (StoredDocument("é" * (ID_MAX_BYTES // 2 + 1), "text", text="x"), f"at most {ID_MAX_BYTES} bytes"),
            (StoredDocument("a", "text", text="bad \ud800 text"), "lone UTF-16 surrogate"),
            (StoredDocument("a", "text", text="x", metadata={"k": "\udfff"}), "metadata.k holds a lone UTF-16 surrogate"),
        ]
        for doc, message in cases:
            with pytest.raises(InputError, match=message):
                idx.upsert([doc], v)
        with pytest.raises(InputError, match="at most 16384"):
            idx.search(v[0], k=16385)
        assert idx.count() == 0
        idx.upsert([StoredDocument("a", "text", text="é" * (VARCHAR_MAX_BYTES // 2))], v)  # the limit itself fits
        assert len(idx.get("a").text) == VARCHAR_MAX_BYTES // 2


def test_one_process_per_milvus_lite_file(lite):
    with open_index(f"milvus:{lite}", DIM, MODEL):
        with pytest.raises(MimicError, match="already open in this process"):
            open_index(f"milvus:{lite}", DIM, MODEL)
        code = ("import sys; from mimic_engine.index import open_index\n"
                "try:\n    open_index(sys.argv[1], 16, 'm')\nexcept Exception as e:\n    print(type(e).__name__, e)")
        out = subprocess.run([sys.executable, "-c", code, f"milvus:{lite}"], capture_output=True, text=True,
                             timeout=120, cwd=ROOT).stdout
        assert out.startswith("MimicError") and "open in another process" in out, out
    with open_index(f"milvus:{lite}", DIM, MODEL) as idx:  # closing released the file
        assert idx.count() == 0


def test_describe_reads_a_collection_without_knowing_its_model(lite):
    from mimic_engine.index import describe_index

    with open_index(f"milvus:{lite}", DIM, MODEL) as idx:
        idx.upsert(docs_for(range(3)), unit(np.random.default_rng(8), 3))
    info = describe_index(f"milvus:{lite}")
    assert info["backend"] == "milvus" and info["model_id"] == MODEL and info["count"] == 3
    assert info["collection"] == "mimic_contract_model_0" and "kill -9" in info["durability"]
    with pytest.raises(MimicError, match="no mimic-engine collection 'nope'"):
        describe_index(f"milvus:{lite}#nope")


def test_index_values_select_the_backend():
    assert milvus_target("/data/index") is None and milvus_target("milvus-folder") is None
    assert milvus_target("milvus:./x.db") == MilvusTarget("./x.db", None)
    assert milvus_target("milvus:http://10.0.0.5:19530#webqa") == MilvusTarget("http://10.0.0.5:19530", "webqa")
    for bad, message in (("milvus:./x.sqlite", "ending in .db"), ("milvus:", "ending in .db"),
                         ("milvus:http://", "ending in .db"), ("milvus:./x.db#9lives", "not a Milvus collection name"),
                         ("milvus:./x.db#a-b", "not a Milvus collection name")):
        with pytest.raises(ConfigError, match=message):
            milvus_target(bad)
