"""What survives: reopen after close, a graph snapshot that lags the store (replayed), a damaged or
missing snapshot (rebuilt), another model's vectors (refused), and kill -9 of a writing process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mimic_engine.index import DocumentIndex, DocumentStore, IndexMismatchError, describe
from tests.test_index import DIM, docs_for, unit

pytest.importorskip("hnswlib")

REPO = str(Path(__file__).resolve().parents[1])


def build(path, n=300, seed=0, **kw):
    vecs = unit(np.random.default_rng(seed), n)
    with DocumentIndex(path, dim=DIM, model_id="m", **kw) as idx:
        idx.upsert(docs_for(range(n)), vecs)
    return vecs


def assert_consistent(idx, vecs, live_ids):
    """Every live document is stored and found first by its own vector; nothing else is."""
    assert idx.count() == len(live_ids)
    for i in sorted(live_ids)[:: max(1, len(live_ids) // 40)]:
        assert idx.search(vecs[i], k=1)[0][0].id == f"d{i}"
    everything = idx.search(vecs[0], k=len(vecs) + 10)
    assert sorted(d.id for d, _ in everything) == sorted(f"d{i}" for i in live_ids)


def test_reopen_after_close_uses_the_snapshot_and_keeps_ef(tmp_path):
    path = str(tmp_path / "i")
    vecs = build(path, ef=77)
    with DocumentIndex(path, dim=DIM, model_id="m") as idx:
        assert idx.opened["rebuilt"] is False and idx.opened["replayed_upserts"] == 0
        assert idx.ef == 77 and idx.graph.index.ef == 77  # ef is not in hnswlib's file: restored from index.json
        assert_consistent(idx, vecs, set(range(300)))
        before = [d.id for d, _ in idx.search(vecs[3], k=10)]
    with DocumentIndex(path, dim=DIM, model_id="m", ef=200) as idx:
        assert idx.graph.index.ef == 200 and [d.id for d, _ in idx.search(vecs[3], k=10)] == before
        assert json.loads((tmp_path / "i" / "index.json").read_text())["ef"] == 200
        idx.set_ef(64)
        # read-only stats work while the folder is held open
        st = describe(path)
        assert st["count"] == 300 and st["params"]["ef"] == 64 and st["snapshot_lag"] == 0
    with DocumentIndex(path, dim=DIM, model_id="m") as idx:
        assert idx.ef == 64 == idx.graph.index.ef


def test_store_ahead_of_snapshot_is_replayed(tmp_path):
    """Acknowledged writes that never reached a graph snapshot (a crash before flush)."""
    path = str(tmp_path / "i")
    vecs = build(path, n=300)
    extra = unit(np.random.default_rng(9), 50)
    all_vecs = np.concatenate([vecs, extra])
    store = DocumentStore(path)  # write as the crashed process did: store only, no graph snapshot
    store.write(docs_for(range(300, 350)), extra)
    replaced = unit(np.random.default_rng(10), 10)
    store.write(docs_for(range(10)), replaced)
    all_vecs[:10] = replaced
    for i in (20, 21, 305):
        store.delete(f"d{i}")
    store.close()
    with DocumentIndex(path, dim=DIM, model_id="m") as idx:
        assert idx.opened["rebuilt"] is False
        # 60 new versions (d305 added then deleted: never in the graph); 10 old versions + d20, d21 deleted
        assert idx.opened["replayed_upserts"] == 59 and idx.opened["replayed_deletes"] == 12
        assert_consistent(idx, all_vecs, set(range(350)) - {20, 21, 305})
    with DocumentIndex(path, dim=DIM, model_id="m") as idx:  # that replay was snapshotted on close
        assert idx.opened["replayed_upserts"] == 0 and idx.opened["rebuilt"] is False


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "remove", "params_garbage", "params_removed"])
def test_damaged_or_missing_snapshot_is_rebuilt_from_the_store(tmp_path, damage):
    path = tmp_path / "i"
    vecs = build(str(path), n=300)
    snap = next(path.glob("hnsw-*.bin"))
    data = bytearray(snap.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
        snap.write_bytes(bytes(data))
    elif damage == "truncate":
        snap.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "remove":
        snap.unlink()
    elif damage == "params_garbage":
        (path / "index.json").write_text("{not json")
    else:
        (path / "index.json").unlink()
    with DocumentIndex(str(path), dim=DIM, model_id="m") as idx:
        assert idx.opened["rebuilt"] is True and idx.opened["reason"]
        assert_consistent(idx, vecs, set(range(300)))
    with DocumentIndex(str(path), dim=DIM, model_id="m") as idx:  # the rebuilt graph was snapshotted
        assert idx.opened["rebuilt"] is False


def test_another_model_or_dim_is_refused_with_both_names(tmp_path):
    path = str(tmp_path / "i")
    build(path, n=5)
    with pytest.raises(IndexMismatchError, match=r"model 'm' \(dim 16\).*model 'other' \(dim 16\).*new --index folder"):
        DocumentIndex(path, dim=DIM, model_id="other")
    with pytest.raises(IndexMismatchError, match=r"dim 32"):
        DocumentIndex(path, dim=32, model_id="m")
    with DocumentIndex(path, dim=DIM, model_id="m") as idx:  # the refusal released the folder
        assert idx.count() == 5


_CHILD = r"""
import sys
import numpy as np
sys.path.insert(0, {repo!r})
from mimic_engine.index import DocumentIndex, StoredDocument
rng = np.random.default_rng(0)
idx = DocumentIndex({path!r}, dim=16, model_id="m", snapshot_every=40)  # snapshots happen mid-loop too
print("ready", flush=True)
i = 0
while True:
    v = rng.standard_normal((2, 16)).astype(np.float32)
    idx.upsert([StoredDocument(f"d{{i}}", "text", text=str(i)), StoredDocument(f"d{{i + 1}}", "image", caption="c")], v)
    print(f"ack d{{i}} d{{i + 1}}", flush=True)
    if i % 10 == 0 and i:
        assert idx.delete(f"d{{i - 5}}")
        print(f"del d{{i - 5}}", flush=True)
    i += 2
"""


def test_kill_9_while_writing_loses_nothing_acknowledged(tmp_path):
    path = str(tmp_path / "i")
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=REPO, path=path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked, deleted = set(), set()
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        deadline = time.monotonic() + 8
        while len(acked) < 400 and time.monotonic() < deadline:
            line = child.stdout.readline().split()
            if not line:
                break
            (acked.update if line[0] == "ack" else deleted.update)(line[1:])
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert len(acked) >= 50, f"the child acknowledged only {len(acked)} documents: {child.stderr.read()}"
    with DocumentIndex(path, dim=DIM, model_id="m") as idx:
        for doc_id in acked - deleted:
            assert idx.get(doc_id) is not None, f"{doc_id} was acknowledged but is gone"
        for doc_id in deleted:
            assert idx.get(doc_id) is None, f"{doc_id} was deleted (acknowledged) but is back"
        # the graph agrees with the store: every stored document is found by its own vector
        assert idx.count() >= len(acked - deleted)
        for doc_id in sorted(acked - deleted)[::25]:
            assert idx.search(idx.get_vector(doc_id), k=1)[0][0].id == doc_id


def test_a_failed_snapshot_does_not_fail_an_acknowledged_write(tmp_path, monkeypatch):
    import numpy as np

    from mimic_engine.index import DocumentIndex, StoredDocument

    idx = DocumentIndex(str(tmp_path / "idx"), 8, "model-a")
    idx.snapshot_every = 1

    def disk_full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(idx, "flush", disk_full)
    vec = np.eye(8, dtype=np.float32)[:2]
    assert idx.upsert([StoredDocument("a", "text", text="x"), StoredDocument("b", "text", text="y")], vec) == 2
    assert idx.get("a") is not None and idx.count() == 2
    monkeypatch.undo()
    idx.close()
    again = DocumentIndex(str(tmp_path / "idx"), 8, "model-a")
    assert again.count() == 2 and again.search(vec[1], 1)[0][0].id == "b"
    again.close()
