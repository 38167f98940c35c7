"""The routes of the HTTP API, and the helpers they are made of, as plain functions.

Every handler takes the server's `ServerState` (settings, backend, index, encoder, metrics) as an
argument, which FastAPI fills from `app.state.server` (see `server_state`): a handler or helper can
be called on its own with any state. Handlers are plain `def`s: FastAPI runs them on its thread
pool, so image decoding and tokenising happen there (overlapping the model), encoding waits on the
batcher's worker thread, and the event loop never blocks. Refusals raise `ApiError`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Mapping

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response

from ..errors import InputError
from ..index.base import VectorIndex
from ..index.store import StoredDocument
from ..index.thumbnails import make_thumbnail, media_type
from ..preprocess import ImageFormatError, ImageTooLargeError, Item, decode_base64, decode_image
from ..runtime.base import Backend
from ..runtime.batcher import DirectEncoder, DynamicBatcher, EncodeResult
from .api_errors import ApiError, error_responses
from .metrics import ServerMetrics
from .schemas import (DeleteResponse, DocumentIn, DocumentOut, EmbedRequest, EmbedResponse, ItemIn, SearchHit,
                      SearchRequest, SearchResponse, UpsertRequest, UpsertResponse, document_out)
from .settings import ServerSettings


@dataclass
class ServerState:
    """Everything a route reads. create_app builds it and owns (closes) backend, index and encoder."""

    settings: ServerSettings
    backend: Backend
    index: VectorIndex
    encoder: DynamicBatcher | DirectEncoder
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))  # unix time the app was built (/v1/models)

    @property
    def max_images(self) -> int:
        return self.backend.preprocessor.config.vision.max_images_per_item


async def server_state(request: Request) -> ServerState:
    """Route dependency: the state of the app serving this request (async: no thread-pool hop)."""
    return request.app.state.server


# ---- helpers --------------------------------------------------------------------------------------
def check_api_key(headers: Mapping[str, str], api_key: str | None) -> None:
    """The key from 'Authorization: Bearer <key>' or 'X-API-Key' must equal `api_key` (None: no check)."""
    if api_key is None:
        return
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key")
    if not given:
        raise ApiError(401, "unauthorized", "this route needs an API key: send 'Authorization: Bearer <key>' or "
                       "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "unauthorized", "the API key is wrong", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request, state: ServerState = Depends(server_state)) -> None:
    """Route dependency of the write routes. FastAPI runs it before the body is validated, so an
    unauthenticated write gets 401 whatever its body (only unparseable JSON is answered 400 first)."""
    check_api_key(request.headers, state.settings.api_key)


def check_count(n: int, what: str, max_items: int) -> None:
    if n == 0:
        raise ApiError(422, "empty_request", f"'{what}' is empty; send at least one")
    if n > max_items:
        raise ApiError(413, "too_many_items", f"{n} {what} in one request; the limit is {max_items} "
                       "(max_items): split the request")


def decode_base64_image(data: str, name: str, max_pixels: int):
    """base64 -> (RGB PIL image, raw bytes). The image is opened once (preprocess.decode_image): a bomb
    is refused from its header, before any pixel is decoded."""
    try:
        raw = decode_base64(data, name)
    except InputError as exc:
        raise ApiError(422, "invalid_base64", str(exc)) from None
    try:
        return decode_image(raw, name, max_pixels), raw
    except ImageTooLargeError as exc:
        if exc.size is None:  # Pillow's own guard refused the header; the message names max_pixels
            raise ApiError(413, "image_too_large", str(exc)) from None
        w, h = exc.size
        raise ApiError(413, "image_too_large", f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of "
                       f"{max_pixels} (max_image_pixels); downscale it before sending") from None
    except ImageFormatError as exc:
        raise ApiError(422, "invalid_image", f"{name}: the bytes are not an image this server can read "
                       f"({exc.__cause__.__class__.__name__}); send PNG, JPEG, WebP, GIF or BMP") from None
    except InputError as exc:
        raise ApiError(422, "invalid_image", str(exc)) from None


def to_item(x: ItemIn, name: str, settings: ServerSettings, max_images: int) -> tuple[Item, bytes | None]:
    """-> (Item with decoded images, raw bytes of its first image or None)."""
    sources = ([x.image] if x.image is not None else []) + list(x.images or [])
    if x.text is not None and x.caption is not None:
        raise ApiError(422, "invalid_item", f"{name}: give 'text' or 'caption', not both (the caption is the "
                       "text of an image item)")
    if x.caption is not None and not sources:
        raise ApiError(422, "invalid_item", f"{name}: 'caption' belongs to an image, but the item has no image; "
                       "use 'text' for a text item")
    text = x.text if x.text is not None else x.caption
    if text is not None and len(text) > settings.max_text_chars:
        raise ApiError(413, "text_too_long", f"{name}: the text has {len(text)} characters; the limit is "
                       f"{settings.max_text_chars} (max_text_chars)")
    if not sources and (text is None or not text.strip()):
        raise ApiError(422, "empty_item", f"{name}: an item needs non-empty 'text', an 'image' (base64), or both")
    if len(sources) > max_images:
        raise ApiError(422, "too_many_images", f"{name}: {len(sources)} images; this model takes at most "
                       f"{max_images} per item")
    decoded = [decode_base64_image(s, f"{name}.images[{j}]", settings.max_image_pixels) for j, s in enumerate(sources)]
    return Item(text=text, images=[img for img, _ in decoded], name=name), (decoded[0][1] if decoded else None)


def check_document_ids(documents: list[DocumentIn], max_id_chars: int) -> None:
    """Each id 1 to `max_id_chars` printable characters, and given once."""
    seen = set()
    for i, d in enumerate(documents):
        if not d.id or len(d.id) > max_id_chars or not d.id.isprintable():
            raise ApiError(422, "invalid_id", f"documents[{i}].id={d.id[:80]!r}: an id must be 1 to "
                           f"{max_id_chars} printable characters")
        if d.id in seen:
            raise ApiError(422, "duplicate_id", f"documents[{i}].id={d.id!r} appears twice; send each id once")
        seen.add(d.id)


def check_metadata_sizes(documents: list[DocumentIn], max_bytes: int) -> None:
    """Metadata is returned with every search hit: each document's, as UTF-8 JSON, at most `max_bytes`."""
    for i, d in enumerate(documents):
        size = len(json.dumps(d.metadata, ensure_ascii=False).encode("utf-8"))
        if size > max_bytes:
            raise ApiError(413, "metadata_too_large", f"documents[{i}] ({d.id}): its metadata has {size} bytes as JSON; "
                           f"the limit is {max_bytes} (max_metadata_bytes): keep large data elsewhere and store a "
                           "reference to it")


def to_stored_document(d: DocumentIn, item: Item, raw: bytes | None, thumbnail: bool = True) -> StoredDocument:
    """What the index keeps of an uploaded document: an inline image is referred to by its sha256, and
    (with `thumbnail`) kept as a small preview of its first image."""
    image_ref = d.image_ref or (f"inline:{hashlib.sha256(raw).hexdigest()}" if raw is not None else None)
    is_image = item.modality == "image"
    return StoredDocument(id=d.id, modality=item.modality, text=None if is_image else item.text,
                          caption=item.text if is_image else None, image_ref=image_ref, metadata=d.metadata,
                          thumbnail=make_thumbnail(item.images[0]) if thumbnail and item.images else None)


def encode(state: ServerState, items: list[Item], role: str) -> EncodeResult:
    result = state.encoder.encode(items, role, timeout=state.settings.request_timeout_s)
    if any(result.truncated):
        state.metrics.truncated.inc(sum(result.truncated))
    return result


def finish_timings(state: ServerState, timings: dict, response: Response | None) -> None:
    """Record a request's stage times ({stage: seconds}) in the metrics and, when `timing_header` is on, in
    a `Server-Timing` header (ms, as browsers' developer tools show it)."""
    state.metrics.observe_stages(timings)
    if response is not None and state.settings.timing_header:
        response.headers["Server-Timing"] = ", ".join(f"{stage};dur={1e3 * s:.2f}" for stage, s in timings.items())


def embed_json(vectors, truncated: list, dim: int, model_id: str) -> bytes:
    """The EmbedResponse body, serialised straight from the (N, E) float32 array: each float is written
    with the shortest decimal that reads back as the same float32 (no list of Python floats, no model
    validation of N x E numbers)."""
    return orjson.dumps({"embeddings": vectors, "dim": dim, "truncated": truncated, "model_id": model_id},
                        option=orjson.OPT_SERIALIZE_NUMPY)


# ---- routes ---------------------------------------------------------------------------------------
router = APIRouter()


@router.post("/v1/embed", response_model=EmbedResponse, tags=["encode"], responses=error_responses(400, 413, 422, 503))
def embed(body: EmbedRequest, state: ServerState = Depends(server_state)):
    """Embed items (text, image or image+text) into the shared space; `role` = query or document.
    The `Server-Timing` header gives the request's preprocess, queue, model and respond times (ms)."""
    check_count(len(body.items), "items", state.settings.max_items)
    items = [to_item(x, f"items[{i}]", state.settings, state.max_images)[0] for i, x in enumerate(body.items)]
    result = encode(state, items, body.role)
    t0 = time.monotonic()
    response = Response(embed_json(result.vectors, result.truncated, state.backend.dim, state.backend.model_id),
                        media_type="application/json")
    finish_timings(state, {**result.timings, "respond": time.monotonic() - t0}, response)
    return response


@router.post("/v1/documents", response_model=UpsertResponse, tags=["documents"],
             dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 413, 422, 503, 507))
def upsert(body: UpsertRequest, response: Response, state: ServerState = Depends(server_state)):
    """Insert or replace documents. Answered only once the index has made them durable."""
    check_count(len(body.documents), "documents", state.settings.max_items)
    check_document_ids(body.documents, state.settings.max_id_chars)
    check_metadata_sizes(body.documents, state.settings.max_metadata_bytes)
    converted = [to_item(d, f"documents[{i}] ({d.id})", state.settings, state.max_images)
                 for i, d in enumerate(body.documents)]
    result = encode(state, [item for item, _ in converted], "document")
    docs = [to_stored_document(d, item, raw, state.settings.thumbnails) for d, (item, raw) in
            zip(body.documents, converted)]
    t0 = time.monotonic()
    upserted = state.index.upsert(docs, result.vectors)
    finish_timings(state, {**result.timings, "index": time.monotonic() - t0}, response)
    return UpsertResponse(upserted=upserted, truncated=result.truncated)


THUMBNAIL_SUFFIX = "/thumbnail"


# before the document route: its `path` id would swallow the suffix
@router.get(f"/v1/documents/{{doc_id:path}}{THUMBNAIL_SUFFIX}", tags=["documents"],
            responses={200: {"content": {"image/webp": {}, "image/jpeg": {}}, "description": "The thumbnail"},
                       304: {"description": "Not modified: the If-None-Match ETag is the thumbnail's"},
                       **error_responses(404, 422)})
def get_thumbnail(doc_id: str, request: Request, state: ServerState = Depends(server_state)):
    """An image document's thumbnail (WebP, at most 256 px), stored at upsert; 404 when it has none."""
    data = state.index.thumbnail(doc_id)
    if data is None:
        if state.index.get(doc_id + THUMBNAIL_SUFFIX) is not None:  # an id that itself ends in /thumbnail
            return get_document(doc_id + THUMBNAIL_SUFFIX, state)
        doc = state.index.get(doc_id)
        if doc is None:
            raise ApiError(404, "not_found", f"no document with id {doc_id!r}")
        why = (
            "it is a text document" if doc.modality == "text"
            else "it was stored with thumbnails turned off, or before the index kept them (upsert it again)")
        raise ApiError(404, "no_thumbnail", f"document {doc_id!r} has no thumbnail: {why}")
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    # revalidated on every use (a replaced document gets a new thumbnail), answered 304 while unchanged
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type(data), headers=headers)


@router.get("/v1/documents/{doc_id:path}", response_model=DocumentOut, tags=["documents"],
            responses=error_responses(404, 405, 503))
def get_document(doc_id: str, state: ServerState = Depends(server_state)):
    doc = state.index.get(doc_id)
    if doc is None:
        raise ApiError(404, "not_found", f"no document with id {doc_id!r}")
    return document_out(doc)


@router.delete("/v1/documents/{doc_id:path}", response_model=DeleteResponse, tags=["documents"],
               dependencies=[Depends(require_api_key)], responses=error_responses(401, 404, 405, 503, 507))
def delete_document(doc_id: str, state: ServerState = Depends(server_state)):
    if not state.index.delete(doc_id):
        raise ApiError(404, "not_found", f"no document with id {doc_id!r}")
    return {"deleted": doc_id}


def run_search(state: ServerState, body: SearchRequest, response: Response | None = None) -> SearchResponse:
    """The search behind POST /v1/search and the search page (`response`: where the stage timings go)."""
    max_k = state.settings.max_k
    if not 1 <= body.k <= max_k:
        raise ApiError(422, "invalid_k", f"k={body.k!r}; expected an integer from 1 to {max_k} (max_k)")
    item, _ = to_item(body.query, "query", state.settings, state.max_images)
    result = encode(state, [item], "query")
    t0 = time.monotonic()
    hits = state.index.search(result.vectors[0], body.k, modality=body.modality)
    finish_timings(state, {**result.timings, "index": time.monotonic() - t0}, response)
    return SearchResponse(results=[document_out(doc, SearchHit, score=float(score)) for doc, score in hits],
                          truncated=result.truncated[0])


@router.post("/v1/search", response_model=SearchResponse, tags=["search"], responses=error_responses(400, 413, 422, 503))
def search(body: SearchRequest, response: Response, state: ServerState = Depends(server_state)):
    """Top-k documents for a text, image or image+text query, optionally of one modality."""
    return run_search(state, body, response)


@router.get("/healthz", tags=["operations"])
def healthz():
    """The process is up (liveness)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], responses=error_responses(503))
def readyz(state: ServerState = Depends(server_state)):
    """Ready to answer: the batcher runs and the index answers."""
    if not getattr(state.encoder, "alive", True):
        raise ApiError(503, "not_ready", "the encoder is not running (starting or shutting down)")
    try:
        documents = state.index.count()
    except Exception as exc:
        raise ApiError(503, "not_ready", f"the index is not available ({exc.__class__.__name__}: {exc})") from None
    return {"status": "ready", "backend": state.backend.name, "model_id": state.backend.model_id,
            "documents": documents}


@router.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
def prometheus_metrics(state: ServerState = Depends(server_state)):
    body, content_type = state.metrics.render()
    return PlainTextResponse(body, media_type=content_type)


@router.get("/v1/info", tags=["operations"], responses=error_responses(503))
def info(state: ServerState = Depends(server_state)):
    """Backend, model, index statistics and the server's limits."""
    return {"backend": state.backend.capabilities(), "index": state.index.stats(), "batching": state.encoder.batching,
            "settings": state.settings.public(), "max_images_per_item": state.max_images,
            "max_text_tokens": state.backend.preprocessor.max_length}
