"""DocumentIndex: round trip, modality filter, growth, recall against exact search, k edge cases,
input errors, concurrency. Durability (reopen, crash, repair) is in test_index_durability.py."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from mimic_engine.errors import InputError, MimicError
from mimic_engine.index import DocumentIndex, StoredDocument

pytest.importorskip("hnswlib")

DIM = 16


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def docs_for(ids, modality=lambda i: "text" if i % 3 else "image"):
    out = []
    for i in ids:
        m = modality(i)
        out.append(StoredDocument(f"d{i}", m, text=f"passage {i}" if m == "text" else None,
                                  caption=f"caption {i}" if m == "image" else None,
                                  image_ref=f"dataset:demo:{i}" if m == "image" else None, metadata={"n": i}))
    return out


def exact_topk(corpus, q, k):
    scores = corpus @ q
    return np.argsort(-scores, kind="stable")[:k]


@pytest.fixture
def index(tmp_path):
    idx = DocumentIndex(str(tmp_path / "idx"), dim=DIM, model_id="test-model")
    yield idx
    idx.close()


def test_round_trip_get_search_delete_replace(index):
    rng = np.random.default_rng(0)
    vecs = unit(rng, 50)
    assert index.upsert(docs_for(range(50)), vecs * 3.0) == 50  # stored normalised
    assert index.count() == 50 and index.count("image") == 17 and index.count("text") == 33

    doc = index.get("d4")
    assert doc == StoredDocument("d4", "text", text="passage 4", metadata={"n": 4})
    assert index.get("d3").caption == "caption 3" and index.get("d3").image_ref == "dataset:demo:3"
    assert index.get("nope") is None and index.get_vector("nope") is None
    np.testing.assert_allclose(index.get_vector("d4"), vecs[4], atol=1e-6)

    hits = index.search(vecs[7], k=5)
    assert hits[0][0].id == "d7" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    np.testing.assert_allclose([s for _, s in hits], np.sort(vecs @ vecs[7])[::-1][:5], atol=1e-5)

    # upsert by id replaces: same count, new fields, new vector, the old vector no longer finds it first
    new_vec = unit(rng, 1)[0]
    index.upsert([StoredDocument("d7", "image", caption="new", image_ref="inline:abc")], new_vec[None])
    assert index.count() == 50 and index.count("image") == 18
    assert index.get("d7") == StoredDocument("d7", "image", caption="new", image_ref="inline:abc")
    np.testing.assert_allclose(index.get_vector("d7"), new_vec, atol=1e-6)
    assert index.search(new_vec, k=1)[0][0].id == "d7"
    assert [d.id for d, _ in index.search(vecs[7], k=50)].count("d7") == 1  # one version only

    assert index.delete("d7") is True and index.delete("d7") is False
    assert index.count() == 49 and index.get("d7") is None
    assert "d7" not in [d.id for d, _ in index.search(new_vec, k=49)]


def test_modality_filter_matches_exact_filtered_search(index):
    rng = np.random.default_rng(1)
    vecs = unit(rng, 300)
    docs = docs_for(range(300))
    index.upsert(docs, vecs)
    is_image = np.array([d.modality == "image" for d in docs])
    for q in unit(rng, 10):
        for modality, mask in (("image", is_image), ("text", ~is_image)):
            hits = index.search(q, k=10, modality=modality)
            assert {d.modality for d, _ in hits} == {modality}
            expected = np.flatnonzero(mask)[exact_topk(vecs[mask], q, 10)]
            assert len(set(d.id for d, _ in hits) & {f"d{i}" for i in expected}) >= 9
        assert len(index.search(q, k=10)) == 10


def test_modality_filter_when_the_other_modality_holds_the_highest_labels(index):
    rng = np.random.default_rng(11)
    index.upsert(docs_for(range(5), modality=lambda i: "text"), unit(rng, 5))
    index.upsert(docs_for(range(5, 3005), modality=lambda i: "image"), unit(rng, 3000))
    hits = index.search(unit(rng, 1)[0], k=10, modality="text")
    assert sorted(d.id for d, _ in hits) == [f"d{i}" for i in range(5)]
    assert len(index.search(unit(rng, 1)[0], k=10, modality="image")) == 10


def test_a_rare_modality_is_searched_exactly(index, monkeypatch):
    """A filter that keeps few documents skips the graph (slow for it) and answers by brute force."""
    rng = np.random.default_rng(11)
    is_image = lambda i: i % 50 == 0  # noqa: E731 - 2% images
    vecs = unit(rng, 2000)
    index.upsert(docs_for(range(2000), modality=lambda i: "image" if is_image(i) else "text"), vecs)
    index.delete("d0")  # a deleted image is never returned
    images = np.array([i for i in range(2000) if is_image(i) and i != 0])
    monkeypatch.setattr(index.graph, "knn", lambda *a, **kw: pytest.fail("the graph was searched"))
    q = unit(rng, 3)
    for row, hits in zip(q, index.search_batch(q, k=10, modality="image")):
        expected = images[exact_topk(vecs[images], row, 10)]
        assert [d.id for d, _ in hits] == [f"d{i}" for i in expected]
        np.testing.assert_allclose([s for _, s in hits], vecs[expected] @ row, atol=1e-5)
    assert len(index.search(q[0], k=100, modality="image")) == len(images)  # k beyond the count: all of them
    with pytest.raises(pytest.fail.Exception, match="graph was searched"):
        index.search(q[0], k=10, modality="text")  # the common modality still uses the graph


def test_growth_beyond_initial_capacity_and_slot_reuse(tmp_path):
    rng = np.random.default_rng(2)
    vecs = unit(rng, 1000)
    with DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m", capacity=16) as idx:
        for start in range(0, 1000, 100):
            idx.upsert(docs_for(range(start, start + 100)), vecs[start : start + 100])
        st = idx.stats()
        assert st["count"] == 1000 and st["capacity"] >= 1000 and st["slots_used"] == 1000
        for i in (0, 517, 999):
            assert idx.search(vecs[i], k=1)[0][0].id == f"d{i}"
        # replacing documents reuses the slots of their old versions: the graph does not grow
        for _ in range(3):
            idx.upsert(docs_for(range(200)), unit(rng, 200))
        assert idx.stats()["slots_used"] == 1000 and idx.count() == 1000


def test_hnsw_recall_at_10_against_exact_search(tmp_path):
    rng = np.random.default_rng(3)
    corpus, queries = unit(rng, 5000, 64), unit(rng, 200, 64)
    with DocumentIndex(str(tmp_path / "i"), dim=64, model_id="m") as idx:
        idx.upsert([StoredDocument(f"d{i}", "text", text="x") for i in range(5000)], corpus)
        results = idx.search_batch(queries, k=10)
    recall = np.mean([
        len({d.id for d, _ in hits} & {f"d{i}" for i in exact_topk(corpus, q, 10)}) / 10
        for q, hits in zip(queries, results)])
    assert recall >= 0.95, f"Recall@10 = {recall:.3f}"


def test_k_larger_than_count_and_deleted_elements_near_live_count(index):
    rng = np.random.default_rng(4)
    vecs = unit(rng, 200)
    index.upsert(docs_for(range(5)), vecs[:5])
    hits = index.search(vecs[0], k=100)
    assert sorted(d.id for d, _ in hits) == [f"d{i}" for i in range(5)]

    index.upsert(docs_for(range(5, 200)), vecs[5:])
    for i in range(0, 200, 4):  # keep 50 of 200; every deleted element still sits in the graph
        if i % 8:
            index.delete(f"d{i}")
    live = {f"d{i}" for i in range(200) if not (i % 4 == 0 and i % 8)}
    assert index.count() == len(live)
    for k in (len(live) - 1, len(live), len(live) + 10, 1000):
        for q in unit(rng, 3):
            hits = index.search(q, k=k)
            assert len(hits) == min(k, len(live)) and {d.id for d, _ in hits} <= live
            assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    n_img = index.count("image")
    hits = index.search(vecs[1], k=n_img, modality="image")
    assert len(hits) == n_img and {d.modality for d, _ in hits} == {"image"}
    # batch form, several rows at once, k above the live count
    assert [len(h) for h in index.search_batch(unit(rng, 4), k=500, modality="text")] == [index.count("text")] * 4


def test_empty_index_and_bad_input(index):
    rng = np.random.default_rng(5)
    assert index.search(unit(rng, 1)[0], k=3) == []
    index.upsert(docs_for(range(3)), unit(rng, 3))
    q = unit(rng, 1)[0]
    for k in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="k="):
            index.search(q, k=k)
    with pytest.raises(InputError, match=r"expected shape \(N, 16\)"):
        index.search(np.zeros(8, np.float32), k=1)
    with pytest.raises(InputError, match="shape"):
        index.search(np.zeros(0, np.float32), k=1)
    with pytest.raises(InputError, match="zero vector"):
        index.search(np.zeros(DIM, np.float32), k=1)
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full(DIM, np.nan, np.float32), k=1)
    with pytest.raises(InputError, match="modality='video'"):
        index.search(q, k=1, modality="video")
    with pytest.raises(InputError, match="2 documents but 1 vectors"):
        index.upsert(docs_for(range(2)), unit(rng, 1))
    with pytest.raises(InputError, match="appears twice"):
        index.upsert(docs_for([1, 1]), unit(rng, 2))
    with pytest.raises(InputError, match="modality='audio'"):
        index.upsert([StoredDocument("x", "audio")], unit(rng, 1))
    with pytest.raises(InputError, match="not JSON"):
        index.upsert([StoredDocument("x", "text", text="t", metadata={"a": object()})], unit(rng, 1))
    assert index.count() == 3  # nothing half-written


def test_concurrent_searches_while_upserting_and_deleting(index):
    rng = np.random.default_rng(6)
    vecs = unit(rng, 1200)
    index.upsert(docs_for(range(200)), vecs[:200])
    errors, stop = [], threading.Event()

    def searcher(seed):
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                q = unit(r, 1)[0]
                for modality in (None, "image", "text"):
                    hits = index.search(q, k=20, modality=modality)
                    assert len(hits) == 20 and (modality is None or {d.modality for d, _ in hits} == {modality})
                index.search_batch(unit(r, 3), k=5)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def writer():
        try:
            for start in range(200, 1200, 50):
                index.upsert(docs_for(range(start, start + 50)), vecs[start : start + 50])
                index.delete(f"d{start - 100}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    w = threading.Thread(target=writer)
    w.start()
    w.join(60)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    deleted = {f"d{s - 100}" for s in range(200, 1200, 50)}
    assert index.count() == 1200 - len(deleted)
    for i in range(0, 1200, 7):
        hit = index.search(vecs[i], k=1)
        assert (f"d{i}" in deleted) or hit[0][0].id == f"d{i}"
        assert (index.get(f"d{i}") is None) == (f"d{i}" in deleted)


def test_second_open_of_a_folder_is_refused(index):
    with pytest.raises(MimicError, match="open in another process"):
        DocumentIndex(index.path, dim=DIM, model_id="test-model")


def test_closed_index_refuses_calls(tmp_path):
    idx = DocumentIndex(str(tmp_path / "i"), dim=DIM, model_id="m")
    idx.close()
    idx.close()  # idempotent
    with pytest.raises(MimicError, match="closed"):
        idx.search(np.ones(DIM, np.float32), k=1)


class _ReachLimitedIndex:
    """An hnswlib.Index stand-in whose graph can reach only `reach` results per query (as a badly
    damaged graph may): asking for more raises hnswlib's own error."""

    def __init__(self, index, reach):
        self.index, self.reach = index, reach

    def knn_query(self, data, k=1, num_threads=-1, filter=None):
        if k > self.reach:
            raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")
        return self.index.knn_query(data, k=k, num_threads=num_threads, filter=filter)

    def __getattr__(self, name):
        return getattr(self.index, name)


def test_unreachable_results_fall_back_to_exact_search_or_the_largest_k(index, monkeypatch):
    from mimic_engine.index import hnsw

    rng = np.random.default_rng(7)
    vecs = unit(rng, 100)
    docs = docs_for(range(100))
    index.upsert(docs, vecs)
    index.graph.index = _ReachLimitedIndex(index.graph.index, reach=7)
    is_text = np.array([d.modality == "text" for d in docs])
    q = unit(rng, 2)
    # small live set: answered exactly, so every requested result comes back
    hits = index.search_batch(q, k=20, modality="text")
    for row, hit in zip(q, hits):
        expected = np.flatnonzero(is_text)[exact_topk(vecs[is_text], row, 20)]
        assert [d.id for d, _ in hit] == [f"d{i}" for i in expected]
        np.testing.assert_allclose([s for _, s in hit], vecs[expected] @ row, atol=1e-5)
    # large live set: the largest k the graph can answer
    monkeypatch.setattr(hnsw, "EXACT_FALLBACK_MAX", 10)
    hits = index.search(q[0], k=20)
    assert len(hits) == 7 and [d.id for d, _ in hits] == [f"d{i}" for i in exact_topk(vecs, q[0], 7)]
