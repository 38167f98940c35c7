"""Hostile input and a hostile environment, over real HTTP to uvicorn: lone UTF-16 surrogates in
every field, a full disk, a damaged document store, keep-alive after a 500, the Allow header."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading

import httpx
import pytest

from mimic_engine.index import DocumentIndex
from mimic_engine.index.store import StoredDocument
from mimic_engine.preprocess import Item
from mimic_engine.runtime.torch_backend import TorchBackend
from mimic_engine.server.app import create_app
from mimic_engine.server.settings import ServerSettings
from tests.conftest import make_image_bytes
from tests.test_crash import free_port
from tests.test_server import b64

LONE = "\\ud800"  # a lone high surrogate, as JSON text (the body is sent as raw bytes)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread; the app's shutdown (index.close()) runs on exit."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            self.thread.join(0.05)
        raise TimeoutError("uvicorn did not start within 30 s")

    def __exit__(self, *_):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not shut down"


def serve(encoders, index_dir, backend_cls=TorchBackend, **settings) -> LiveServer:
    enc = encoders("decoder")
    backend = backend_cls(enc.model, enc.tokenizer, model_id=enc.model_id)
    index = DocumentIndex(str(index_dir), backend.dim, backend.model_id)
    return LiveServer(create_app(ServerSettings(max_wait_ms=1.0, **settings), backend, index))


def post_raw(url: str, path: str, body: str) -> httpx.Response:
    """POST `body` (JSON text, escapes kept as written) as bytes."""
    return httpx.post(url + path, content=body.encode("ascii"), headers={"content-type": "application/json"},
                      timeout=60)


@pytest.fixture(scope="module")
def live(tiny_encoders, tmp_path_factory):
    with serve(tiny_encoders, tmp_path_factory.mktemp("hardening") / "index") as server:
        r = httpx.post(server.url + "/v1/documents", json={"documents": [
            {"id": "bridge", "text": "the bridge opened in 1890"},
            {"id": "rye", "text": "a recipe for bread with rye flour"}]}, timeout=60)
        assert r.status_code == 200, r.text
        yield server


PNG = b64(make_image_bytes(3))
# route, body with a lone surrogate, the field the error must name
SURROGATE_CASES = {
    "embed text": ("/v1/embed", '{"items": [{"text": "a%s"}]}', "items[0].text"),
    "embed caption": ("/v1/embed", '{"items": [{"image": "%s", "caption": "x%%s"}]}' % PNG, "items[0].caption"),
    "embed image": ("/v1/embed", '{"items": [{"image": "%s"}]}', "items[0].image"),
    "embed images": ("/v1/embed", '{"items": [{"images": ["%s"]}]}', "items[0].images[0]"),
    "embed role": ("/v1/embed", '{"items": [{"text": "x"}], "role": "%s"}', "role"),
    "search text": ("/v1/search", '{"query": {"text": "when did the bridge open%s"}}', "query.text"),
    "search unknown key": ("/v1/search", '{"query": {"text": "x", "t%s": 1}}', "query key"),
    "documents id": ("/v1/documents", '{"documents": [{"id": "p%s", "text": "t"}]}', "documents[0].id"),
    "documents text": ("/v1/documents", '{"documents": [{"id": "p", "text": "t%s"}]}', "documents[0].text"),
    "documents image_ref": ("/v1/documents", '{"documents": [{"id": "p", "image": "%s", "image_ref": "file:%%s"}]}' % PNG,
                            "documents[0].image_ref"),
    "metadata value": ("/v1/documents", '{"documents": [{"id": "poison", "text": "the bridge opened in 1890", '
                                        '"metadata": {"note": "%s"}}]}', "documents[0].metadata.note"),
    "metadata key": ("/v1/documents", '{"documents": [{"id": "p", "text": "t", "metadata": {"n%s": 1}}]}',
                     "documents[0].metadata key"),
    "nested metadata": ("/v1/documents", '{"documents": [{"id": "p", "text": "t", "metadata": {"a": [1, {"b": "%s"}]}}]}',
                        "documents[0].metadata.a[1].b"),
    "low surrogate alone": ("/v1/documents", '{"documents": [{"id": "p", "text": "%s"}]}'.replace("%s", "\\udc00x%s"),
                            "documents[0].text"),
}


@pytest.mark.parametrize("name", list(SURROGATE_CASES))
def test_lone_surrogates_are_refused_with_the_field_named(live, name):
    path, body, field = SURROGATE_CASES[name]
    r = post_raw(live.url, path, body % LONE)
    assert r.status_code == 422, (name, r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == "invalid_text" and field in error["message"], error
    assert "surrogate" in error["message"] and "valid Unicode" in error["message"]


def test_poisoned_document_is_not_stored_and_search_keeps_answering(live):
    """The reproducer of the report: the document is refused, so search and GET answer 200 for everyone."""
    path, body, _ = SURROGATE_CASES["metadata value"]
    assert post_raw(live.url, path, body % LONE).status_code == 422
    assert httpx.get(live.url + "/v1/documents/poison").status_code == 404
    r = httpx.post(live.url + "/v1/search", json={"query": {"text": "when did the bridge open"}, "k": 10}, timeout=60)
    assert r.status_code == 200 and {h["id"] for h in r.json()["results"]} == {"bridge", "rye"}
    # a valid surrogate pair is one character beyond U+FFFF, stored and returned unchanged
    pair = '{"documents": [{"id": "emoji", "text": "smile \\ud83d\\ude00", "metadata": {"e": "\\ud83d\\ude00"}}]}'
    assert post_raw(live.url, "/v1/documents", pair).status_code == 200
    doc = httpx.get(live.url + "/v1/documents/emoji").json()
    assert doc["text"] == "smile \U0001F600" and doc["metadata"] == {"e": "\U0001F600"}
    assert httpx.delete(live.url + "/v1/documents/emoji").status_code == 200


def test_surrogate_in_a_path_id_is_a_404_not_a_500(live):
    r = httpx.get(live.url + "/v1/documents/%ED%A0%80")  # the UTF-8-style bytes of U+D800
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_library_upsert_refuses_lone_surrogates(tiny_encoders, tmp_path):
    from mimic_engine.errors import InputError

    index = DocumentIndex(str(tmp_path / "index"), 4, "m")
    with index, pytest.raises(InputError, match=r"docs\[0\]\.metadata\.note holds a lone UTF-16 surrogate"):
        index.upsert([StoredDocument("a", "text", text="t", metadata={"note": "\ud800"})], [[1.0, 0, 0, 0]])
    with DocumentIndex(str(tmp_path / "index"), 4, "m") as index:
        assert index.count() == 0


def test_documents_stored_by_older_versions_with_surrogates_are_served(tiny_encoders, tmp_path):
    """Older versions stored lone surrogates in metadata: GET and search serve them (as U+FFFD)."""
    backend = TorchBackend.from_encoder(tiny_encoders("decoder"))
    vectors = backend.encode([Item(text=t) for t in ("the bridge opened in 1890", "rye bread")], role="document")
    with DocumentIndex(str(tmp_path / "index"), backend.dim, backend.model_id) as index:
        # what an older version wrote: the store takes the document as it is (no validation on this path)
        index.store.write([StoredDocument("poison", "text", text="the bridge opened in 1890", metadata={"note": "\ud800"}),
                           StoredDocument("rye", "text", text="rye bread", metadata={"k\udfff": ["\ud800x"]})], vectors)
    with serve(tiny_encoders, tmp_path / "index") as server:
        doc = httpx.get(server.url + "/v1/documents/poison")
        assert doc.status_code == 200 and doc.json()["metadata"] == {"note": "\ufffd"}
        r = httpx.post(server.url + "/v1/search", json={"query": {"text": "when did the bridge open"}, "k": 2}, timeout=60)
        assert r.status_code == 200, r.text
        by_id = {h["id"]: h for h in r.json()["results"]}
        assert by_id["poison"]["metadata"] == {"note": "\ufffd"} and by_id["rye"]["metadata"] == {"k\ufffd": ["\ufffdx"]}


def test_keep_alive_connection_survives_a_500(tiny_encoders, tmp_path):
    class Broken(TorchBackend):
        def run_fusion(self, *args):
            raise RuntimeError("device lost")

    with serve(tiny_encoders, tmp_path / "index", backend_cls=Broken) as server:
        con = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for _ in range(2):  # the second request on the same connection must be answered
            con.request("POST", "/v1/search", body=json.dumps({"query": {"text": "x"}}),
                        headers={"content-type": "application/json"})
            r = con.getresponse()
            body = json.loads(r.read())
            assert r.status == 500 and body["error"]["code"] == "internal_error"
            assert r.getheader("connection") != "close"
        con.request("GET", "/healthz")
        assert con.getresponse().status == 200
        con.close()


def test_allow_header_lists_every_method_of_the_path(live):
    r = httpx.request("OPTIONS", live.url + "/v1/documents/bridge")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
    assert r.json()["error"]["code"] == "method_not_allowed" and "DELETE" in r.json()["error"]["message"]


def test_metadata_size_limit_and_strict_k(live):
    r = httpx.post(live.url + "/v1/documents", json={"documents": [{"id": "big", "text": "t",
                                                                    "metadata": {"blob": "x" * 20_000}}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "metadata_too_large"
    assert "max_metadata_bytes" in r.json()["error"]["message"]
    assert httpx.get(live.url + "/v1/documents/big").status_code == 404
    r = httpx.post(live.url + "/v1/search", json={"query": {"text": "bridge"}, "k": True})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


# ---- a full disk --------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root, or the right to mount); skipped with the reason where mounting is refused."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'}); the injected "
                    "disk-full tests in test_index_hardening.py cover the same paths")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder) -> str:
    """Write a file into `folder` until the disk is full; -> its path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as fh:
        try:
            while fh.write(b"\0" * 65536):
                pass
        except OSError:
            pass
    return path


def test_full_disk_answers_507_and_keeps_everything_acknowledged(tiny_encoders, small_disk):
    index_dir = small_disk / "index"
    with serve(tiny_encoders, index_dir, max_text_chars=20_000) as server:
        ok = httpx.post(server.url + "/v1/documents", json={"documents": [
            {"id": f"d{i}", "text": f"document number {i} about rivers"} for i in range(8)]}, timeout=60)
        assert ok.status_code == 200, ok.text
        filler = fill(small_disk)
        big = [{"id": f"big{i}", "text": "lorem ipsum " * 1600} for i in range(16)]
        r = httpx.post(server.url + "/v1/documents", json={"documents": big}, timeout=60)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage" and "disk" in r.json()["error"]["message"]
        assert "full" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/documents/big0").status_code == 404  # nothing of the batch stored
        hits = httpx.post(server.url + "/v1/search", json={"query": {"text": "rivers"}, "k": 8}, timeout=60)
        assert hits.status_code == 200 and len(hits.json()["results"]) == 8
        assert httpx.get(server.url + "/v1/documents/d3").json()["text"] == "document number 3 about rivers"
    # the server shut down while the disk was full: the final snapshot could not be written, and that
    # left neither a file under a final name nor a temp file
    params = json.loads((index_dir / "index.json").read_text())
    snapshots = sorted(f for f in os.listdir(index_dir) if f.startswith("hnsw-"))
    assert snapshots == [params["snapshot"]["file"]], snapshots
    assert os.path.getsize(index_dir / snapshots[0]) == params["snapshot"]["bytes"] > 0
    assert not [f for f in os.listdir(index_dir) if ".tmp-" in f]
    os.remove(filler)
    backend = TorchBackend.from_encoder(tiny_encoders("decoder"))
    with DocumentIndex(str(index_dir), backend.dim, backend.model_id) as index:
        assert index.count() == 8 and not index.opened["rebuilt"]
        assert index.opened["replayed_upserts"] == 8  # replayed from the store onto the last good snapshot


def test_a_damaged_page_fails_only_the_requests_that_read_it(tiny_encoders, tmp_path, monkeypatch):
    """A store too large to check at open, with a damaged page of its id index: GET of an id on that page
    answers 500 store_damaged, every other request answers as usual."""
    import numpy as np

    from mimic_engine.index import store as store_module
    from tests.test_index import docs_for
    from tests.test_index_hardening import damage_id_index

    backend = TorchBackend.from_encoder(tiny_encoders("decoder"))
    rng = np.random.default_rng(0)
    with DocumentIndex(str(tmp_path / "index"), backend.dim, backend.model_id) as index:
        index.upsert(docs_for(range(2000)), rng.standard_normal((2000, backend.dim)).astype(np.float32))
    damage_id_index(tmp_path / "index" / "docs.sqlite")
    monkeypatch.setattr(store_module, "QUICK_CHECK_SECONDS", 0.0)
    with serve(tiny_encoders, tmp_path / "index") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        statuses = {}
        for i in range(0, 2000, 7):
            r = client.get(f"/v1/documents/d{i}")
            statuses.setdefault(r.status_code, []).append(r)
        assert set(statuses) == {200, 500} and len(statuses[200]) > len(statuses[500]) > 0, {s: len(v) for s, v in statuses.items()}
        assert all(r.json()["error"]["code"] == "store_damaged" for r in statuses[500])
        assert str(tmp_path) not in statuses[500][0].text  # server paths stay in the log
        assert client.post("/v1/search", json={"query": {"text": "passage 5"}, "k": 5}).status_code == 200
        assert client.get("/readyz").status_code == 200
