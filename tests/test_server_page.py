"""Thumbnails of image documents (store, bulk build, GET /v1/documents/{id}/thumbnail) and the search
page's HTML as the server sends it (FastAPI TestClient; the browser tests are in test_search_page_browser.py)."""
import base64
import io
import json
import re

import numpy as np
import pytest

from mimic_engine.index import DocumentIndex, StoredDocument, build_index
from tests.conftest import make_image_bytes
from tests.test_index_build import small_dataset
from tests.test_server import make_client

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


@pytest.fixture
def client(tiny_encoders, tmp_path):
    c, _ = make_client(tiny_encoders, tmp_path / "index")
    with c:
        yield c


def upsert(client, docs):
    r = client.post("/v1/documents", json={"documents": docs})
    assert r.status_code == 200, r.text


def initial_state(html: str) -> dict:
    block = re.search(r'<script id="initial-state" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(block.group(1))


# ---- thumbnails -----------------------------------------------------------------------------------
def test_thumbnails_are_small_webp_served_with_etag(client):
    big, small = make_image_bytes(1, size=(640, 320)), make_image_bytes(2, size=(40, 30))
    upsert(client, [{"id": "big", "image": b64(big)}, {"id": "small", "image": b64(small), "caption": "tiny"},
                    {"id": "words", "text": "no picture here"}])
    r = client.get("/v1/documents/big/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert pil(r.content).format == "WEBP" and pil(r.content).size == (256, 128)  # longest side 256, aspect kept
    assert pil(client.get("/v1/documents/small/thumbnail").content).size == (40, 30)  # never upscaled
    again = client.get("/v1/documents/big/thumbnail", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    r = client.get("/v1/documents/words/thumbnail")
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_thumbnail" and "text document" in r.text
    assert client.get("/v1/documents/nobody/thumbnail").json()["error"]["code"] == "not_found"
    # search results never carry the bytes
    hit = client.post("/v1/search", json={"query": {"image": b64(big)}, "k": 1}).json()["results"][0]
    assert hit["id"] == "big" and "thumbnail" not in hit


def test_replacing_or_deleting_a_document_drops_its_thumbnail(client):
    upsert(client, [{"id": "d1", "image": b64(make_image_bytes(3))}])
    first = client.get("/v1/documents/d1/thumbnail").content
    upsert(client, [{"id": "d1", "image": b64(make_image_bytes(4))}])
    second = client.get("/v1/documents/d1/thumbnail").content
    assert second != first and pil(second).size == (40, 30)
    upsert(client, [{"id": "d1", "text": "now a text document"}])
    assert client.get("/v1/documents/d1/thumbnail").status_code == 404
    upsert(client, [{"id": "d1", "image": b64(make_image_bytes(5))}])
    assert client.delete("/v1/documents/d1").status_code == 200
    assert client.get("/v1/documents/d1/thumbnail").status_code == 404
    assert client.app.state.index.store._r.execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0] == 0


def test_an_id_ending_in_thumbnail_is_still_a_document(client):
    upsert(client, [{"id": "notes/thumbnail", "text": "a document whose id ends like the route"}])
    r = client.get("/v1/documents/notes/thumbnail")
    assert r.status_code == 200 and r.json()["id"] == "notes/thumbnail"


def test_thumbnails_can_be_turned_off(tiny_encoders, tmp_path):
    c, _ = make_client(tiny_encoders, tmp_path / "index", thumbnails=False)
    with c:
        upsert(c, [{"id": "i1", "image": b64(make_image_bytes(6))}])
        r = c.get("/v1/documents/i1/thumbnail")
        assert r.status_code == 404 and "thumbnails turned off" in r.json()["error"]["message"]


def test_build_index_stores_thumbnails_unless_told_not_to(tiny_encoders, tmp_path):
    enc = tiny_encoders("decoder")
    dataset = small_dataset(n_text=2, n_image=3)
    with DocumentIndex(str(tmp_path / "with"), enc.dim, enc.model_id) as index:
        build_index(enc, dataset, index, progress=False)
        sources = [np.asarray(pil(dataset.images.get(f"img{i}")).convert("RGB"), dtype=float) for i in range(3)]
        for i in range(3):
            thumb = pil(index.thumbnail(f"i{i}"))
            assert thumb.format == "WEBP" and thumb.size == (40, 30)
            pixels = np.asarray(thumb.convert("RGB"), dtype=float)
            errors = [np.abs(pixels - source).mean() for source in sources]
            assert int(np.argmin(errors)) == i, errors  # lossy, but a picture of its own document's image
        assert index.thumbnail("t0") is None and index.get("i0").thumbnail is None  # reads never carry bytes
    with DocumentIndex(str(tmp_path / "without"), enc.dim, enc.model_id) as index:
        build_index(enc, dataset, index, progress=False, thumbnails=False)
        assert index.thumbnail("i0") is None


def test_thumbnails_survive_reopening(tiny_encoders, tmp_path):
    from mimic_engine.index.thumbnails import make_thumbnail

    enc = tiny_encoders("decoder")
    data = make_thumbnail(pil(make_image_bytes(7, size=(300, 600))))
    with DocumentIndex(str(tmp_path / "i"), enc.dim, enc.model_id) as index:
        index.upsert([StoredDocument("x", "image", thumbnail=data)], np.ones((1, enc.dim), np.float32))
    with DocumentIndex(str(tmp_path / "i"), enc.dim, enc.model_id) as index:
        assert index.thumbnail("x") == data and pil(data).size == (128, 256)


# ---- the page as served -----------------------------------------------------------------------------
def test_page_and_its_files_are_served_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert initial_state(r.text) == {"max_k": 1000, "default_k": 12, "search": None}
    assert 'src="/static/app.js"' in r.text and "http://" not in r.text and "https://" not in r.text  # offline
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        f = client.get(f"/static/{name}")
        assert f.status_code == 200 and kind in f.headers["content-type"]
        assert "http://" not in f.text and "https://" not in f.text and "@import" not in f.text
    assert "innerHTML" not in client.get("/static/app.js").text  # documents are shown as text only


def test_a_url_search_is_run_by_the_server_and_embedded(client):
    upsert(client, [{"id": "t1", "text": "the square of 13 is 169"}, {"id": "t2", "text": "bread with rye flour"},
                    {"id": "i1", "image": b64(make_image_bytes(8)), "caption": "a cat"}])
    api = client.post("/v1/search", json={"query": {"text": "the square of 13 is 169"}, "k": 2, "modality": "text"})
    state = initial_state(client.get("/", params={"q": "the square of 13 is 169", "modality": "text", "k": "2"}).text)
    assert state["search"] == api.json() and state["search"]["results"][0]["id"] == "t1"
    assert len(initial_state(client.get("/?q=cat").text)["search"]["results"]) == 3  # k defaults to 12
    for params, says in (({"q": "x", "k": "lots"}, "k='lots' is not a whole number"),
                         ({"q": "x", "k": "0"}, "expected an integer from 1 to 1000"),
                         ({"q": "x", "modality": "video"}, "modality='video'"),
                         ({"q": "x" * 20_001}, "the limit is 20000")):
        r = client.get("/", params=params)
        assert r.status_code == 200 and says in initial_state(r.text)["search"]["error"]
    assert initial_state(client.get("/?q=%20%20").text)["search"] is None  # blank: no search


def test_stored_markup_cannot_leave_the_json_block(client):
    hostile = "</script><script>alert(1)</script><!-- & \u2028 \U0001f600"
    upsert(client, [{"id": "evil", "text": hostile, "metadata": {"note": "<img src=x onerror=alert(2)>"}}])
    html = client.get("/", params={"q": hostile}).text
    assert "<script>alert(1)" not in html and "<img src=x" not in html and html.count("</script>") == 2
    hit = initial_state(html)["search"]["results"][0]
    assert hit["text"] == hostile and hit["metadata"] == {"note": "<img src=x onerror=alert(2)>"}
