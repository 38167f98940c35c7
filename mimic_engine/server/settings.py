"""Every knob of the HTTP server in one dataclass (the CLI maps options and MIMIC_* env vars onto it)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError
from ..runtime.batcher import DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_MS


@dataclass
class ServerSettings:
    # what to serve
    model: str | None = None  # ckpt.pt or export directory; None = the demo model (CLI trains it once)
    index: str | None = None  # index folder or milvus:<uri>[#<collection>] (index/selection.py); None = the default local index
    backend: str = "auto"
    device: str = "auto"  # auto = CUDA when torch sees a GPU, else CPU
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None  # CPU threads per operator (torch / ONNX Runtime); None = library default
    model_name: str | None = None  # the name /v1/models lists and /v1/embeddings expects; None = mimic-<model id[:12]>

    # batching (mimic_engine.runtime.batcher, where the defaults and their meaning live)
    batching: bool = True  # False: each request is encoded on its own (benchmark baseline)
    max_batch: int = DEFAULT_MAX_BATCH
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_queue: int = DEFAULT_MAX_QUEUE  # beyond it requests get 503 + Retry-After
    request_timeout_s: float = 60.0  # a request waiting longer for its batch gets 503
    timing_header: bool = True  # a Server-Timing header (preprocess, queue, model, ... ms) on encoding routes

    # limits on requests
    api_key: str | None = None  # when set, write routes need `Authorization: Bearer <key>` or `X-API-Key`
    max_body_bytes: int = 32 * 1024 * 1024
    max_items: int = 64  # items per /v1/embed, documents per /v1/documents
    max_image_pixels: int = 25_000_000  # width x height of one decoded image (decompression bombs)
    max_text_chars: int = 20_000  # characters per text; tokens beyond the model's max_length are truncated and reported
    max_k: int = 1000
    max_id_chars: int = 512
    max_metadata_bytes: int = 16_384  # per document, as UTF-8 JSON; metadata comes back with every search hit

    # documents
    thumbnails: bool = True  # image documents keep a small preview (index/thumbnails.py) for the search page

    # index (None: the index's own value; M and ef_construction apply only when a new index is created)
    hnsw_m: int | None = None
    hnsw_ef_construction: int | None = None
    hnsw_ef: int | None = None

    def validate(self) -> "ServerSettings":
        positive = ("port", "max_batch", "max_batch_tokens", "max_queue", "max_body_bytes", "max_items",
                    "max_image_pixels", "max_text_chars", "max_k", "max_id_chars", "max_metadata_bytes", "threads", "hnsw_m",
                    "hnsw_ef_construction", "hnsw_ef")
        for name in positive:
            value = getattr(self, name)
            if value is None and (name.startswith("hnsw_") or name == "threads"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms!r} must be in [0, 10000]")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s={self.request_timeout_s!r} must be > 0")
        if self.max_items > self.max_queue:
            raise ConfigError(f"max_items={self.max_items} exceeds max_queue={self.max_queue}: such a request could "
                              "never be admitted; raise max_queue or lower max_items")
        if self.model_name is not None and (not self.model_name.strip() or not self.model_name.isprintable()):
            raise ConfigError(f"model_name={self.model_name!r} must be printable and not blank; leave it unset for "
                              "the default mimic-<model id>")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; leave it unset to disable authentication")
        return self

    def public(self) -> dict:
        """The settings without secrets (for /v1/info and logs)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["api_key"] = "set" if self.api_key else None
        return out
