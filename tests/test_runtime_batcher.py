"""Dynamic batching: coalescing, equality with unbatched encoding, limits, backpressure, failures."""
import random
import threading
import time

import numpy as np
import pytest

from mimic_engine.errors import ConfigError, InputError
from mimic_engine.preprocess import Item
from mimic_engine.runtime.batcher import (DirectEncoder, DynamicBatcher, EncoderClosedError, EncodeTimeoutError,
                                          QueueFullError, collate_prepared, prepare)
from mimic_engine.runtime.torch_backend import TorchBackend
from tests.conftest import make_image_bytes

IMAGES = [make_image_bytes(i, size=(24 + i, 30)) for i in range(6)]


def random_items(rng: random.Random, n: int) -> list[Item]:
    words = "red bus train river mountain cat dog city night market bridge".split()
    items = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        kind = rng.random()
        if kind < 0.5:
            items.append(Item(text=text))
        elif kind < 0.75:
            items.append(Item(images=[rng.choice(IMAGES)]))
        else:
            items.append(Item(text=text, images=rng.sample(IMAGES, rng.randint(1, 2))))
    return items


class Recorder:
    """Observer that keeps (items, padded tokens) per model batch."""

    def __init__(self):
        self.batches = []

    def __call__(self, items, tokens, seconds):
        self.batches.append((items, tokens))


class CountingBackend(TorchBackend):
    """The real tiny model, counting how many images reach the vision stage."""

    def __init__(self, enc):
        super().__init__(enc.model, enc.tokenizer, model_id=enc.model_id)
        self.vision_images = 0

    def run_vision(self, pixel_values):
        self.vision_images += pixel_values.shape[0]
        return super().run_vision(pixel_values)


class BlockingBackend(TorchBackend):
    """The real tiny model whose fusion stage waits for `release` (a slow model)."""

    def __init__(self, enc):
        super().__init__(enc.model, enc.tokenizer, model_id=enc.model_id)
        self.release = threading.Event()
        self.started = threading.Event()

    def run_fusion(self, *args):
        self.started.set()
        assert self.release.wait(30)
        return super().run_fusion(*args)


@pytest.fixture
def backend(tiny_encoders):
    return TorchBackend.from_encoder(tiny_encoders("decoder"))


def test_prepared_items_collate_like_the_preprocessor(backend):
    items = random_items(random.Random(0), 12)
    pre = backend.preprocessor
    a = pre.collate(items)
    b = collate_prepared([prepare(pre, it, f"items[{i}]") for i, it in enumerate(items)], pre.pad_id)
    for name in ("input_ids", "attention_mask", "pixel_values", "image_counts"):
        assert getattr(a, name).equal(getattr(b, name)), name
    assert a.truncated == b.truncated


def test_many_threads_all_answered_and_equal_to_unbatched(backend):
    rec = Recorder()
    batcher = DynamicBatcher(backend, max_batch=8, max_batch_tokens=2048, max_wait_ms=20, observer=rec)
    rng = random.Random(1)
    requests = [(random_items(rng, rng.randint(1, 3)), rng.choice(["query", "document"])) for _ in range(64)]
    results = [None] * len(requests)

    def client(worker: int):
        for r in range(worker, len(requests), 16):
            items, role = requests[r]
            results[r] = batcher.encode(items, role, timeout=60)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batcher.close()
    assert all(r is not None for r in results), "a request was not answered"
    for (items, role), result in zip(requests, results):
        np.testing.assert_allclose(result.vectors, backend.encode(items, role), atol=1e-5)
        assert len(result.truncated) == len(items)
    sizes = [n for n, _ in rec.batches]
    assert sum(sizes) == sum(len(items) for items, _ in requests)
    assert max(sizes) > 1, "concurrent requests were never coalesced"
    assert max(sizes) <= 8
    for n, tokens in rec.batches:
        assert n == 1 or tokens <= 2048  # a single oversized item runs alone
    assert batcher.queue_depth == 0


def test_token_budget_and_length_grouping(backend):
    rec = Recorder()
    batcher = DynamicBatcher(backend, max_batch=64, max_batch_tokens=200, max_wait_ms=50, observer=rec)
    short = [Item(text="hi")] * 10  # 3 tokens each
    long = [Item(text="word " * 30)] * 4  # 32 tokens (max_length) each
    items = [x for pair in zip(short, long + [None] * 6) for x in pair if x is not None]
    result = batcher.encode(items)
    batcher.close()
    np.testing.assert_allclose(result.vectors, backend.encode(items), atol=1e-5)
    assert all(tokens <= 200 for _, tokens in rec.batches)
    # sorting by length keeps the 10 short items together instead of padding them to 32 tokens
    assert sum(n * 32 for n, _ in rec.batches) > sum(t for _, t in rec.batches)
    assert 10 in [n for n, _ in rec.batches]


def test_text_only_batches_skip_the_vision_stage(tiny_encoders):
    backend = CountingBackend(tiny_encoders("decoder"))
    batcher = DynamicBatcher(backend, max_batch=16, max_wait_ms=5)
    batcher.encode([Item(text=f"text {i}") for i in range(5)])
    assert backend.vision_images == 0
    batcher.encode([Item(text="x", images=[IMAGES[0], IMAGES[1]]), Item(text="y")])
    assert backend.vision_images == 2
    batcher.close()


def test_direct_encoder_equals_backend(backend):
    items = random_items(random.Random(2), 20)
    direct = DirectEncoder(backend, max_batch=4)
    np.testing.assert_allclose(direct.encode(items, "query").vectors, backend.encode(items, "query"), atol=1e-5)
    assert direct.queue_depth == 0


@pytest.mark.parametrize("mode", ["batching", "direct"])
def test_queue_full_is_refused_then_recovers(mode, tiny_encoders):
    backend = BlockingBackend(tiny_encoders("decoder"))
    cls = DynamicBatcher if mode == "batching" else DirectEncoder
    encoder = cls(backend, max_batch=2, max_queue=4, max_wait_ms=0)
    results, errors = [], []

    def call(n):
        try:
            results.append(encoder.encode([Item(text=f"q{n}")] * 2, timeout=60))
        except Exception as exc:  # noqa: BLE001 - collected and checked below
            errors.append(exc)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert backend.started.wait(10)  # the model is busy with the first request (2 items admitted)
    second = threading.Thread(target=call, args=(1,))
    second.start()
    deadline = time.time() + 10
    while encoder.queue_depth < 4 and time.time() < deadline:
        time.sleep(0.01)
    assert encoder.queue_depth == 4
    with pytest.raises(QueueFullError) as exc:
        encoder.encode([Item(text="one too many")])
    assert exc.value.retry_after_s >= 1 and "limit 4" in str(exc.value)
    backend.release.set()
    first.join(30)
    second.join(30)
    assert not errors and len(results) == 2
    assert encoder.queue_depth == 0
    assert encoder.encode([Item(text="after")]).vectors.shape == (1, backend.dim)
    encoder.close()


@pytest.mark.parametrize("mode", ["batching", "direct"])
def test_stage_timings_split_waiting_from_the_model(mode, tiny_encoders):
    """A request queued behind a busy model reports that wait as "queue"; the busy one as "model"."""
    backend = BlockingBackend(tiny_encoders("decoder"))
    cls = DynamicBatcher if mode == "batching" else DirectEncoder
    encoder = cls(backend, max_batch=1, max_wait_ms=0)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", encoder.encode([Item(text="a")], timeout=60)))
    first.start()
    assert backend.started.wait(10)  # the model holds the first request
    second = threading.Thread(target=lambda: results.setdefault("second", encoder.encode([Item(text="b")], timeout=60)))
    second.start()
    time.sleep(0.3)  # the second waits while the model is held
    backend.release.set()
    first.join(30)
    second.join(30)
    for name in ("first", "second"):
        timings = results[name].timings
        assert set(timings) == {"preprocess", "queue", "model"} and min(timings.values()) >= 0, timings
    assert results["first"].timings["model"] >= 0.3  # held for the whole sleep
    assert results["second"].timings["queue"] >= 0.2  # its wait, not counted as model time
    encoder.close()


def test_direct_encoder_times_out_waiting_for_the_model(tiny_encoders):
    backend = BlockingBackend(tiny_encoders("decoder"))
    encoder = DirectEncoder(backend, max_batch=2)
    first = threading.Thread(target=lambda: encoder.encode([Item(text="slow")], timeout=60))
    first.start()
    assert backend.started.wait(10)  # the model is busy with the first request
    with pytest.raises(EncodeTimeoutError):
        encoder.encode([Item(text="waits")], timeout=0.2)
    assert encoder.queue_depth == 1  # the timed-out request was released; the running one is left
    backend.release.set()
    first.join(30)
    assert encoder.queue_depth == 0
    encoder.close()


def test_bad_input_fails_only_its_request(backend):
    batcher = DynamicBatcher(backend, max_batch=8, max_wait_ms=5)
    with pytest.raises(InputError, match=r"items\[1\].images\[0\]"):
        batcher.encode([Item(text="fine"), Item(images=[b"not an image"])])
    with pytest.raises(InputError, match="role"):
        batcher.encode([Item(text="x")], role="passage")
    with pytest.raises(InputError, match="empty"):
        batcher.encode([])
    assert batcher.queue_depth == 0
    assert batcher.encode([Item(text="still fine")]).vectors.shape == (1, backend.dim)
    batcher.close()


def test_model_failure_reaches_the_callers_and_the_worker_survives(tiny_encoders):
    class Flaky(TorchBackend):
        fail = True

        def run_fusion(self, *args):
            if self.fail:
                raise RuntimeError("simulated device error")
            return super().run_fusion(*args)

    enc = tiny_encoders("decoder")
    backend = Flaky(enc.model, enc.tokenizer, model_id=enc.model_id)
    batcher = DynamicBatcher(backend, max_batch=8, max_wait_ms=1)
    with pytest.raises(RuntimeError, match="simulated"):
        batcher.encode([Item(text="a"), Item(text="b")])
    backend.fail = False
    assert batcher.alive and batcher.queue_depth == 0
    assert batcher.encode([Item(text="a")]).vectors.shape == (1, backend.dim)
    batcher.close()
    assert not batcher.alive
    with pytest.raises(EncoderClosedError):
        batcher.encode([Item(text="late")])


def test_bad_settings_are_refused(backend):
    with pytest.raises(ConfigError, match="max_batch"):
        DynamicBatcher(backend, max_batch=0)
    with pytest.raises(ConfigError, match="max_wait_ms"):
        DynamicBatcher(backend, max_wait_ms=-1)
