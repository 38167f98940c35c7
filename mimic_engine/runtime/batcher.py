"""Dynamic batching: concurrent requests are coalesced into model batches.

    batcher = DynamicBatcher(backend, max_batch_tokens=4096)   # the other limits: the DEFAULT_* values below
    result = batcher.encode(items, role="query")   # from any thread; blocks until done
    result.vectors  # (N, E) float32, in input order;  result.truncated: [bool] * N

How a request travels:
1. `prepare` runs on the caller's thread: tokenising and image decoding / resizing happen there,
   in parallel with the model running the previous batch on the worker thread.
2. Admission: the queue holds at most `max_queue` items (queued + being prepared). A request that
   does not fit raises `QueueFullError` at once (HTTP 503 + Retry-After) instead of growing memory.
3. The single worker thread takes what is pending as soon as it is free. It waits (until
   `max_batch` items are pending, at most until the oldest has waited `max_wait_ms`) only while
   admitted requests are still being prepared, since those arrive within milliseconds: a lone
   request never waits, and under load batches fill by themselves while the model runs the
   previous one. It takes the oldest pending items (at most `4 * max_batch`), sorts them by
   (role, has image, token length) so that rows of one batch pad to similar lengths and text-only
   batches skip the vision stage, and cuts them into batches bounded by `max_batch` items and
   `max_batch_tokens` padded tokens (text + visual). A request's vectors are handed back when its
   last item is done.

`DirectEncoder` is the same interface without coalescing (each request is encoded on its own
thread, one model call at a time): the baseline for the benchmark and `--no-batching`.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, InputError, MimicError
from ..modeling import EncoderBatch
from ..preprocess import Item, Preprocessor
from .base import Backend

ROLES = ("query", "document")

# The batching knobs' defaults (the server's settings read them from here).
DEFAULT_MAX_BATCH = 32  # items per model batch
DEFAULT_MAX_BATCH_TOKENS = 8192  # padded (text + visual) tokens per model batch
# how long the first item of a batch waits for requests still being prepared. 1 ms, not 5: at 16 clients
# with the openvino-bf16 backend (a 7 ms model call) 5 ms of waiting per batch cost 21% of the requests/s
# and gave no better p99 (docs/results.md, servers side by side)
DEFAULT_MAX_WAIT_MS = 1.0
DEFAULT_MAX_QUEUE = 1024  # items admitted at once; beyond it requests get QueueFullError (HTTP 503)


class QueueFullError(MimicError):
    """The encode queue is full: the client should retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EncoderClosedError(MimicError):
    """The batcher was shut down (server stopping)."""


class EncodeTimeoutError(MimicError):
    """A request waited longer than its timeout for its batch."""


@dataclass
class EncodeResult:
    vectors: np.ndarray  # (N, E) float32 unit vectors, input order
    truncated: list  # [bool] * N: was the item's text cut to the model's max_length
    tokens: list = field(default_factory=list)  # [int] * N: text tokens (after truncation) + visual tokens
    # seconds per stage of this request: "preprocess" (tokenising, image decoding on the caller's thread),
    # "queue" (waiting for its first model batch to start), "model" (its first batch's start to its last's end)
    timings: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """One item ready to batch: input_ids (T,) int64, attention_mask (T,) int64, pixels (n, 3, S, S)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixels: torch.Tensor
    truncated: bool

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.pixels.shape[0])

    def tokens(self, visual_tokens_per_image: int) -> int:
        """What the model reads for this item: its text tokens (unmasked; an image-only item has none) plus
        the visual tokens of its images."""
        return int(self.attention_mask.sum()) + self.n_images * visual_tokens_per_image


def prepare(preprocessor: Preprocessor, item: Item, name: str) -> Prepared:
    """Tokenise and decode one item (the CPU work that overlaps inference)."""
    limit = preprocessor.config.vision.max_images_per_item
    if len(item.images) > limit:
        raise InputError(f"{name}: {len(item.images)} images, at most {limit} per item (vision.max_images_per_item)")
    ids, mask, truncated = preprocessor.tokenize([item.text])  # (1, T): T = this item's length (>= 2)
    s = preprocessor.config.vision.image_size
    pixels = [preprocessor.pixels(src, f"{name}.images[{j}]") for j, src in enumerate(item.images)]
    return Prepared(ids[0], mask[0], torch.stack(pixels) if pixels else torch.zeros(0, 3, s, s), truncated[0])


def collate_prepared(units: Sequence[Prepared], pad_id: int) -> EncoderBatch:
    """Prepared items -> the same EncoderBatch `Preprocessor.collate` builds from the raw items."""
    t = max(u.length for u in units)
    input_ids = torch.full((len(units), t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(units), t), dtype=torch.long)
    for i, u in enumerate(units):
        input_ids[i, : u.length] = u.input_ids
        attention_mask[i, : u.length] = u.attention_mask
    pixels = torch.cat([u.pixels for u in units])
    counts = torch.tensor([u.n_images for u in units], dtype=torch.long)
    return EncoderBatch(input_ids, attention_mask, pixels, counts, [u.truncated for u in units])


@dataclass
class _Request:
    role: str
    vectors: np.ndarray
    truncated: list
    tokens: list
    remaining: int
    preprocess_s: float = 0.0
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its first model batch started
    cancelled: bool = False

    def result(self, finished: float) -> EncodeResult:
        return EncodeResult(self.vectors, self.truncated, self.tokens, {"preprocess": self.preprocess_s,
                                                                        "queue": self.started - self.enqueued,
                                                                        "model": finished - self.started})


@dataclass
class _Unit:
    request: _Request
    index: int
    item: Prepared


BatchObserver = Callable[[int, int, float], None]  # (items, padded tokens, seconds) per model batch


class _EncoderBase:
    """What both modes share: checked arguments, preparation, admission control."""

    def __init__(self, backend: Backend, max_batch: int = DEFAULT_MAX_BATCH, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 max_queue: int = DEFAULT_MAX_QUEUE, observer: BatchObserver | None = None):
        for name, value in (("max_batch", max_batch), ("max_batch_tokens", max_batch_tokens), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        self.backend = backend
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.observer = observer
        self.visual_tokens_per_image = backend.preprocessor.config.visual_tokens_per_image
        self._lock = threading.Lock()
        self._admitted = 0  # items admitted and not yet answered (prepared, queued or running)
        self._batch_seconds = 0.05  # running estimate of one batch's time, for Retry-After
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return self._admitted

    def _admit(self, n: int) -> None:
        with self._lock:
            if self._closed:
                raise EncoderClosedError("the encoder is shut down; the server is stopping")
            if self._admitted + n > self.max_queue:
                backlog_batches = math.ceil((self._admitted + n) / self.max_batch)
                retry = max(1, math.ceil(backlog_batches * self._batch_seconds))
                raise QueueFullError(f"the encode queue is full ({self._admitted} items waiting, limit {self.max_queue}); "
                                     f"retry in {retry} s", retry)
            self._admitted += n

    def _release(self, n: int) -> None:
        with self._lock:
            self._admitted -= n

    def _prepare_all(self, items: Sequence[Item], role: str) -> list[Prepared]:
        if role not in ROLES:
            raise InputError(f"role={role!r} is not supported; expected one of {ROLES}")
        if not items:
            raise InputError("an empty list of items was given; send at least one item")
        pre = self.backend.preprocessor
        return [prepare(pre, item, item.name or f"items[{i}]") for i, item in enumerate(items)]

    def _cost(self, units: Sequence[Prepared]) -> int:
        """Padded tokens the model processes for these rows: B * (T_max + V_max)."""
        t = max(u.length for u in units)
        v = max(u.n_images for u in units) * self.visual_tokens_per_image
        return len(units) * (t + v)

    def _cut(self, units: list, key=lambda u: u) -> list[list]:
        """Consecutive runs of (already sorted) units within max_batch and max_batch_tokens."""
        batches, current = [], []
        for unit in units:
            if current and (len(current) >= self.max_batch or
                            self._cost([key(u) for u in current] + [key(unit)]) > self.max_batch_tokens):
                batches.append(current)
                current = []
            current.append(unit)
        if current:
            batches.append(current)
        return batches

    def _run(self, units: Sequence[Prepared], role: str) -> np.ndarray:
        start = time.perf_counter()
        out = self.backend.encode_batch(collate_prepared(units, self.backend.preprocessor.pad_id), role)  # (B, E)
        seconds = time.perf_counter() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self.observer is not None:
            self.observer(len(units), self._cost(units), seconds)
        return out

    @staticmethod
    def _sort_key(p: Prepared):
        return (p.n_images > 0, p.n_images, p.length)

    def close(self) -> None:
        with self._lock:
            self._closed = True


class DirectEncoder(_EncoderBase):
    """No coalescing: each request is its own batch(es); model calls are serialised by a lock
    (backends with CUDA graphs or TensorRT contexts are not re-entrant)."""

    batching = False

    def __init__(self, backend: Backend, **kw):
        kw.pop("max_wait_ms", None)
        super().__init__(backend, **kw)
        self._model_lock = threading.Lock()

    def encode(self, items: Sequence[Item], role: str = "document", timeout: float | None = None) -> EncodeResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._admit(len(items))
        try:
            t0 = time.monotonic()
            prepared = self._prepare_all(items, role)
            timings = {"preprocess": time.monotonic() - t0, "queue": 0.0, "model": 0.0}
            order = sorted(range(len(prepared)), key=lambda i: self._sort_key(prepared[i]))
            vectors = np.zeros((len(items), self.backend.dim), dtype=np.float32)
            for idx in self._cut(order, key=lambda i: prepared[i]):
                t0 = time.monotonic()
                wait = -1 if deadline is None else max(0.0, deadline - t0)
                if not self._model_lock.acquire(timeout=wait):  # as the batcher: a request waits at most `timeout`
                    raise EncodeTimeoutError(f"encoding did not start within {timeout} s; the server is overloaded, "
                                             "retry later")
                try:
                    t1 = time.monotonic()
                    vectors[idx] = self._run([prepared[i] for i in idx], role)
                    timings["queue"] += t1 - t0
                    timings["model"] += time.monotonic() - t1
                finally:
                    self._model_lock.release()
            return EncodeResult(vectors, [p.truncated for p in prepared],
                                [p.tokens(self.visual_tokens_per_image) for p in prepared], timings)
        finally:
            self._release(len(items))


class DynamicBatcher(_EncoderBase):
    batching = True

    def __init__(self, backend: Backend, max_batch: int = DEFAULT_MAX_BATCH, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_queue: int = DEFAULT_MAX_QUEUE,
                 observer: BatchObserver | None = None):
        super().__init__(backend, max_batch, max_batch_tokens, max_queue, observer)
        if not 0 <= max_wait_ms <= 10_000:
            raise ConfigError(f"max_wait_ms={max_wait_ms!r} must be in [0, 10000]")
        self.max_wait_s = max_wait_ms / 1000.0
        self._pending: deque[_Unit] = deque()
        self._wakeup = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._loop, name="mimic-batcher", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive() and not self._closed

    def submit(self, items: Sequence[Item], role: str = "document") -> Future:
        """Prepare on this thread, enqueue, and return a Future of EncodeResult."""
        return self._submit(items, role).future

    def _submit(self, items: Sequence[Item], role: str) -> _Request:
        self._admit(len(items))
        t0 = time.monotonic()
        try:
            prepared = self._prepare_all(items, role)
        except BaseException:
            self._release(len(items))
            raise
        req = _Request(role, np.zeros((len(items), self.backend.dim), np.float32), [p.truncated for p in prepared],
                       [p.tokens(self.visual_tokens_per_image) for p in prepared], len(items),
                       preprocess_s=time.monotonic() - t0)
        with self._wakeup:
            if self._closed:
                self._admitted -= len(items)
                raise EncoderClosedError("the encoder is shut down; the server is stopping")
            self._pending.extend(_Unit(req, i, p) for i, p in enumerate(prepared))
            self._wakeup.notify()
        return req

    def encode(self, items: Sequence[Item], role: str = "document", timeout: float | None = None) -> EncodeResult:
        req = self._submit(items, role)
        try:
            return req.future.result(timeout)
        except FutureTimeout:
            req.cancelled = True  # the worker drops its items that are still queued
            raise EncodeTimeoutError(f"encoding did not finish within {timeout} s; the server is overloaded, "
                                     "retry later") from None

    # ---- worker thread ----------------------------------------------------------------------------
    def _next_window(self) -> list[_Unit] | None:
        """Block until a batch is due; return the oldest pending units (None when closed and drained)."""
        with self._wakeup:
            while not self._pending and not self._closed:
                self._wakeup.wait()
            if not self._pending:
                return None
            # Wait only for items already admitted and still being prepared on their request threads
            # (they arrive within milliseconds); with nothing in preparation, run now: a lone request
            # pays no waiting, and under load batches fill while the model runs the previous one.
            deadline = self._pending[0].request.enqueued + self.max_wait_s
            while len(self._pending) < self.max_batch and self._admitted > len(self._pending) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.wait(left)
            n = min(len(self._pending), 4 * self.max_batch)
            return [self._pending.popleft() for _ in range(n)]

    def _loop(self) -> None:
        while True:
            window = self._next_window()
            if window is None:
                return
            dropped = [u for u in window if u.request.cancelled]
            if dropped:
                self._release(len(dropped))
            window = [u for u in window if not u.request.cancelled]
            window.sort(key=lambda u: (u.request.role, *self._sort_key(u.item)))
            for role in ROLES:
                group = [u for u in window if u.request.role == role]
                for batch in self._cut(group, key=lambda u: u.item):
                    self._run_units(batch, role)

    def _run_units(self, batch: list[_Unit], role: str) -> None:
        started = time.monotonic()
        for u in batch:
            if u.request.started is None:
                u.request.started = started
        try:
            vectors = self._run([u.item for u in batch], role)
        except BaseException as exc:  # a failed batch fails its requests, never the worker
            for u in batch:
                if not u.request.future.done():
                    u.request.future.set_exception(exc)
            self._release(len(batch))
            return
        finished = time.monotonic()
        for u, vec in zip(batch, vectors):
            req = u.request
            req.vectors[u.index] = vec
            req.remaining -= 1
            if req.remaining == 0 and not req.future.done():
                req.future.set_result(req.result(finished))
        self._release(len(batch))

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting work, finish what is queued, stop the worker."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()
        self._worker.join(timeout)


def make_encoder(backend: Backend, batching: bool = True, **kw) -> DynamicBatcher | DirectEncoder:
    return DynamicBatcher(backend, **kw) if batching else DirectEncoder(backend, **kw)
