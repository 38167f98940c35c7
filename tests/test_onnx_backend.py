"""OnnxBackend: same vectors as MimicEncoder (PyTorch) for every fusion, built from the export
directory alone, and clear errors for what it cannot load."""
import os
import shutil

import numpy as np
import pytest

from mimic_engine.config import FUSIONS
from mimic_engine.errors import MissingDependencyError
from mimic_engine.preprocess import Item
from tests.conftest import make_image_bytes
from tests.conftest import mixed_items as shared_mixed_items

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'mimic-engine[export]'")

from mimic_engine.runtime.export_format import ExportError, read_manifest, write_manifest  # noqa: E402
from mimic_engine.runtime.onnx_backend import OnnxBackend  # noqa: E402


def mixed_items():
    """The shared mixed batch plus an image-only item with an empty caption and an odd aspect ratio."""
    return shared_mixed_items() + [Item(text="", images=[make_image_bytes(5, size=(64, 20))])]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_fusion_exports):
    """fusion -> (encoder, a copy of the shared export whose source checkpoint does not exist)."""
    cache = {}

    def get(fusion):
        if fusion not in cache:
            shared = tiny_fusion_exports(fusion)
            out = str(tmp_path_factory.mktemp(f"onnx-{fusion}") / "export")
            shutil.copytree(shared.out_dir, out)
            manifest = read_manifest(out)
            manifest.source = {**manifest.source, "checkpoint": out + "-gone/ckpt.pt", "relative": "../gone.pt"}
            write_manifest(out, manifest)  # the backend must not need the checkpoint
            cache[fusion] = (shared.encoder, out)
        return cache[fusion]

    return get


@pytest.mark.parametrize("fusion", FUSIONS)
def test_onnx_backend_encode_equals_pytorch_encoder(fusion, exported):
    enc, out = exported(fusion)
    backend = OnnxBackend(out)
    items = mixed_items()
    for batch_size in (64, 2):  # one mixed batch; and small batches, some without any image (V=0 path)
        got = backend.encode(items, batch_size=batch_size)
        want = enc.encode(items, batch_size=batch_size)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
    text_only = [Item(text="just words"), Item(text="more words here")]
    np.testing.assert_allclose(backend.encode(text_only), enc.encode(text_only), atol=1e-5)
    assert backend.encode(items, role="query").shape == (len(items), enc.dim)


def test_model_id_is_the_models_content_id_and_capabilities(exported):
    enc, out = exported("decoder")
    backend = OnnxBackend(out)
    source = read_manifest(out).source
    # the checkpoint's content id; the checkpoint file's sha256 (the id of older indexes) as a legacy id
    assert backend.model_id == source["model_id"] and len(backend.model_id) == 64
    assert backend.legacy_model_ids == (source["file_sha256"],) and source["file_sha256"] != backend.model_id
    caps = backend.capabilities()
    assert caps["name"] == "onnx" and caps["variant"] == "fp32" and caps["providers"] == ["CPUExecutionProvider"]
    backend.warmup()


def test_missing_variant_provider_or_folder_give_clear_errors(exported, tmp_path):
    _, out = exported("late")  # fp32 graphs only
    with pytest.raises(ExportError, match="has no 'int8' graphs"):
        OnnxBackend(out, variant="int8")
    with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
        OnnxBackend(out, providers=["CUDAExecutionProvider"])
    with pytest.raises(ExportError, match="does not exist"):
        OnnxBackend(str(tmp_path / "nowhere"))
    with pytest.raises(ExportError, match="no manifest.json"):
        OnnxBackend(str(tmp_path))


def test_graphs_from_another_export_are_refused(exported, tmp_path):
    _, out_a = exported("decoder")
    _, out_b = exported("late")
    mixed = tmp_path / "mixed"
    shutil.copytree(out_a, mixed)
    shutil.copyfile(os.path.join(out_b, "fusion.onnx"), mixed / "fusion.onnx")
    with pytest.raises(ExportError, match="mixes two exports"):
        OnnxBackend(str(mixed))


def test_load_backend_factory_builds_it(exported):
    from mimic_engine.runtime import load_backend

    enc, out = exported("early")
    backend = load_backend("onnx", out)
    assert isinstance(backend, OnnxBackend)
    np.testing.assert_allclose(backend.encode(mixed_items()[:3]), enc.encode(mixed_items()[:3]), atol=1e-5)
