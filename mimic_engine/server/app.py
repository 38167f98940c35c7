"""The HTTP API: embed, store, search; health, readiness and Prometheus metrics.

    app = create_app(settings, backend, index)     # FastAPI; serve with uvicorn
    POST /v1/embed            {"items": [item], "role": "query"|"document"}
    POST /v1/documents        {"documents": [{"id", ...item, "metadata"}]}     (API key when set)
    GET/DELETE /v1/documents/{id}                                              (DELETE: API key)
    GET /v1/documents/{id}/thumbnail                                           (image documents)
    POST /v1/search           {"query": item, "k": 10, "modality": "text"|"image"|null}
    POST /v1/embeddings  GET /v1/models         OpenAI-compatible (openai_api.py)
    GET /                     the search page (page.py, static/)
    GET /healthz  /readyz  /metrics  /v1/info  /docs

An item is {"text"?, "image"? (base64), "images"? [base64], "caption"?}; the caption is the text of
an image item. Every 4xx/5xx answer has one shape:

    {"error": {"code": "invalid_image", "message": "...", "details": ...}}

An upsert is acknowledged only after the index has acknowledged it (VectorIndex.upsert returns; what survives
a crash is the backend's, see docs/index.md).

The parts: `schemas` (request and response bodies), `routes` (handlers and their helpers over a
`ServerState`), `metrics` (Prometheus series and the limits-and-metrics middleware), `api_errors`
(the error shape and handlers), `openai_api` (the OpenAI-compatible routes), `page` (the search
page). This module only wires them together.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..runtime.batcher import make_encoder
from .api_errors import add_error_handlers
from .metrics import LimitsAndMetrics, ServerMetrics
from .openai_api import router as openai_router
from .page import add_search_page
from .routes import ServerState, router
from .settings import ServerSettings


def create_app(settings: ServerSettings, backend, index) -> FastAPI:
    """The API over `backend` (a runtime Backend) and `index` (a VectorIndex). The app owns both:
    it closes them (after draining the batcher) when it shuts down."""
    settings.validate()
    metrics = ServerMetrics(index)
    encoder = make_encoder(backend, settings.batching, max_batch=settings.max_batch,
                           max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms,
                           max_queue=settings.max_queue, observer=metrics.observe_batch)
    metrics.queue_depth.set_function(lambda: encoder.queue_depth)

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
    app.add_middleware(LimitsAndMetrics, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    app.state.server = ServerState(settings, backend, index, encoder, metrics)  # what the routes read
    # the parts by name as well, for callers that inspect a built app (app.state.settings, .index)
    app.state.settings, app.state.backend, app.state.index, app.state.encoder = settings, backend, index, encoder
    add_error_handlers(app)
    app.include_router(router)
    app.include_router(openai_router)
    add_search_page(app)
    return app
