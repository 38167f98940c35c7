"""OpenAI-compatible embeddings, for the tools that speak OpenAI's API (the `openai` client, LangChain's
OpenAIEmbeddings, LlamaIndex, most RAG frameworks):

    POST /v1/embeddings   (also /embeddings)   {"model", "input", "encoding_format"?, "dimensions"?, "user"?,
                                                "input_type"?, "modality"?}
    GET  /v1/models       (also /models)       the served model, OpenAI's list shape
    GET  /v1/models/{model}

`input` is a string, a list of strings, or a list of multimodal items; a multimodal item is a list of
content parts in OpenAI's chat format, so text, an image, or an image with its caption is one item:

    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}, {"type": "text", "text": "a cat"}]

Extensions: `input_type` "query" | "document" (the role; default "document", as /v1/embed) and
infinity's `modality: "image"`, under which every string of `input` is an image (a data: URI).
Images travel inline only: an http(s) URL is refused, because fetching it would let any caller make
the server reach any address.

`model` must name the served model: its listed name (`--model-name`, default `mimic-<first 12 hex
of the model id>`), its model id, or the id's first 12 or 16 hex; anything else is a 404
`model_not_found`, so a client configured for another model fails loudly instead of mixing vectors
of two models. `usage` counts the tokens the model read: text tokens after truncation plus the
visual tokens of each image. Vectors are L2-normalised float32, as from /v1/embed; base64 is
their little-endian bytes.

The limits, batching and metrics are /v1/embed's (routes.to_item, routes.encode, the middleware);
errors use OpenAI's shape (api_errors.OPENAI_PATHS).
"""
from __future__ import annotations

import base64
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from .api_errors import ApiError, error_responses
from .routes import ServerState, check_count, encode, server_state, to_item
from .schemas import ItemIn

router = APIRouter(tags=["openai"])


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="The served model's name (GET /v1/models), its model id, or the id's first 12 hex")
    input: str | list = Field(description="A string, a list of strings, or a list of multimodal items (each a list "
                                          "of content parts: {type: text, text} and {type: image_url, image_url: "
                                          "{url: data:...}})")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: int | None = Field(None, description="Must equal the model's dimension when given (no shortening)")
    user: str | None = Field(None, description="Accepted and ignored")
    input_type: Literal["query", "document"] = Field("document", description="Extension: the role to embed as")
    modality: Literal["text", "image"] = Field("text", description="Extension (infinity's): 'image' makes every "
                                               "string of input an image data: URI")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# ---- the served model -----------------------------------------------------------------------------
def served_model_name(state: ServerState) -> str:
    return state.settings.model_name or f"mimic-{state.backend.model_id[:12]}"


def model_names(state: ServerState) -> set[str]:
    """Every name a request's `model` may use for the served model."""
    model_id = state.backend.model_id
    return {served_model_name(state), model_id, model_id[:12], model_id[:16]}


def check_model(model: str, state: ServerState) -> None:
    if model not in model_names(state):
        raise ApiError(404, "model_not_found", f"model={model!r} is not served here; this server serves "
                       f"{served_model_name(state)!r} (GET /v1/models lists it)", param="model")


def model_card(state: ServerState) -> dict:
    """The served model in OpenAI's shape, plus what an embedding client needs to know about it."""
    return {"id": served_model_name(state), "object": "model", "created": state.created, "owned_by": "mimic-engine",
            "model_id": state.backend.model_id, "dimensions": state.backend.dim,
            "max_input_tokens": state.backend.preprocessor.max_length, "max_images_per_item": state.max_images}


# ---- input -> items ---------------------------------------------------------------------------------
def invalid_input(message: str, code: str = "invalid_input") -> ApiError:
    return ApiError(422, code, message, param="input")


def checked_text(text: str, name: str) -> str:
    """`text`, refused when it holds a lone UTF-16 surrogate (JSON can carry one; no tokenizer can read it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid_input(f"{name}: character {exc.start} is a lone UTF-16 surrogate ({text[exc.start]!r}), which "
                            "is not Unicode text; send valid UTF-8", "invalid_text") from None
    return text


def inline_image(url: Any, name: str) -> str:
    """An image URL of a request -> the base64 data: URI it must be (no server-side fetching)."""
    if not isinstance(url, str):
        raise invalid_input(f"{name}: expected an image URL string (data:image/...;base64,...), got "
                            f"{type(url).__name__}")
    if url[:8].lower().startswith(("http://", "https://")):
        raise invalid_input(f"{name}: remote image URLs are not fetched (that would let any caller make this server "
                            "reach any address); send the image inline as a data: URI, "
                            "data:image/png;base64,<the file's bytes in base64>", "remote_image_refused")
    header = url.split(",", 1)[0].lower()
    if not header.startswith("data:") or "," not in url or not header.endswith(";base64"):
        raise invalid_input(f"{name}: {url[:40]!r}... is not a base64 data: URI; send "
                            "data:image/png;base64,<the file's bytes in base64>", "invalid_image")
    return url


def content_parts_item(parts: list, name: str) -> ItemIn:
    """A list of OpenAI content parts -> one item: the text parts joined by newlines, the images in order."""
    texts, images = [], []
    for j, part in enumerate(parts):
        where = f"{name}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid_input(f"{where}: a text part needs 'text', a string")
            texts.append(checked_text(part["text"], f"{where}.text"))
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(inline_image(url.get("url") if isinstance(url, dict) else url, f"{where}.image_url.url"))
        elif isinstance(part, dict):
            raise invalid_input(f"{where}.type={kind!r}: expected 'text' or 'image_url'")
        else:
            raise invalid_input(f"{where}: a content part is an object ({{\"type\": \"text\", \"text\": ...}} or "
                                f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:...\"}}}}), got "
                                f"{type(part).__name__}")
    if not texts and not images:
        raise invalid_input(f"{name}: an empty list of content parts; send a text part, an image_url part, or both",
                            "empty_item")
    return ItemIn(text="\n".join(texts) if texts else None, images=images or None)


def request_items(body: EmbeddingsRequest) -> list[ItemIn]:
    """The items of a request's `input`, one per entry."""
    entries = [body.input] if isinstance(body.input, str) else body.input
    items = []
    for i, entry in enumerate(entries):
        name = f"input[{i}]"
        if body.modality == "image":
            if not isinstance(entry, str):
                raise invalid_input(f"{name}: with modality 'image' every input is an image data: URI string, got "
                                    f"{type(entry).__name__}")
            items.append(ItemIn(image=inline_image(entry, name)))
        elif isinstance(entry, str):
            items.append(ItemIn(text=checked_text(entry, name)))
        elif isinstance(entry, dict):  # one content part on its own
            items.append(content_parts_item([entry], name))
        elif isinstance(entry, int) or (isinstance(entry, list) and entry and all(isinstance(t, int) for t in entry)):
            raise invalid_input(f"{name}: token ids are not accepted (this model has its own tokenizer); send the text "
                                "itself. LangChain's OpenAIEmbeddings sends token ids unless "
                                "check_embedding_ctx_length=False", "token_ids_unsupported")
        elif isinstance(entry, list):
            items.append(content_parts_item(entry, name))
        else:
            raise invalid_input(f"{name}: expected a string or a list of content parts, got {type(entry).__name__}")
    return items


def embedding_value(vector, encoding_format: str) -> list[float] | str:
    """(dim,) float32 -> a JSON list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class OpenAIErrorResponse(BaseModel):
    """The shape of every 4xx/5xx answer on these routes: OpenAI's."""

    error: OpenAIErrorBody


# ---- routes ---------------------------------------------------------------------------------------
@router.post("/v1/embeddings", response_model=EmbeddingsResponse,
             responses=error_responses(400, 404, 413, 422, 503, model=OpenAIErrorResponse))
@router.post("/embeddings", response_model=EmbeddingsResponse, include_in_schema=False)
def create_embeddings(body: EmbeddingsRequest, state: ServerState = Depends(server_state)):
    """OpenAI's embeddings API over this model: text, images (data: URIs) and image+caption items."""
    check_model(body.model, state)
    dim = state.backend.dim
    if body.dimensions is not None and body.dimensions != dim:
        raise ApiError(422, "invalid_dimensions", f"dimensions={body.dimensions!r}: this model's embeddings have {dim} "
                       f"dimensions and cannot be shortened; leave 'dimensions' out or send {dim}", param="dimensions")
    entries = request_items(body)
    try:
        check_count(len(entries), "input", state.settings.max_items)
        items = [to_item(x, f"input[{i}]", state.settings, state.max_images)[0] for i, x in enumerate(entries)]
    except ApiError as exc:
        exc.param = exc.param or "input"
        raise
    result = encode(state, items, body.input_type)
    tokens = sum(result.tokens)
    return EmbeddingsResponse(
        data=[Embedding(index=i, embedding=embedding_value(v, body.encoding_format)) for i, v in enumerate(result.vectors)],
        model=served_model_name(state), usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
def list_models(state: ServerState = Depends(server_state)):
    """The served model, in OpenAI's list shape (tools read its `id` to fill `model`)."""
    return {"object": "list", "data": [model_card(state)]}


@router.get("/v1/models/{model:path}", responses=error_responses(404, model=OpenAIErrorResponse))
@router.get("/models/{model:path}", include_in_schema=False)
def retrieve_model(model: str, state: ServerState = Depends(server_state)):
    check_model(model, state)
    return model_card(state)
