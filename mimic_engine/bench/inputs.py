"""Deterministic benchmark inputs: the same seed gives the same items, so a memory probe in a fresh
process rebuilds exactly the batch that was timed.

- `bench_items` / `bench_batch`: texts of exactly `text_tokens` tokens and handwritten-digit images
  (the model benchmark); `synthetic_batch` the same layout with random pixel tensors, for a
  machine without Pillow or scikit-learn (a bare GPU box).
- `random_token_batch`: random token ids and one random image per item, already on a device (the
  GPU benchmark feeds ids directly, no tokenizer involved).
- `digit_png_base64`: PNG digits for HTTP payloads (the serve benchmark).
- `unit_vectors`: random L2-normalised vectors (the index benchmark).
"""
from __future__ import annotations

import base64
import importlib.util
import io
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

# Single-token words in BERT's and T5's vocabularies, so n words give n tokens (checked at run time).
WORDS = ("the red bus a photo of small dog on green grass near old stone bridge over river city street with "
         "people walking at night under bright lights white house tall tree blue sky in winter snow black cat "
         "sitting by window two children playing football park yellow flower garden summer morning").split()


@dataclass
class InputSpec:
    """What each benchmark item looks like. text_tokens counts special tokens; None = the model's max_length."""

    text_tokens: int | None = None
    images_per_item: int = 1
    text_only_fraction: float = 0.0  # share of items without images (a corpus mixes both)
    seed: int = 0


def digit_images(n: int, seed: int = 0, size: int = 64) -> list:
    """n RGB PIL images of handwritten digits (scikit-learn's 8x8 scans, upscaled)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images  # (1797, 8, 8) values 0..16
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(digits), n):
        gray = (255 - digits[i] * 255 / 16).astype(np.uint8)  # dark ink on white paper
        out.append(Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).convert("RGB"))
    return out


def digit_png_base64(n: int, seed: int = 0, size: int = 32) -> list[str]:
    """n PNG images of handwritten digits, base64."""
    out = []
    for img in digit_images(n, seed, size):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def bench_layout(preprocessor, n: int, spec: InputSpec) -> tuple[list, list]:
    """n deterministic texts of exactly `spec.text_tokens` tokens (with specials) and images per item."""
    tok = preprocessor.tokenizer
    max_len = preprocessor.max_length
    n_tokens = spec.text_tokens or max_len
    if n_tokens > max_len:
        raise ConfigError(f"--text-len {n_tokens} exceeds the model's max_length of {max_len} tokens; "
                          f"pass --text-len {max_len} or less")
    limit = preprocessor.config.vision.max_images_per_item
    if spec.images_per_item > limit:
        raise ConfigError(f"--images-per-item {spec.images_per_item} exceeds the model's limit of {limit} "
                          "(vision.max_images_per_item)")
    specials = len(tok("")["input_ids"])
    words = [w for w in WORDS if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    if not words:
        raise ConfigError("none of the benchmark words is a single token for this tokenizer")
    rng = np.random.default_rng(spec.seed)
    n_words = max(n_tokens - specials, 1)
    texts = [" ".join(rng.choice(words, n_words)) for _ in range(n)]
    text_only = set(rng.choice(n, int(round(spec.text_only_fraction * n)), replace=False).tolist())
    counts = [0 if i in text_only else spec.images_per_item for i in range(n)]
    return texts, counts


def bench_items(preprocessor, n: int, spec: InputSpec) -> list:
    """n deterministic items: the `bench_layout` texts with decoded digit scans as their images."""
    from ..preprocess import Item

    texts, counts = bench_layout(preprocessor, n, spec)
    images = iter(digit_images(sum(counts), spec.seed))
    return [Item(text=text, images=[next(images) for _ in range(c)], name=f"bench[{i}]")
            for i, (text, c) in enumerate(zip(texts, counts))]


def decoded_images_available() -> bool:
    """Pillow and scikit-learn (the digit scans) are installed, so benchmark items carry real images."""
    return all(importlib.util.find_spec(name) is not None for name in ("PIL", "sklearn"))


def synthetic_batch(preprocessor, n: int, spec: InputSpec):
    """The `bench_layout` items as an EncoderBatch whose images are random pixel tensors of the model's
    input size: for a machine without Pillow (a bare GPU box). The backends see the same shapes."""
    import torch

    from ..modeling import EncoderBatch

    texts, counts = bench_layout(preprocessor, n, spec)
    input_ids, attention_mask, truncated = preprocessor.tokenize(texts)
    s = preprocessor.config.vision.image_size
    pixels = torch.randn(sum(counts), 3, s, s, generator=torch.Generator().manual_seed(spec.seed))
    return EncoderBatch(input_ids, attention_mask, pixels, torch.tensor(counts, dtype=torch.long), truncated)


def bench_batch(preprocessor, n: int, spec: InputSpec):
    """-> (EncoderBatch of n bench items, median preprocessing ms), or (synthetic batch, None) where
    Pillow or scikit-learn is missing: no image is decoded then, so no preprocessing time exists."""
    if decoded_images_available():
        return collate_timed(preprocessor, bench_items(preprocessor, n, spec))
    return synthetic_batch(preprocessor, n, spec), None


def collate_timed(preprocessor, items, repeats: int = 3):
    """-> (EncoderBatch, median preprocessing ms over `repeats` collations)."""
    times, batch = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = preprocessor.collate(items)
        times.append((time.perf_counter() - t0) * 1e3)
    return batch, float(np.median(times))


def random_token_batch(config, batch: int, text_tokens: int, device, seed: int = 0):
    """B items of `text_tokens` random token ids (all valid, no padding) and one random image each, on `device`."""
    import torch

    from ..modeling import EncoderBatch

    g = torch.Generator().manual_seed(seed)
    vocab = config.text.hf_config.get("vocab_size", 30522)
    s = config.vision.image_size
    ids = torch.randint(1, min(vocab, 30522), (batch, text_tokens), generator=g)
    return EncoderBatch(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(batch, 3, s, s, generator=g),
        image_counts=torch.ones(batch, dtype=torch.long),
    ).to(device)


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """(n, dim) float32 random directions, each of L2 norm 1."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
