"""The OpenAI-compatible routes (/v1/embeddings, /v1/models) with the real `openai` client over HTTP
against a live server on a loopback port, and their refusals in OpenAI's error shape."""
import base64
import json

import numpy as np
import pytest

from tests.conftest import make_image_bytes
from tests.live_server import serving

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra: pip install -e '.[dev]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")

CAT = make_image_bytes(21, size=(48, 32))
CAT_URI = "data:image/png;base64," + base64.b64encode(CAT).decode()
TEXTS = ["the red bus drives over the old stone bridge", "a recipe for bread", "mountain weather",
         "what is the square of 13?", "x"]


@pytest.fixture(scope="module")
def live(tiny_encoders, tmp_path_factory):
    """(base URL, backend, httpx client) of a real server with a tiny model; max_items=8 to test the limit."""
    import httpx

    from mimic_engine.index import DocumentIndex
    from mimic_engine.runtime.torch_backend import TorchBackend
    from mimic_engine.server.app import create_app
    from mimic_engine.server.settings import ServerSettings

    backend = TorchBackend.from_encoder(tiny_encoders("decoder"))
    index = DocumentIndex(str(tmp_path_factory.mktemp("openai-index")), backend.dim, backend.model_id)
    app = create_app(ServerSettings(max_wait_ms=2.0, max_items=8, model_name="mimic-tiny"), backend, index)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield url, backend, http


def client_for(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kw)


def embed_route(http, items, role="document"):
    r = http.post("/v1/embed", json={"items": items, "role": role})
    assert r.status_code == 200, r.text
    return np.array(r.json()["embeddings"], dtype=np.float32)


def text_tokens(backend, text):
    _, mask, _ = backend.preprocessor.tokenize([text])
    return int(mask.sum())


def test_models_lists_the_served_model(live):
    url, backend, http = live
    models = client_for(url).models.list()
    assert [m.id for m in models.data] == ["mimic-tiny"]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "mimic-engine" and isinstance(card.created, int)
    assert card.model_extra["dimensions"] == backend.dim and card.model_extra["model_id"] == backend.model_id
    assert client_for(url).models.retrieve("mimic-tiny").id == "mimic-tiny"
    assert http.get("/models").json() == http.get("/v1/models").json()  # infinity's path without /v1
    r = http.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_default_client_asks_for_base64_and_gets_the_vectors_of_v1_embed(live):
    url, backend, http = live
    import httpx

    sent = []
    hook = httpx.Client(event_hooks={"request": [lambda request: sent.append(json.loads(request.content))]})
    result = client_for(url, http_client=hook).embeddings.create(model="mimic-tiny", input=TEXTS)
    assert sent[-1]["encoding_format"] == "base64"  # what the client does when the caller sets nothing
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert [d.index for d in result.data] == list(range(len(TEXTS))) and got.shape == (len(TEXTS), backend.dim)
    np.testing.assert_allclose(got, embed_route(http, [{"text": t} for t in TEXTS]), atol=1e-5)
    assert result.model == "mimic-tiny" and result.object == "list"
    tokens = sum(text_tokens(backend, t) for t in TEXTS)
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens


def test_float_encoding_single_string_and_model_id_as_name(live):
    url, backend, http = live
    client = client_for(url)
    floats = client.embeddings.create(model="mimic-tiny", input=TEXTS[0], encoding_format="float")
    assert len(floats.data) == 1 and isinstance(floats.data[0].embedding, list)
    expected = embed_route(http, [{"text": TEXTS[0]}])[0]
    np.testing.assert_allclose(floats.data[0].embedding, expected, atol=1e-5)
    by_id = client.embeddings.create(model=backend.model_id, input=[TEXTS[0]], encoding_format="float",
                                     dimensions=backend.dim, user="someone")
    np.testing.assert_allclose(by_id.data[0].embedding, expected, atol=1e-5)
    # the raw base64 answer is little-endian float32 bytes
    r = http.post("/v1/embeddings", json={"model": "mimic-tiny", "input": TEXTS[0], "encoding_format": "base64"})
    raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(raw, expected, atol=1e-5)


def test_image_and_image_with_caption_content_parts(live):
    url, backend, http = live
    client = client_for(url)
    image_part = {"type": "image_url", "image_url": {"url": CAT_URI}}
    result = client.embeddings.create(model="mimic-tiny", input=[
        [image_part, {"type": "text", "text": "a cat on a sofa"}],  # image + caption: one item
        [image_part],                                                # image only
        [{"type": "text", "text": TEXTS[1]}],                        # text as a content part
        image_part,                                                  # one part on its own
    ])
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    image = base64.b64encode(CAT).decode()
    expected = embed_route(http, [{"image": image, "caption": "a cat on a sofa"}, {"image": image},
                                  {"text": TEXTS[1]}, {"image": image}])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got[0], got[1], atol=1e-3)  # the caption changes the vector
    visual = backend.preprocessor.config.visual_tokens_per_image
    assert result.usage.prompt_tokens == (text_tokens(backend, "a cat on a sofa") + text_tokens(backend, None)
                                          + text_tokens(backend, TEXTS[1]) + text_tokens(backend, None) + 3 * visual)
    # infinity's convention: modality "image" and data: URIs as the input strings
    infinity = client.embeddings.create(model="mimic-tiny", input=[CAT_URI], extra_body={"modality": "image"})
    np.testing.assert_allclose(infinity.data[0].embedding, expected[1], atol=1e-5)


def test_input_type_query_is_the_query_role(live):
    url, _, http = live
    result = client_for(url).embeddings.create(model="mimic-tiny", input=[TEXTS[3]], extra_body={"input_type": "query"})
    np.testing.assert_allclose(result.data[0].embedding, embed_route(http, [{"text": TEXTS[3]}], role="query")[0],
                               atol=1e-5)
    r = http.post("/v1/embeddings", json={"model": "mimic-tiny", "input": "a", "input_type": "passage"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "input_type"


def test_client_errors_carry_openai_error_shape(live):
    url, backend, _ = live
    client = client_for(url)
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert caught.value.body["code"] == "model_not_found" and "mimic-tiny" in caught.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.embeddings.create(model="mimic-tiny", input="hello", dimensions=backend.dim // 2)
    error = caught.value.body
    assert error["param"] == "dimensions" and f"have {backend.dim} dimensions" in error["message"]
    assert error["type"] == "invalid_request_error"


def post_raw(http, body: bytes):
    return http.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("body, status, code, param, says", [
    ({"input": [[101, 2023]]}, 422, "token_ids_unsupported", "input", "check_embedding_ctx_length=False"),
    ({"input": [7]}, 422, "token_ids_unsupported", "input", "token ids"),
    ({"input": [[{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]]}, 422,
     "remote_image_refused", "input", "data: URI"),
    ({"input": ["http://169.254.169.254/latest"], "modality": "image"}, 422, "remote_image_refused", "input", "not fetched"),
    ({"input": ["aGVsbG8="], "modality": "image"}, 422, "invalid_image", "input", "not a base64 data: URI"),
    ({"input": [[{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]]}, 422,
     "invalid_image", "input", "input[0].images[0]"),
    ({"input": [[{"type": "audio", "data": "x"}]]}, 422, "invalid_input", "input", "expected 'text' or 'image_url'"),
    ({"input": [[]]}, 422, "empty_item", "input", "empty list of content parts"),
    ({"input": []}, 422, "empty_request", "input", "'input' is empty"),
    ({"input": [""]}, 422, "empty_item", "input", "input[0]"),
    ({"input": ["a"] * 9}, 413, "too_many_items", "input", "the limit is 8"),
    ({"input": "x" * 20_001}, 413, "text_too_long", "input", "20001 characters"),
    ({"input": [[{"type": "image_url", "image_url": {"url": CAT_URI}}] * 5]}, 422, "too_many_images", "input",
     "at most 4"),
    ({"input": "a", "encoding_format": "hex"}, 422, "invalid_request", "encoding_format", "'float' or 'base64'"),
    ({"input": "a", "temperature": 1}, 422, "invalid_request", "temperature", "Extra inputs"),
])
def test_refusals_name_the_problem(live, body, status, code, param, says):
    _, _, http = live
    r = http.post("/v1/embeddings", json={"model": "mimic-tiny", **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert says in error["message"]


def test_lone_surrogates_are_refused_not_500(live):
    _, _, http = live
    cases = [b'{"model": "mimic-tiny", "input": ["fine", "bad \\ud800 text"]}',
             b'{"model": "mimic-tiny", "input": [[{"type": "text", "text": "\\udfff"}]]}',
             b'{"model": "mimic-\\ud800", "input": "a"}',
             b'{"model": "mimic-tiny", "input": "a", "\\ud800": 1}',
             b'{"model": "mimic-tiny", "input": "a", "user": "\\ud800"}']
    answers = [post_raw(http, body) for body in cases]
    assert [r.status_code for r in answers] == [422, 422, 404, 422, 200], [r.text for r in answers]
    first = answers[0].json()["error"]
    assert first["code"] == "invalid_text" and "input[1]: character 4 is a lone UTF-16 surrogate" in first["message"]


def test_bad_json_and_metrics(live):
    _, _, http = live
    r = post_raw(http, b'{"model": "mimic-tiny", "input": ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert http.post("/embeddings", json={"model": "mimic-tiny", "input": "via the path without /v1"}).status_code == 200
    metrics = http.get("/metrics").text
    assert 'mimic_http_requests_total{method="POST",route="/v1/embeddings",status="200"}' in metrics
    assert 'route="/embeddings",status="200"' in metrics and "mimic_batch_size_count" in metrics


def test_body_limit_answers_in_openai_shape(tiny_encoders, tmp_path):
    from fastapi.testclient import TestClient

    from mimic_engine.index import DocumentIndex
    from mimic_engine.runtime.torch_backend import TorchBackend
    from mimic_engine.server.app import create_app
    from mimic_engine.server.settings import ServerSettings

    backend = TorchBackend.from_encoder(tiny_encoders("decoder"))
    index = DocumentIndex(str(tmp_path / "index"), backend.dim, backend.model_id)
    with TestClient(create_app(ServerSettings(max_body_bytes=1000), backend, index)) as c:
        r = c.post("/v1/embeddings", json={"model": "x", "input": "y" * 2000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert r.json()["error"]["type"] == "invalid_request_error" and "max_body_bytes" in r.json()["error"]["message"]
        # the default name is mimic-<first 12 characters of the model id>
        assert c.get("/v1/models").json()["data"][0]["id"] == "mimic-" + backend.model_id[:12]
        # the project's own routes keep the project's shape
        r = c.post("/v1/embed", json={"items": [{"text": "y" * 2000}]})
        assert r.status_code == 413 and set(r.json()["error"]) == {"code", "message"}
