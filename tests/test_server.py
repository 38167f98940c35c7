"""The HTTP API end to end on a tiny model and a real index (FastAPI TestClient); the tests on the
`client` fixture run against each index backend (a folder and Milvus Lite)."""
import base64
import json
import threading

import numpy as np
import pytest

from mimic_engine.preprocess import Item
from mimic_engine.runtime.torch_backend import TorchBackend
from mimic_engine.server.app import create_app
from mimic_engine.server.settings import ServerSettings
from tests.conftest import make_image_bytes

KEY = "s3cret-key"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_client(encoders, index_spec, **overrides):
    """-> (TestClient, backend) over the index `index_spec` names (a folder, or milvus:<uri>)."""
    from fastapi.testclient import TestClient

    from mimic_engine.index import open_index

    enc = encoders("decoder")
    backend = TorchBackend.from_encoder(enc)
    index = open_index(str(index_spec), backend.dim, backend.model_id)
    settings = ServerSettings(**{"max_wait_ms": 2.0, **overrides})
    return TestClient(create_app(settings, backend, index)), backend


@pytest.fixture(params=["folder", "milvus-lite"])
def client(request, tiny_encoders, tmp_path):
    if request.param == "milvus-lite":
        pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install 'mimic-engine[milvus]'")
    spec = tmp_path / "index" if request.param == "folder" else f"milvus:{tmp_path / 'index.db'}"
    c, backend = make_client(tiny_encoders, spec, api_key=KEY)
    with c:
        c.backend = backend
        c.headers["X-API-Key"] = KEY
        yield c


CAT, BUS, NIGHT = make_image_bytes(11), make_image_bytes(12, size=(50, 40)), make_image_bytes(13, fmt="JPEG")
DOCS = [
    {"id": "t1", "text": "the red bus drives over the old stone bridge", "metadata": {"lang": "en"}},
    {"id": "t2", "text": "a recipe for bread with rye flour and seeds"},
    {"id": "t3", "text": "mountain weather changes fast in the afternoon"},
    {"id": "i1", "image": b64(CAT), "caption": "a cat on a sofa", "metadata": {"source": "test"}},
    {"id": "i2", "image": b64(BUS)},
    {"id": "i3", "images": [b64(NIGHT), b64(CAT)], "caption": "two photos", "image_ref": "file:///photos/3"},
]


def upsert(client, docs):
    r = client.post("/v1/documents", json={"documents": docs})
    assert r.status_code == 200, r.text
    return r.json()


def search(client, query, k=3, modality=None):
    r = client.post("/v1/search", json={"query": query, "k": k, "modality": modality})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_text_and_image_search(client):
    assert upsert(client, DOCS) == {"upserted": 6, "truncated": [False] * 6}
    hits = search(client, {"text": DOCS[0]["text"]})
    assert hits[0]["id"] == "t1" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0] == {**hits[0], "modality": "text", "text": DOCS[0]["text"], "caption": None,
                       "metadata": {"lang": "en"}, "image_ref": None}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # image-only query finds the identical image-only document
    hit = search(client, {"image": b64(BUS)}, k=1)[0]
    assert hit["id"] == "i2" and hit["score"] == pytest.approx(1.0, abs=1e-4) and hit["modality"] == "image"
    assert hit["image_ref"].startswith("inline:")  # sha256 of the uploaded bytes
    # image + caption query finds the identical image document and returns its stored fields
    hit = search(client, {"image": b64(CAT), "caption": "a cat on a sofa"}, k=1)[0]
    assert hit["id"] == "i1" and hit["caption"] == "a cat on a sofa" and hit["metadata"] == {"source": "test"}
    hit = search(client, {"images": [b64(NIGHT), b64(CAT)], "text": "two photos"}, k=1)[0]
    assert hit["id"] == "i3" and hit["image_ref"] == "file:///photos/3"
    # modality filter and k
    assert {h["modality"] for h in search(client, {"text": "bus"}, k=10, modality="image")} == {"image"}
    assert {h["modality"] for h in search(client, {"image": b64(CAT)}, k=10, modality="text")} == {"text"}
    assert len(search(client, {"text": "bus"}, k=10)) == 6
    assert len(search(client, {"text": "bus"}, k=2)) == 2


def test_search_scores_match_direct_encoding(client):
    upsert(client, DOCS[:3])
    backend = client.backend
    doc_vecs = backend.encode([Item(text=d["text"]) for d in DOCS[:3]], "document")
    q = backend.encode([Item(text="bridge")], "query")[0]
    expected = sorted(zip(["t1", "t2", "t3"], doc_vecs @ q), key=lambda x: -x[1])
    hits = search(client, {"text": "bridge"}, k=3)
    assert [h["id"] for h in hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in expected], atol=1e-5)


def test_upsert_replace_get_delete(client):
    upsert(client, DOCS[:2])
    r = client.get("/v1/documents/t1")
    assert r.status_code == 200 and r.json()["text"] == DOCS[0]["text"]
    # replace t1 by an image document: the old text is gone from search
    upsert(client, [{"id": "t1", "image": b64(BUS), "caption": "now a bus photo", "metadata": {"v": 2}}])
    doc = client.get("/v1/documents/t1").json()
    assert doc == {"id": "t1", "modality": "image", "text": None, "caption": "now a bus photo",
                   "image_ref": doc["image_ref"], "metadata": {"v": 2}}
    assert search(client, {"text": DOCS[0]["text"]}, k=5, modality="text")[0]["id"] == "t2"
    assert search(client, {"image": b64(BUS), "caption": "now a bus photo"}, k=1)[0]["id"] == "t1"
    # delete
    r = client.delete("/v1/documents/t1")
    assert r.status_code == 200 and r.json() == {"deleted": "t1"}
    assert client.get("/v1/documents/t1").status_code == 404
    assert client.delete("/v1/documents/t1").json()["error"]["code"] == "not_found"
    assert [h["id"] for h in search(client, {"text": "anything"}, k=10)] == ["t2"]
    # ids with slashes and unicode round-trip through the path
    upsert(client, [{"id": "a/b ü", "text": "slash"}])
    assert client.get("/v1/documents/a/b ü").json()["id"] == "a/b ü"


def test_what_milvus_cannot_store_is_answered_422(client):
    """Milvus's field limits are checked before the call: 4xx naming the limit, nothing stored, server healthy."""
    if client.app.state.index.stats()["backend"] != "milvus":
        pytest.skip("the folder index has no field-size limit")
    emoji_text = "\U0001F600" * 17_000  # 17,000 characters (under max_text_chars), 68,000 bytes of UTF-8
    # metadata past Milvus's 64 KiB JSON field is past the server's own max_metadata_bytes first: 413
    for doc, status, message in (({"id": "big", "text": emoji_text}, 422, "65535"),
                                 ({"id": "meta", "text": "x", "metadata": {"blob": "y" * 70_000}}, 413,
                                  "max_metadata_bytes"),
                                 ({"id": "sur", "text": "x", "metadata": {"s": "\ud800"}}, 422, "surrogate")):
        body = json.dumps({"documents": [doc]}).encode()  # ASCII JSON: a lone surrogate travels as \ud800
        r = client.post("/v1/documents", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
        assert client.get(f"/v1/documents/{doc['id']}").status_code == 404
    assert client.get("/readyz").json()["documents"] == 0


def test_embed_matches_backend_and_reports_truncation(client):
    items = [{"text": "short"}, {"text": "long " * 200}, {"image": b64(CAT)}, {"image": b64(CAT), "caption": "cat"}]
    r = client.post("/v1/embed", json={"items": items, "role": "query"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 16 and body["truncated"] == [False, True, False, False]
    assert body["model_id"] == client.backend.model_id
    expected = client.backend.encode([Item(text="short"), Item(text="long " * 200), Item(images=[CAT]),
                                      Item(text="cat", images=[CAT])], "query")
    np.testing.assert_allclose(np.asarray(body["embeddings"], np.float32), expected, atol=1e-5)
    assert "mimic_truncated_texts_total 1.0" in client.get("/metrics").text


def test_health_ready_docs_info(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["backend"] == "torch"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embed", "/v1/documents", "/v1/search", "/healthz", "/readyz", "/metrics"} <= set(paths)
    info = client.get("/v1/info").json()
    assert info["settings"]["api_key"] == "set" and KEY not in str(info)
    assert info["batching"] is True and info["index"]["count"] == 0


def test_metrics_series(client):
    upsert(client, DOCS)
    search(client, {"text": "bus"})
    client.get("/v1/documents/nope")
    text = client.get("/metrics").text
    for series in (
        'mimic_http_requests_total{method="POST",route="/v1/search",status="200"} 1.0',
        'mimic_http_requests_total{method="GET",route="/v1/documents/{doc_id:path}",status="404"} 1.0',
        'mimic_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/documents"}',
        "mimic_batch_size_bucket", "mimic_batch_padded_tokens_bucket", "mimic_batch_duration_seconds_count",
        "mimic_encode_queue_depth 0.0",
        'mimic_index_documents{modality="text"} 3.0', 'mimic_index_documents{modality="image"} 3.0',
    ):
        assert series in text, series
    assert "nope" not in text  # ids never become label values


def server_timing(header: str) -> dict:
    """'preprocess;dur=0.41, queue;dur=0.02, ...' -> {stage: ms}."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def test_stage_timings_in_header_and_metrics(client):
    r = client.post("/v1/embed", json={"items": [{"text": "a red bus"}, {"image": b64(CAT)}], "role": "query"})
    assert r.status_code == 200, r.text
    stages = server_timing(r.headers["Server-Timing"])
    assert list(stages) == ["preprocess", "queue", "model", "respond"] and all(ms >= 0 for ms in stages.values())
    assert stages["model"] > 0  # the model ran for this request
    upsert(client, DOCS[:2])
    r = client.post("/v1/search", json={"query": {"text": "bus"}, "k": 2})
    assert list(server_timing(r.headers["Server-Timing"])) == ["preprocess", "queue", "model", "index"]
    text = client.get("/metrics").text
    for stage, n in (("preprocess", 3), ("queue", 3), ("model", 3), ("respond", 1), ("index", 2)):
        assert f'mimic_request_stage_seconds_count{{stage="{stage}"}} {n}.0' in text, stage


def test_embed_floats_read_back_as_the_same_float32(client):
    r = client.post("/v1/embed", json={"items": [{"text": "a red bus"}], "role": "query"})
    expected = client.backend.encode([Item(text="a red bus")], "query")
    np.testing.assert_array_equal(np.asarray(r.json()["embeddings"], np.float32), expected)


def test_timing_header_can_be_turned_off(tiny_encoders, tmp_path):
    c, _ = make_client(tiny_encoders, tmp_path / "index", timing_header=False)
    with c:
        r = c.post("/v1/embed", json={"items": [{"text": "a red bus"}]})
        assert r.status_code == 200 and "server-timing" not in r.headers
        assert 'mimic_request_stage_seconds_count{stage="model"} 1.0' in c.get("/metrics").text


def test_api_key_protects_write_routes_only(client):
    anon = {"X-API-Key": ""}
    doc = {"documents": [DOCS[0]]}
    r = client.post("/v1/documents", json=doc, headers=anon)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = client.post("/v1/documents", json=doc, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and "wrong" in r.json()["error"]["message"]
    r = client.post("/v1/documents", json=doc, headers={"X-API-Key": "", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert client.delete("/v1/documents/t1", headers=anon).status_code == 401
    assert client.delete("/v1/documents/t1", headers={"X-API-Key": "", "Authorization": "Bearer nope"}).status_code == 401
    # reads do not need the key
    assert client.post("/v1/search", json={"query": {"text": "bus"}}, headers=anon).status_code == 200
    assert client.get("/v1/documents/t1", headers=anon).status_code == 200
    assert client.post("/v1/embed", json={"items": [{"text": "x"}]}, headers=anon).status_code == 200
    assert client.delete("/v1/documents/t1").status_code == 200


def test_concurrent_requests_equal_unbatched(tiny_encoders, tmp_path):
    c, backend = make_client(tiny_encoders, tmp_path / "index", max_wait_ms=10)
    texts = [f"query number {i} about " + "bus " * (i % 7) for i in range(48)]
    expected = backend.encode([Item(text=t) for t in texts], "query")
    out, errors = [None] * len(texts), []
    batch_rows = []  # rows of each model call the server makes
    encode_batch = backend.encode_batch

    def counting_encode_batch(batch, role="document"):
        batch_rows.append(len(batch))
        return encode_batch(batch, role)

    backend.encode_batch = counting_encode_batch

    def worker(w):
        for i in range(w, len(texts), 12):
            r = c.post("/v1/embed", json={"items": [{"text": texts[i]}], "role": "query"})
            if r.status_code != 200:
                errors.append(r.text)
            else:
                out[i] = r.json()["embeddings"][0]

    with c:
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = c.get("/metrics").text
    assert not errors and all(v is not None for v in out)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=1e-5)
    # batching happened: 48 one-item requests were answered by fewer model calls, every item exactly once
    print(f"{len(texts)} requests -> {len(batch_rows)} model calls, rows per call {batch_rows}")
    assert sum(batch_rows) == len(texts) and len(batch_rows) < len(texts) and max(batch_rows) > 1, batch_rows
    assert f"mimic_batch_size_count {float(len(batch_rows))}" in metrics  # the served metrics saw the same calls
    assert f"mimic_batch_size_sum {float(len(texts))}" in metrics


def test_no_batching_mode_gives_the_same_answers(tiny_encoders, tmp_path):
    c, backend = make_client(tiny_encoders, tmp_path / "index", batching=False)
    with c:
        r = c.post("/v1/embed", json={"items": [{"text": "hello"}, {"image": b64(CAT)}]})
        assert c.get("/v1/info").json()["batching"] is False
    expected = backend.encode([Item(text="hello"), Item(images=[CAT])])
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32), expected, atol=1e-5)


def test_a_closed_index_answers_503_not_400(client):
    client.app.state.index.close()  # as at shutdown, while a request is still being answered
    for r in (client.get("/v1/documents/t1"), client.post("/v1/search", json={"query": {"text": "bus"}})):
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
