"""The server's parts on their own: request schemas, the metrics middleware, route helpers and
handlers called with a hand-made state, and one image decode per uploaded image."""
import asyncio
import base64
import hashlib
import json

import pytest
from pydantic import ValidationError

from mimic_engine.errors import InputError
from mimic_engine.server import routes
from mimic_engine.server.api_errors import ApiError, add_error_handlers, mimic_error
from mimic_engine.server.metrics import LimitsAndMetrics, ServerMetrics
from mimic_engine.server.schemas import DocumentIn, EmbedRequest, ItemIn, SearchRequest, non_finite_path
from mimic_engine.server.settings import ServerSettings
from tests.conftest import make_image_bytes
from tests.test_server import KEY, make_client

PNG = make_image_bytes(5)  # 40 x 30


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raises_api_error(status: int, code: str, fn, *args):
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert (info.value.status_code, info.value.code) == (status, code), info.value.detail
    return info.value


# ---- schemas --------------------------------------------------------------------------------------
def test_schemas_refuse_bad_bodies_naming_the_field():
    with pytest.raises(ValidationError, match=r"metadata\.s\[1\] is NaN or Infinity"):
        DocumentIn(id="a", text="y", metadata={"s": [1, float("nan")]})
    with pytest.raises(ValidationError, match=r"metadata\.a\.b is NaN or Infinity"):
        DocumentIn(id="a", text="y", metadata={"a": {"b": float("-inf")}})
    assert non_finite_path({"a": [1.5, {"b": None}], "c": "inf"}, "metadata") is None
    with pytest.raises(ValidationError) as info:
        ItemIn(txt="typo")
    assert info.value.errors()[0]["type"] == "extra_forbidden" and info.value.errors()[0]["loc"] == ("txt",)
    with pytest.raises(ValidationError) as info:
        SearchRequest(query={"text": "x"}, modality="video")
    assert info.value.errors()[0]["loc"] == ("modality",)
    with pytest.raises(ValidationError):
        EmbedRequest(items=[{"text": 5}])
    assert EmbedRequest(items=[{"text": "x"}]).role == "document"


# ---- metrics and the middleware -------------------------------------------------------------------
class CountingIndex:
    def __init__(self, counts=None, broken=False):
        self.counts, self.broken = counts or {}, broken

    def count(self, modality=None):
        if self.broken:
            raise RuntimeError("the index is closed")
        return self.counts.get(modality, 0)


def middleware_client(metrics, max_body_bytes=100):
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.add_middleware(LimitsAndMetrics, metrics=metrics, max_body_bytes=max_body_bytes)
    add_error_handlers(app)

    @app.post("/echo/{doc_id}")
    async def echo(doc_id: str, request: Request):
        return {"id": doc_id, "bytes": len(await request.body())}

    return TestClient(app)


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


def test_middleware_records_route_templates_and_refuses_large_bodies():
    metrics = ServerMetrics(CountingIndex({"text": 3, "image": 1}))
    client = middleware_client(metrics)
    assert client.post("/echo/secret-id", content=b"x" * 10).json() == {"id": "secret-id", "bytes": 10}
    r = client.post("/echo/a", content=b"x" * 101)  # over the limit by its content-length
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large" and "101 bytes" in r.text
    r = client.post("/echo/a", content=iter([b"x" * 60, b"x" * 60]))  # no content-length: counted as it streams
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    assert client.get("/nowhere").status_code == 404

    assert sample(metrics, "mimic_http_requests_total", route="/echo/{doc_id}", method="POST", status="200") == 1
    assert sample(metrics, "mimic_http_requests_total", route="/echo/{doc_id}", method="POST", status="413") == 1
    assert sample(metrics, "mimic_http_requests_total", route="unmatched", method="POST", status="413") == 1
    assert sample(metrics, "mimic_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert sample(metrics, "mimic_http_request_duration_seconds_count", route="/echo/{doc_id}", method="POST") == 2
    body, content_type = metrics.render()
    assert b"secret-id" not in body and content_type.startswith("text/plain")
    assert b'mimic_index_documents{modality="text"} 3.0' in body


def test_metrics_scrape_survives_a_broken_index_and_counts_batches():
    metrics = ServerMetrics(CountingIndex(broken=True))
    metrics.observe_batch(items=3, tokens=120, seconds=0.01)
    metrics.observe_batch(items=5, tokens=300, seconds=0.02)
    body, _ = metrics.render()
    assert b"mimic_index_documents{" not in body  # no counts, but the scrape answers
    assert sample(metrics, "mimic_batch_size_count") == 2 and sample(metrics, "mimic_batch_size_sum") == 8
    assert sample(metrics, "mimic_batch_padded_tokens_sum") == 420


# ---- route helpers --------------------------------------------------------------------------------
def test_check_api_key():
    routes.check_api_key({}, None)  # no key configured: open
    routes.check_api_key({"authorization": f"bearer {KEY}"}, KEY)
    routes.check_api_key({"x-api-key": KEY}, KEY)
    error = raises_api_error(401, "unauthorized", routes.check_api_key, {}, KEY)
    assert error.headers == {"WWW-Authenticate": "Bearer"} and "X-API-Key" in error.detail
    assert "wrong" in raises_api_error(401, "unauthorized", routes.check_api_key, {"x-api-key": "nope"}, KEY).detail


def test_check_count_and_ids():
    routes.check_count(3, "items", 3)
    raises_api_error(422, "empty_request", routes.check_count, 0, "items", 3)
    assert "limit is 3 (max_items)" in raises_api_error(413, "too_many_items", routes.check_count, 4, "items", 3).detail
    docs = [DocumentIn(id="a", text="x"), DocumentIn(id="a", text="y")]
    raises_api_error(422, "duplicate_id", routes.check_document_ids, docs, 8)
    raises_api_error(422, "invalid_id", routes.check_document_ids, [DocumentIn(id="a\tb", text="x")], 8)
    raises_api_error(422, "invalid_id", routes.check_document_ids, [DocumentIn(id="x" * 9, text="x")], 8)


def test_decode_base64_image_maps_each_failure_to_its_answer(monkeypatch):
    from PIL import Image

    img, raw = routes.decode_base64_image(b64(make_image_bytes(1, mode="RGBA")), "q.images[0]", 10_000)
    assert img.size == (40, 30) and img.mode == "RGB" and raw == make_image_bytes(1, mode="RGBA")
    raises_api_error(422, "invalid_base64", routes.decode_base64_image, "not base64!!", "q", 10_000)
    error = raises_api_error(422, "invalid_image", routes.decode_base64_image, b64(b"no image"), "q", 10_000)
    assert error.detail == ("q: the bytes are not an image this server can read (UnidentifiedImageError); "
                            "send PNG, JPEG, WebP, GIF or BMP")
    error = raises_api_error(422, "invalid_image", routes.decode_base64_image, b64(PNG[: len(PNG) // 2]), "q", 10_000)
    assert error.detail.startswith("q: cannot decode as an image (OSError")  # header fine, pixel data cut
    error = raises_api_error(413, "image_too_large", routes.decode_base64_image, b64(PNG), "q", 1000)
    assert error.detail == ("q: 40x30 = 1200 pixels exceeds the limit of 1000 (max_image_pixels); downscale it "
                            "before sending")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own bomb guard refuses at 2x this
    error = raises_api_error(413, "image_too_large", routes.decode_base64_image, b64(PNG), "q", 10_000)
    assert error.detail.startswith("q: image of 1200 pixels exceeds the image decoder's own limit of 200 "
                                   "(Pillow's decompression-bomb guard), below the configured 10000")
    error = raises_api_error(413, "image_too_large", routes.decode_base64_image, b64(PNG), "q", 1100)
    assert error.detail.startswith("q: image of 1200 pixels exceeds the limit of 1100;")  # the configured one


def test_to_item_checks_the_combination_before_decoding():
    settings = ServerSettings(max_text_chars=10)
    item, raw = routes.to_item(ItemIn(image=b64(PNG), caption="a cat"), "items[0]", settings, 2)
    assert item.text == "a cat" and item.modality == "image" and item.images[0].size == (40, 30) and raw == PNG
    item, raw = routes.to_item(ItemIn(text="words"), "items[1]", settings, 2)
    assert item.modality == "text" and raw is None
    for bad, status, code in ((ItemIn(text="x", caption="y", image=b64(PNG)), 422, "invalid_item"),
                              (ItemIn(caption="y"), 422, "invalid_item"),
                              (ItemIn(text="x" * 11), 413, "text_too_long"),
                              (ItemIn(text="  "), 422, "empty_item"),
                              (ItemIn(images=[b64(PNG)] * 3), 422, "too_many_images"),
                              (ItemIn(image="@@", images=[b64(PNG)] * 2), 422, "too_many_images")):
        error = raises_api_error(status, code, routes.to_item, bad, "items[7]", settings, 2)
        assert error.detail.startswith("items[7]")


def test_to_stored_document():
    image_item, _ = routes.to_item(ItemIn(image=b64(PNG), caption="cap"), "d", ServerSettings(), 2)
    doc = routes.to_stored_document(DocumentIn(id="i", image=b64(PNG), caption="cap", metadata={"k": 1}), image_item, PNG)
    assert (doc.modality, doc.text, doc.caption, doc.metadata) == ("image", None, "cap", {"k": 1})
    assert doc.image_ref == "inline:" + hashlib.sha256(PNG).hexdigest()
    doc = routes.to_stored_document(DocumentIn(id="i", image=b64(PNG), image_ref="file:///x"), image_item, PNG)
    assert doc.image_ref == "file:///x"
    text_item, _ = routes.to_item(ItemIn(text="hello"), "d", ServerSettings(), 2)
    doc = routes.to_stored_document(DocumentIn(id="t", text="hello"), text_item, None)
    assert (doc.modality, doc.text, doc.caption, doc.image_ref) == ("text", "hello", None, None)


class FakeEncoder:
    alive = False


def test_handlers_run_on_a_hand_made_state():
    settings = ServerSettings()
    state = routes.ServerState(settings, backend=None, index=CountingIndex(broken=True), encoder=FakeEncoder(),
                               metrics=None)
    assert "not running" in raises_api_error(503, "not_ready", routes.readyz, state).detail
    state.encoder.alive = True
    error = raises_api_error(503, "not_ready", routes.readyz, state)
    assert error.detail == "the index is not available (RuntimeError: the index is closed)"

    class NoDocuments:
        def get(self, doc_id):
            return None

    state.index = NoDocuments()
    assert raises_api_error(404, "not_found", routes.get_document, "a/b", state).detail == "no document with id 'a/b'"


def test_library_errors_get_their_status():
    from mimic_engine.index.document_index import IndexClosedError

    from starlette.requests import Request

    def request(path):
        return Request({"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""})

    for exc, status, code in ((InputError("bad"), 422, "invalid_input"), (IndexClosedError("closed"), 503, "unavailable")):
        response = asyncio.run(mimic_error(request("/v1/embed"), exc))
        assert response.status_code == status and code.encode() in response.body
        openai_shape = json.loads(asyncio.run(mimic_error(request("/v1/embeddings"), exc)).body)["error"]
        assert openai_shape["code"] == code and set(openai_shape) == {"message", "type", "param", "code"}


# ---- one decode per image -------------------------------------------------------------------------
def test_each_image_is_opened_and_decoded_once_per_request_item(tiny_encoders, tmp_path, monkeypatch):
    """Format and size come from the one open that also decodes: N images in a request, N opens."""
    from PIL import Image

    opened, decoded = [], []
    image_open, decode_image = Image.open, routes.decode_image

    def counting_open(*args, **kwargs):
        opened.append(1)
        return image_open(*args, **kwargs)

    def counting_decode(raw, name, max_pixels):
        decoded.append(name)
        return decode_image(raw, name, max_pixels)

    client, _ = make_client(tiny_encoders, tmp_path / "index", api_key=KEY)
    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(routes, "decode_image", counting_decode)
    cat, bus, night = b64(make_image_bytes(1)), b64(make_image_bytes(2, fmt="JPEG")), b64(make_image_bytes(3, mode="L"))
    requests = [
        ("/v1/embed", {"items": [{"image": cat}, {"images": [bus, night]}, {"text": "x"}, {"image": cat, "caption": "c"}]},
         ["items[0].images[0]", "items[1].images[0]", "items[1].images[1]", "items[3].images[0]"]),
        ("/v1/documents", {"documents": [{"id": "a", "image": bus, "images": [cat]}, {"id": "b", "text": "t"}]},
         ["documents[0] (a).images[0]", "documents[0] (a).images[1]"]),
        ("/v1/search", {"query": {"images": [night, cat], "text": "q"}}, ["query.images[0]", "query.images[1]"]),
    ]
    with client:
        for path, body, names in requests:
            opened.clear(), decoded.clear()
            r = client.post(path, json=body, headers={"X-API-Key": KEY})
            assert r.status_code == 200, r.text
            assert decoded == names and len(opened) == len(names), (path, decoded, len(opened))
