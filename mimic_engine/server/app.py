"""The HTTP API: embed, store, search; health, readiness and Prometheus metrics.

    app = create_app(settings, backend, index)     # FastAPI; serve with uvicorn
    POST /v1/embed            {"items": [item], "role": "query"|"document"}
    POST /v1/documents        {"documents": [{"id", ...item, "metadata"}]}     (API key when set)
    GET/DELETE /v1/documents/{id}                                              (DELETE: API key)
    POST /v1/search           {"query": item, "k": 10, "modality": "text"|"image"|null}
    GET /healthz  /readyz  /metrics  /v1/info  /docs

An item is {"text"?, "image"? (base64), "images"? [base64], "caption"?}; the caption is the text of
an image item. Route functions are plain `def`s: FastAPI runs them on its thread pool, so image
decoding and tokenising happen there (overlapping the model), encoding waits on the batcher's
worker thread, and the event loop never blocks. Every 4xx/5xx answer has one shape:

    {"error": {"code": "invalid_image", "message": "...", "details": ...}}

An upsert is acknowledged only after the index has made it durable (DocumentIndex.upsert returns).
"""
from __future__ import annotations

import hashlib
import hmac
import io
import logging
import math
import time
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, MimicError
from ..index.document_index import IndexClosedError
from ..preprocess import IMAGE_FORMATS, Item, decode_base64, load_image
from ..runtime.batcher import EncodeTimeoutError, EncoderClosedError, QueueFullError, make_encoder
from .settings import ServerSettings

log = logging.getLogger("mimic_engine.server")


# ---- errors ---------------------------------------------------------------------------------------
class ApiError(HTTPException):
    """An error answered as {"error": {"code", "message", "details"?}} with `status`."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.code = code
        self.details = details


def error_response(status: int, code: str, message: str, details: Any = None, headers: dict | None = None):
    body = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
                 422: "invalid_request", 429: "too_many_requests", 503: "unavailable"}


# ---- request and response bodies ------------------------------------------------------------------
class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="Passage, query or question text")
    image: str | None = Field(None, description="One image, base64 (a data: URL is accepted)")
    images: list[str] | None = Field(None, description="Several images of one item, base64")
    caption: str | None = Field(None, description="The text of an image item (use instead of text)")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemIn]
    role: Literal["query", "document"] = "document"


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    truncated: list[bool] = Field(description="Per item: its text was cut to the model's max_length tokens")
    model_id: str


class DocumentIn(ItemIn):
    id: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    image_ref: str | None = Field(None, description="Where the image lives (stored, returned by search; optional)")

    @field_validator("metadata")
    @classmethod
    def _finite_numbers_only(cls, metadata: dict) -> dict:
        """Python's JSON parser accepts NaN and Infinity, which JSON does not have: stored, they would come
        back as null (data changed silently), so they are refused here with the key that holds them."""
        bad = _non_finite_path(metadata, "metadata")
        if bad is not None:
            raise ValueError(f"{bad} is NaN or Infinity, which JSON cannot carry; send a finite number, a string "
                             "or null")
        return metadata


def _non_finite_path(value, path: str) -> str | None:
    """The path of the first non-finite float inside nested dicts / lists, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        bad = _non_finite_path(child, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")
        if bad is not None:
            return bad
    return None


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn]


class UpsertResponse(BaseModel):
    upserted: int
    truncated: list[bool]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: ItemIn
    k: int = 10
    modality: Literal["text", "image"] | None = None


class DocumentOut(BaseModel):
    id: str
    modality: str
    text: str | None = None
    caption: str | None = None
    image_ref: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchHit(DocumentOut):
    score: float


class SearchResponse(BaseModel):
    results: list[SearchHit]
    truncated: bool


def _doc_out(doc, cls=DocumentOut, **extra):
    return cls(id=doc.id, modality=doc.modality, text=doc.text, caption=doc.caption, image_ref=doc.image_ref,
               metadata=doc.metadata, **extra)


# ---- metrics --------------------------------------------------------------------------------------
class ServerMetrics:
    """Prometheus series in a registry of their own (several apps can live in one process)."""

    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self, index):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("mimic_http_requests_total", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("mimic_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route", "method"], buckets=self.LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mimic_batch_size", "Items per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("mimic_batch_padded_tokens", "Padded text + visual tokens per model batch",
                                      buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768), registry=r)
        self.batch_seconds = Histogram("mimic_batch_duration_seconds", "Model time per batch",
                                       buckets=self.LATENCY_BUCKETS, registry=r)
        self.truncated = Counter("mimic_truncated_texts_total", "Texts cut to the model's max_length", registry=r)
        self.queue_depth = Gauge("mimic_encode_queue_depth", "Items admitted to the encoder and not yet answered",
                                 registry=r)
        r.register(_IndexCollector(index))

    def observe_batch(self, items: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(items)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)


class _IndexCollector:
    """mimic_index_documents{modality}, read from the index at scrape time."""

    def __init__(self, index):
        self.index = index

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("mimic_index_documents", "Documents in the index by modality", labels=["modality"])
        try:
            for modality in ("text", "image"):
                family.add_metric([modality], self.index.count(modality))
        except Exception as exc:  # a closed index must not break the scrape
            log.warning("metrics: cannot count index documents: %s", exc)
        yield family


class _LimitsAndMetrics:
    """ASGI middleware: rejects bodies over `max_body_bytes` (413) and records every request's
    status and latency under its route template (ids never become label values)."""

    def __init__(self, app, metrics: ServerMetrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                response = error_response(413, "body_too_large", f"the request body has {length.decode(errors='replace')} "
                                          f"bytes; the limit is {self.max_body_bytes} (max_body_bytes): send fewer "
                                          "items per request or smaller images")
                return await response(scope, receive, send_wrapper)
            received = [0]

            async def receive_wrapper():  # bodies without a content-length are counted as they stream
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > self.max_body_bytes:
                        raise ApiError(413, "body_too_large", f"the request body exceeds {self.max_body_bytes} bytes "
                                       "(max_body_bytes)")
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status[0])).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)


# ---- the app --------------------------------------------------------------------------------------
def create_app(settings: ServerSettings, backend, index) -> FastAPI:
    """The API over `backend` (a runtime Backend) and `index` (a DocumentIndex). The app owns both:
    it closes them (after draining the batcher) when it shuts down."""
    settings.validate()
    metrics = ServerMetrics(index)
    encoder = make_encoder(backend, settings.batching, max_batch=settings.max_batch,
                           max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms,
                           max_queue=settings.max_queue, observer=metrics.observe_batch)
    metrics.queue_depth.set_function(lambda: encoder.queue_depth)
    max_images = backend.preprocessor.config.vision.max_images_per_item

    @asynccontextmanager
    async def lifespan(app):
        yield
        try:
            encoder.close()  # drains queued requests first
        finally:
            try:
                index.close()  # final graph snapshot; the store is already durable
            finally:
                backend.close()

    app = FastAPI(title="mimic-engine", version="0.1.0", lifespan=lifespan,
                  description="Universal multimodal retrieval: embed text, images and image+text items into one "
                              "space and search one mixed index.")
    app.add_middleware(_LimitsAndMetrics, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    app.state.settings, app.state.backend, app.state.index, app.state.encoder = settings, backend, index, encoder

    # ---- error handlers: one JSON shape for every 4xx/5xx ------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, ApiError):
            return error_response(exc.status_code, exc.code, exc.detail, exc.details, exc.headers)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        raw = exc.errors()
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in raw]
        bad_json = [e for e in raw if e.get("type") == "json_invalid"]
        if bad_json:
            why = str((bad_json[0].get("ctx") or {}).get("error", "JSON decode error"))
            at = bad_json[0].get("loc", ("body", "?"))[-1]
            return error_response(400, "invalid_json", f"the request body is not valid JSON: {why} at character {at}",
                                  errors)
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        return error_response(422, "invalid_request", f"{where}: {first['msg']}", errors)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, exc: QueueFullError):
        return error_response(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(MimicError)
    async def _mimic_error(request: Request, exc: MimicError):
        if isinstance(exc, (EncodeTimeoutError, EncoderClosedError, IndexClosedError)):
            return error_response(503, "unavailable", str(exc), headers={"Retry-After": "1"})
        if isinstance(exc, InputError):
            return error_response(422, "invalid_input", str(exc))
        return error_response(400, "bad_request", str(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"the server failed on this request ({exc.__class__.__name__}); "
                              "it has been logged")

    # ---- helpers -----------------------------------------------------------------------------------
    def require_api_key(request: Request) -> None:
        """A route dependency: FastAPI runs it before the body is validated, so an unauthenticated write
        gets 401 whatever its body (only unparseable JSON is answered 400 first)."""
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
        if not given:
            raise ApiError(401, "unauthorized", "this route needs an API key: send 'Authorization: Bearer <key>' or "
                           "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "the API key is wrong", headers={"WWW-Authenticate": "Bearer"})

    def check_count(n: int, what: str) -> None:
        if n == 0:
            raise ApiError(422, "empty_request", f"'{what}' is empty; send at least one")
        if n > settings.max_items:
            raise ApiError(413, "too_many_items", f"{n} {what} in one request; the limit is {settings.max_items} "
                           "(max_items): split the request")

    def decode_image(data: str, name: str):
        """base64 -> (RGB PIL image, raw bytes); bombs are refused from the header, before decoding."""
        from PIL import Image

        try:
            raw = decode_base64(data, name)
        except InputError as exc:
            raise ApiError(422, "invalid_base64", str(exc)) from None
        try:
            with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as probe:
                w, h = probe.size
        except Image.DecompressionBombError as exc:
            raise ApiError(413, "image_too_large", f"{name}: {exc}") from None
        except Exception as exc:
            raise ApiError(422, "invalid_image", f"{name}: the bytes are not an image this server can read "
                           f"({exc.__class__.__name__}); send PNG, JPEG, WebP, GIF or BMP") from None
        if w * h > settings.max_image_pixels:
            raise ApiError(413, "image_too_large", f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of "
                           f"{settings.max_image_pixels} (max_image_pixels); downscale it before sending")
        try:
            return load_image(raw, name, settings.max_image_pixels), raw
        except InputError as exc:
            raise ApiError(422, "invalid_image", str(exc)) from None

    def to_item(x: ItemIn, name: str) -> tuple[Item, bytes | None]:
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
        decoded = [decode_image(s, f"{name}.images[{j}]") for j, s in enumerate(sources)]
        return Item(text=text, images=[img for img, _ in decoded], name=name), (decoded[0][1] if decoded else None)

    def encode(items: list[Item], role: str):
        result = encoder.encode(items, role, timeout=settings.request_timeout_s)
        if any(result.truncated):
            metrics.truncated.inc(sum(result.truncated))
        return result

    # ---- routes ------------------------------------------------------------------------------------
    @app.post("/v1/embed", response_model=EmbedResponse, tags=["encode"])
    def embed(body: EmbedRequest):
        """Embed items (text, image or image+text) into the shared space; `role` = query or document."""
        check_count(len(body.items), "items")
        items = [to_item(x, f"items[{i}]")[0] for i, x in enumerate(body.items)]
        result = encode(items, body.role)
        return EmbedResponse(embeddings=result.vectors.tolist(), dim=backend.dim, truncated=result.truncated,
                             model_id=backend.model_id)

    @app.post("/v1/documents", response_model=UpsertResponse, tags=["documents"],
              dependencies=[Depends(require_api_key)])
    def upsert(body: UpsertRequest):
        """Insert or replace documents. Answered only once the index has made them durable."""
        from ..index import StoredDocument

        check_count(len(body.documents), "documents")
        seen = set()
        for i, d in enumerate(body.documents):
            if not d.id or len(d.id) > settings.max_id_chars or not d.id.isprintable():
                raise ApiError(422, "invalid_id", f"documents[{i}].id={d.id[:80]!r}: an id must be 1 to "
                               f"{settings.max_id_chars} printable characters")
            if d.id in seen:
                raise ApiError(422, "duplicate_id", f"documents[{i}].id={d.id!r} appears twice; send each id once")
            seen.add(d.id)
        converted = [to_item(d, f"documents[{i}] ({d.id})") for i, d in enumerate(body.documents)]
        result = encode([item for item, _ in converted], "document")
        docs = []
        for d, (item, raw) in zip(body.documents, converted):
            image_ref = d.image_ref or (f"inline:{hashlib.sha256(raw).hexdigest()}" if raw is not None else None)
            is_image = item.modality == "image"
            docs.append(StoredDocument(id=d.id, modality=item.modality, text=None if is_image else item.text,
                                       caption=item.text if is_image else None, image_ref=image_ref,
                                       metadata=d.metadata))
        return UpsertResponse(upserted=index.upsert(docs, result.vectors), truncated=result.truncated)

    @app.get("/v1/documents/{doc_id:path}", response_model=DocumentOut, tags=["documents"])
    def get_document(doc_id: str):
        doc = index.get(doc_id)
        if doc is None:
            raise ApiError(404, "not_found", f"no document with id {doc_id!r}")
        return _doc_out(doc)

    @app.delete("/v1/documents/{doc_id:path}", tags=["documents"], dependencies=[Depends(require_api_key)])
    def delete_document(doc_id: str):
        if not index.delete(doc_id):
            raise ApiError(404, "not_found", f"no document with id {doc_id!r}")
        return {"deleted": doc_id}

    @app.post("/v1/search", response_model=SearchResponse, tags=["search"])
    def search(body: SearchRequest):
        """Top-k documents for a text, image or image+text query, optionally of one modality."""
        if isinstance(body.k, bool) or not 1 <= body.k <= settings.max_k:
            raise ApiError(422, "invalid_k", f"k={body.k!r}; expected an integer from 1 to {settings.max_k} (max_k)")
        item, _ = to_item(body.query, "query")
        result = encode([item], "query")
        hits = index.search(result.vectors[0], body.k, modality=body.modality)
        return SearchResponse(results=[_doc_out(doc, SearchHit, score=float(score)) for doc, score in hits],
                              truncated=result.truncated[0])

    @app.get("/healthz", tags=["operations"])
    def healthz():
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz():
        """Ready to answer: the batcher runs and the index answers."""
        if not getattr(encoder, "alive", True):
            raise ApiError(503, "not_ready", "the encoder is not running (starting or shutting down)")
        try:
            documents = index.count()
        except Exception as exc:
            raise ApiError(503, "not_ready", f"the index is not available ({exc.__class__.__name__}: {exc})") from None
        return {"status": "ready", "backend": backend.name, "model_id": backend.model_id, "documents": documents}

    @app.get("/metrics", tags=["operations"])
    def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", tags=["operations"])
    def info():
        """Backend, model, index statistics and the server's limits."""
        return {"backend": backend.capabilities(), "index": index.stats(), "batching": encoder.batching,
                "settings": settings.public(), "max_images_per_item": max_images,
                "max_text_tokens": backend.preprocessor.max_length}

    return app
