"""Shared fixtures: tiny random models built through the real factory, images made in memory."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _fresh_image_memos():
    """Frozen image towers share a process-wide memo of their tokens (modeling/towers.py); each test
    ends by emptying it, so no test sees the tokens (or the counts) of another."""
    yield
    if "mimic_engine.modeling.towers" in __import__("sys").modules:
        from mimic_engine.modeling.towers import release_feature_caches

        release_feature_caches()


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


# Every kind of item in one batch: text-only, image-only, image+caption, two images, a long text.
MIXED_TEXTS = ("a handwritten seven", None, "digit scan with caption", "two views of one thing",
               "a much longer text item that needs more tokens than the others in this batch do")
MIXED_IMAGE_COUNTS = (0, 1, 1, 2, 0)


def mixed_items():
    """MIXED_TEXTS with MIXED_IMAGE_COUNTS encoded images each (PNG, the last one JPEG)."""
    from mimic_engine.preprocess import Item

    seeds = iter(range(1, 1 + sum(MIXED_IMAGE_COUNTS)))  # image seeds 1..4; seed 4 is the JPEG
    return [Item(text=text, images=[make_image_bytes(s, fmt="JPEG" if s == 4 else "PNG")
                                    for s in (next(seeds) for _ in range(count))])
            for text, count in zip(MIXED_TEXTS, MIXED_IMAGE_COUNTS)]


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


@dataclass(frozen=True)
class TinyExport:
    """A tiny model, its ckpt.pt and its ONNX export. Shared by the whole session: read it, never
    change it (copy the folder first, as the tests that edit a manifest do)."""

    encoder: object  # the MimicEncoder the checkpoint was saved from
    checkpoint: str
    out_dir: str
    result: object  # export.pipeline.ExportResult


def _export_tiny(root, encoder, variants) -> TinyExport:
    from mimic_engine.checkpoint import save_checkpoint
    from mimic_engine.export.pipeline import ExportOptions, export_checkpoint

    ckpt = save_checkpoint(str(root / "ckpt.pt"), encoder.model, encoder.tokenizer, {"step": 1})
    out = str(root / "export")
    result = export_checkpoint(ckpt, ExportOptions(out_dir=out, variants=variants, tensorrt=False), log=lambda *_: None)
    return TinyExport(encoder, ckpt, out, result)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_encoders) -> TinyExport:
    """The tiny decoder-fusion model's checkpoint and its full ONNX export (fp32, optimized, int8,
    fp16; no TensorRT), made once per session."""
    pytest.importorskip("onnx", reason="onnx is not installed: pip install 'mimic-engine[export]'")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'mimic-engine[export]'")
    return _export_tiny(tmp_path_factory.mktemp("tiny-export"), tiny_encoders("decoder"), ("optimized", "int8", "fp16"))


@pytest.fixture(scope="session")
def tiny_fusion_exports(tmp_path_factory, tiny_encoders, tiny_export):
    """fusion -> TinyExport of the tiny model with that fusion, fp32 graphs at least; each made once
    per session ("decoder" is `tiny_export`, the others hold the fp32 graphs only)."""
    cache = {"decoder": tiny_export}

    def get(fusion: str) -> TinyExport:
        if fusion not in cache:
            cache[fusion] = _export_tiny(tmp_path_factory.mktemp(f"tiny-export-{fusion}"), tiny_encoders(fusion), ())
        return cache[fusion]

    return get


# A tiny random EfficientNet-Lite tower: stride 8 at 32 px -> a 4 x 4 map, 16 visual tokens of 24 channels.
TINY_EFFNET = dict(stem_channels=8, stages=[[1, 3, 1, 1, 8], [1, 3, 2, 4, 16], [2, 5, 2, 4, 24]],
                   head_channels=24, features="head", bn_eps=1e-3)


def tiny_effnet_overrides(**extra) -> dict:
    """Dotted overrides that put the tiny EfficientNet-Lite tower into the `tiny` preset."""
    import copy

    from mimic_engine.config import LITE_MEAN, LITE_STD

    return {"vision.kind": "efficientnet_lite", "vision.hf_config": copy.deepcopy(TINY_EFFNET),
            "vision.image_mean": list(LITE_MEAN), "vision.image_std": list(LITE_STD), **extra}


@pytest.fixture(scope="session")
def tiny_effnet_encoders():
    """fusion -> MimicEncoder on the tiny preset with the tiny EfficientNet-Lite tower (seeded)."""
    from mimic_engine.encoder import MimicEncoder

    cache = {}

    def get(fusion: str = "decoder"):
        if fusion not in cache:
            cache[fusion] = MimicEncoder.from_preset("tiny", fusion=fusion, seed=0, **tiny_effnet_overrides())
            _randomise_batchnorm(cache[fusion].model)
        return cache[fusion]

    return get


def _randomise_batchnorm(model) -> None:
    """Non-trivial BatchNorm statistics and affine values (fresh ones are the identity), so that tests
    of padding, folding and export see what a trained tower computes."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


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
