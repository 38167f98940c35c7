"""Prometheus metrics of the server, and the ASGI middleware that records every request and
enforces the body-size limit.

    metrics = ServerMetrics(index)          # a registry of its own; scraped at GET /metrics
    app.add_middleware(LimitsAndMetrics, metrics=metrics, max_body_bytes=settings.max_body_bytes)
"""
from __future__ import annotations

import logging
import time

from .api_errors import ApiError, error_response

log = logging.getLogger("mimic_engine.server")


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
        self.stage_seconds = Histogram("mimic_request_stage_seconds", "Time of one encoding request per stage: "
                                       "preprocess, queue (waiting for its batch), model, then index (search, "
                                       "upsert) or respond (JSON encoding of /v1/embed)",
                                       ["stage"], buckets=self.LATENCY_BUCKETS, registry=r)
        self.truncated = Counter("mimic_truncated_texts_total", "Texts cut to the model's max_length", registry=r)
        self.queue_depth = Gauge("mimic_encode_queue_depth", "Items admitted to the encoder and not yet answered",
                                 registry=r)
        r.register(IndexCollector(index))

    def observe_batch(self, items: int, tokens: int, seconds: float) -> None:
        """The encoder's BatchObserver: called once per model batch."""
        self.batch_size.observe(items)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def observe_stages(self, seconds: dict) -> None:
        """One request's {stage: seconds}."""
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage).observe(value)

    def render(self) -> tuple[bytes, str]:
        """-> (the registry in Prometheus' text format, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class IndexCollector:
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


class LimitsAndMetrics:
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
                                          "items per request or smaller images", path=scope.get("path", ""))
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
