"""Bad input gets the right 4xx in the one error schema, and the server stays healthy."""
import base64
import io
import json
import random
import threading

import pytest

from mimic_engine.runtime.torch_backend import TorchBackend
from tests.conftest import make_image_bytes
from tests.test_server import KEY, b64, make_client

PNG = make_image_bytes(1)


def huge_png(width=6000, height=6000) -> bytes:
    """A tiny file that declares width x height pixels (a decompression bomb in miniature)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module", params=["folder", "milvus-lite"])
def client(request, tiny_encoders, tmp_path_factory):
    """A server over each index backend (a folder and Milvus Lite), one stored document."""
    root = tmp_path_factory.mktemp("bad")
    if request.param == "milvus-lite":
        pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install 'mimic-engine[milvus]'")
    spec = root / "index" if request.param == "folder" else f"milvus:{root / 'index.db'}"
    c, _ = make_client(tiny_encoders, spec, api_key=KEY, max_items=8,
                       max_body_bytes=200_000, max_text_chars=1000, max_k=50, max_image_pixels=1_000_000)
    with c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        r = c.post("/v1/documents", json={"documents": [{"id": "d1", "text": "a stored document"}]})
        assert r.status_code == 200, r.text
        yield c


def search(q, k=5, **kw):
    return ("POST", "/v1/search", {"json": {"query": q, "k": k, **kw}})


CASES = {
    # name: (method, path, request kwargs, status, error code)
    "malformed json": ("POST", "/v1/search", {"content": b'{"query": {"text": "x"', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    "json not an object": ("POST", "/v1/embed", {"json": [1, 2]}, 422, "invalid_request"),
    "missing field": ("POST", "/v1/embed", {"json": {"role": "query"}}, 422, "invalid_request"),
    "unknown field": ("POST", "/v1/embed", {"json": {"items": [{"txt": "typo"}]}}, 422, "invalid_request"),
    "wrong type": ("POST", "/v1/embed", {"json": {"items": [{"text": 5}]}}, 422, "invalid_request"),
    "bad role": ("POST", "/v1/embed", {"json": {"items": [{"text": "x"}], "role": "passage"}}, 422, "invalid_request"),
    "bad base64": search({"image": "not base64!!"}) + (422, "invalid_base64"),
    "not an image": search({"image": b64(b"just some bytes, no image")}) + (422, "invalid_image"),
    "truncated image": search({"image": b64(PNG[: len(PNG) // 2])}) + (422, "invalid_image"),
    "empty image": search({"image": ""}) + (422, "invalid_image"),
    "huge image": search({"image": b64(huge_png())}) + (413, "image_too_large"),
    "empty query": search({"text": ""}) + (422, "empty_item"),
    "blank query": search({"text": "   "}) + (422, "empty_item"),
    "query without fields": search({}) + (422, "empty_item"),
    "caption without image": search({"caption": "x"}) + (422, "invalid_item"),
    "text and caption": search({"text": "x", "caption": "y", "image": b64(PNG)}) + (422, "invalid_item"),
    "too many images": search({"images": [b64(PNG)] * 5}) + (422, "too_many_images"),
    "k zero": search({"text": "x"}, k=0) + (422, "invalid_k"),
    "k negative": search({"text": "x"}, k=-3) + (422, "invalid_k"),
    "k too large": search({"text": "x"}, k=51) + (422, "invalid_k"),
    "k not a number": search({"text": "x"}, k="ten") + (422, "invalid_request"),
    "bad modality": search({"text": "x"}, modality="video") + (422, "invalid_request"),
    "text too long": search({"text": "x" * 1001}) + (413, "text_too_long"),
    "unknown id get": ("GET", "/v1/documents/missing", {}, 404, "not_found"),
    "unknown id delete": ("DELETE", "/v1/documents/missing", {}, 404, "not_found"),
    "unknown route": ("GET", "/v2/nothing", {}, 404, "not_found"),
    "wrong method": ("PUT", "/v1/search", {"json": {}}, 405, "method_not_allowed"),
    "no api key": ("POST", "/v1/documents", {"json": {"documents": [{"id": "x", "text": "y"}]}, "headers": {"Authorization": ""}}, 401, "unauthorized"),
    "wrong api key": ("POST", "/v1/documents", {"json": {"documents": [{"id": "x", "text": "y"}]}, "headers": {"Authorization": "Bearer nope"}}, 401, "unauthorized"),
    "too many items": ("POST", "/v1/embed", {"json": {"items": [{"text": "x"}] * 9}}, 413, "too_many_items"),
    "no items": ("POST", "/v1/embed", {"json": {"items": []}}, 422, "empty_request"),
    "no documents": ("POST", "/v1/documents", {"json": {"documents": []}}, 422, "empty_request"),
    "empty id": ("POST", "/v1/documents", {"json": {"documents": [{"id": "", "text": "y"}]}}, 422, "invalid_id"),
    "control char id": ("POST", "/v1/documents", {"json": {"documents": [{"id": "a\nb", "text": "y"}]}}, 422, "invalid_id"),
    "duplicate ids": ("POST", "/v1/documents", {"json": {"documents": [{"id": "a", "text": "y"}, {"id": "a", "text": "z"}]}}, 422, "duplicate_id"),
    "metadata not an object": ("POST", "/v1/documents", {"json": {"documents": [{"id": "a", "text": "y", "metadata": [1]}]}}, 422, "invalid_request"),
    "NaN in metadata": ("POST", "/v1/documents", {"content": b'{"documents": [{"id": "a", "text": "y", "metadata": {"s": [1, NaN]}}]}', "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
    "Infinity in metadata": ("POST", "/v1/documents", {"content": b'{"documents": [{"id": "a", "text": "y", "metadata": {"s": {"t": -Infinity}}}]}', "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
    "no api key, bad body": ("POST", "/v1/documents", {"json": {"documents": "not a list"}, "headers": {"Authorization": ""}}, 401, "unauthorized"),
    "body too large": ("POST", "/v1/embed", {"json": {"items": [{"text": "x" * 100_000}] * 3}}, 413, "body_too_large"),
    "chunked body too large": ("POST", "/v1/embed", {"content": (b'{"items": [' + b" " * 150_000, b" " * 150_000 + b"]}"), "headers": {"content-type": "application/json"}}, 413, "body_too_large"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_the_right_error(client, name):
    method, path, kwargs, status, code = CASES[name]
    if isinstance(kwargs.get("content"), tuple):  # chunks, sent as a streamed (chunked) body
        kwargs = {**kwargs, "content": iter(kwargs["content"])}
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, (name, body)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_stored_data_survives_the_bad_requests(client):
    for name in CASES:
        method, path, kwargs, _, _ = CASES[name]
        if "content" in kwargs and not isinstance(kwargs["content"], bytes):
            continue  # an iterator can be sent once
        client.request(method, path, **kwargs)
    assert client.get("/v1/documents/d1").json()["text"] == "a stored document"
    hits = client.post("/v1/search", json={"query": {"text": "a stored document"}, "k": 1}).json()["results"]
    assert hits[0]["id"] == "d1"
    assert client.get("/readyz").status_code == 200


def fuzz_requests(n: int, seed: int = 0):
    """n malformed requests: random mutations of valid bodies, random bytes, wrong types."""
    rng = random.Random(seed)
    valid = [
        ("/v1/search", {"query": {"text": "hello"}, "k": 3}),
        ("/v1/search", {"query": {"image": b64(PNG)}, "k": 3, "modality": "image"}),
        ("/v1/embed", {"items": [{"text": "a"}, {"image": b64(PNG), "caption": "c"}], "role": "query"}),
        ("/v1/documents", {"documents": [{"id": "f", "text": "t", "metadata": {"a": 1}}]}),
    ]
    junk_values = [None, 0, -1, 10**12, 1.5, "", "x" * 2000, [], {}, [None], {"a": {"b": []}}, True, "\x00\ud7ff",
                   "data:image/png;base64,@@@", b64(b"GIF89a broken"), b64(huge_png(3000, 3000))]
    for i in range(n):
        path, body = rng.choice(valid)
        body = json.loads(json.dumps(body))
        kind = i % 5
        if kind == 0:  # raw garbage bytes
            yield path, {"content": bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
                         "headers": {"content-type": "application/json"}}
            continue
        if kind == 1:  # truncated JSON text
            text = json.dumps(body)
            yield path, {"content": text[: rng.randint(0, len(text) - 1)].encode(), "headers": {"content-type": "application/json"}}
            continue
        # replace one value somewhere in the body by junk
        node, key = body, None
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys)
            if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.6:
                node = node[key]
                continue
            break
        if key is not None:
            node[key] = rng.choice(junk_values)
        if kind == 4 and isinstance(node, dict):
            node["unexpected_" + str(i)] = 1
        yield path, {"json": body}


def test_malformed_request_storm_never_5xx(client):
    statuses = {}
    for path, kwargs in fuzz_requests(240):
        r = client.post(path, **kwargs)
        assert r.status_code < 500, (path, kwargs, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["code"]
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    print("malformed-request storm statuses:", dict(sorted(statuses.items())))
    assert sum(v for s, v in statuses.items() if s >= 400) >= 200
    assert client.get("/readyz").status_code == 200


def test_internal_errors_use_the_schema(tiny_encoders, tmp_path):
    """A failing model answers 500 in the error schema and the server keeps serving."""
    from fastapi.testclient import TestClient

    from mimic_engine.index import DocumentIndex
    from mimic_engine.server.app import create_app
    from mimic_engine.server.settings import ServerSettings

    enc = tiny_encoders("decoder")

    class Broken(TorchBackend):
        def run_fusion(self, *args):
            raise RuntimeError("device lost")

    backend = Broken(enc.model, enc.tokenizer, model_id=enc.model_id)
    index = DocumentIndex(str(tmp_path / "index"), backend.dim, backend.model_id)
    with TestClient(create_app(ServerSettings(), backend, index), raise_server_exceptions=False) as c:
        r = c.post("/v1/search", json={"query": {"text": "x"}})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "device lost" not in r.text  # internals are logged, not leaked
        assert c.get("/healthz").status_code == 200


def test_full_queue_answers_503_with_retry_after(tiny_encoders, tmp_path):
    """Backpressure: with the model busy and the queue full, requests get 503 + Retry-After."""
    from fastapi.testclient import TestClient

    from mimic_engine.index import DocumentIndex
    from mimic_engine.server.app import create_app
    from mimic_engine.server.settings import ServerSettings

    enc = tiny_encoders("decoder")
    release, started = threading.Event(), threading.Event()

    class Slow(TorchBackend):
        def run_fusion(self, *args):
            started.set()
            release.wait(30)
            return super().run_fusion(*args)

    backend = Slow(enc.model, enc.tokenizer, model_id=enc.model_id)
    index = DocumentIndex(str(tmp_path / "index"), backend.dim, backend.model_id)
    settings = ServerSettings(max_queue=2, max_items=2, max_batch=2, max_wait_ms=0)
    with TestClient(create_app(settings, backend, index)) as c:
        first = []
        t = threading.Thread(target=lambda: first.append(c.post("/v1/embed", json={"items": [{"text": "a"}, {"text": "b"}]})))
        t.start()
        assert started.wait(10)
        r = c.post("/v1/embed", json={"items": [{"text": "c"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["Retry-After"]) >= 1
        release.set()
        t.join(30)
        assert first[0].status_code == 200
        assert c.post("/v1/embed", json={"items": [{"text": "c"}]}).status_code == 200
        assert 'status="503"' in c.get("/metrics").text


def test_non_finite_metadata_is_refused_with_its_path(client):
    body = b'{"documents": [{"id": "nan-doc", "text": "y", "metadata": {"s": [1, NaN]}}]}'
    r = client.post("/v1/documents", content=body, headers={"content-type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and "metadata.s[1] is NaN or Infinity" in message, message
    assert client.get("/v1/documents/nan-doc").status_code == 404  # nothing stored
