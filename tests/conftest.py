"""Shared fixtures: tiny random models built through the real factory, images made in memory."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_image_bytes(seed: int = 0, size=(40, 30), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A random image encoded as `fmt` bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def mixed_items():
    """Every kind of item in one batch: text-only, image-only, image+caption, two images, a long text."""
    from mimic_engine.preprocess import Item

    return [
        Item(text="a handwritten seven"),
        Item(images=[make_image_bytes(1)]),
        Item(text="digit scan with caption", images=[make_image_bytes(2)]),
        Item(text="two views of one thing", images=[make_image_bytes(3), make_image_bytes(4, fmt="JPEG")]),
        Item(text="a much longer text item that needs more tokens than the others in this batch do"),
    ]


@pytest.fixture(scope="session")
def tiny_encoders():
    """fusion -> MimicEncoder on the tiny preset (seeded), built once per test session."""
    from mimic_engine.encoder import MimicEncoder

    cache = {}

    def get(fusion: str = "decoder"):
        if fusion not in cache:
            cache[fusion] = MimicEncoder.from_preset("tiny", fusion=fusion, seed=0)
        return cache[fusion]

    return get


@pytest.fixture
def image_bytes():
    return make_image_bytes


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands under test may call torch.set_num_threads (process-wide); undo it after each test."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
