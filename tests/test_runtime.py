"""Backends behind one interface: the PyTorch backend, the factory, lazy optional imports, parity."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mimic_engine.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from mimic_engine.errors import CheckpointError, ConfigError
from mimic_engine.preprocess import Item
from mimic_engine.runtime import BACKENDS, auto_candidates, cpu_features, find_checkpoint, load_backend
from mimic_engine.runtime.cpu_features import parse_cpuinfo
from mimic_engine.runtime.export_format import Manifest, checkpoint_source, write_manifest
from mimic_engine.runtime.torch_backend import TorchBackend
from tests.conftest import make_image_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `auto` on the CPU depends on the CPU's flags: these tests pin one without native bf16
# (tests/test_cpu_backends.py covers the others)
FP32_CPU = parse_cpuinfo("vendor_id : AuthenticAMD\nmodel name : AMD EPYC 7B12\nflags : sse4_2 avx avx2 fma\n")


@pytest.fixture
def fp32_cpu(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_info", lambda: FP32_CPU)


def mixed_items():
    return [
        Item(text="a short query"),
        Item(text="a much longer passage about buses, trains and the weather in the mountains " * 3),
        Item(images=[make_image_bytes(1)]),  # image only
        Item(text="a caption", images=[make_image_bytes(2, size=(64, 20))]),
        Item(text="two images", images=[make_image_bytes(3), make_image_bytes(4, mode="L")]),
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_encoders):
    enc = tiny_encoders("decoder")
    path = str(tmp_path_factory.mktemp("model") / "ckpt.pt")
    save_checkpoint(path, enc.model, enc.tokenizer, {"step": 1})
    return path


@pytest.mark.parametrize("fusion", ["decoder", "early", "late"])
def test_torch_backend_matches_the_encoder(fusion, tiny_encoders):
    enc = tiny_encoders(fusion)
    items = mixed_items()
    expected = enc.encode(items)
    got = TorchBackend.from_encoder(enc).encode(items)
    assert got.shape == (len(items), enc.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_torch_fp16_is_close_to_fp32(tiny_encoders):
    enc = tiny_encoders("decoder")
    items = mixed_items()
    fp32 = TorchBackend.from_encoder(enc).encode(items)
    fp16_backend = TorchBackend.from_encoder(enc, dtype="fp16")
    assert fp16_backend.name == "torch-fp16"
    fp16 = fp16_backend.encode(items)
    assert np.isfinite(fp16).all()
    np.testing.assert_allclose(np.linalg.norm(fp16, axis=1), 1.0, atol=1e-3)
    assert (np.sum(fp16 * fp32, axis=1) > 0.999).all()  # cosine to the fp32 vector


def test_factory_loads_torch_from_a_checkpoint(ckpt, tiny_encoders, fp32_cpu):
    items = mixed_items()
    expected = tiny_encoders("decoder").encode(items)
    for name in ("torch", "auto"):
        backend = load_backend(name, ckpt)
        assert backend.name == "torch"
        np.testing.assert_allclose(backend.encode(items), expected, atol=1e-5)
    assert "checkpoint" in load_backend("auto", ckpt).selection_reason
    torch_backend = load_backend("torch", ckpt)
    # the content id of the checkpoint; the file's sha256 (what older indexes recorded) as a legacy id
    assert torch_backend.model_id == load_checkpoint(ckpt).model_id == load_backend("torch-fp16", ckpt).model_id
    assert torch_backend.legacy_model_ids == (file_sha256(ckpt),)


def test_factory_errors_name_the_fix(ckpt, tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_backend("tensorrtx", ckpt)
    for name in BACKENDS:
        assert name in str(exc.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backend("torch", str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="export directory"):
        load_backend("onnx", ckpt)
    with pytest.raises(ConfigError, match="CUDA"):
        load_backend("torch-cuda", ckpt, device="cpu")
    with pytest.raises(ConfigError, match="device"):
        load_backend("torch", ckpt, device="tpu")
    with pytest.raises(ConfigError, match="threads"):
        load_backend("torch", ckpt, threads=0)
    empty = tmp_path / "export"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="ckpt.pt"):
        load_backend("torch", str(empty))


def test_auto_preference_order(ckpt, tmp_path, fp32_cpu):
    import importlib.util

    export_dir = tmp_path / "exp"
    export_dir.mkdir()
    assert [n for n, _ in auto_candidates(ckpt, "cpu")] == ["torch"]
    openvino = ["openvino"] if importlib.util.find_spec("openvino") else []
    assert [n for n, _ in auto_candidates(str(export_dir), "cpu")] == ["onnx-optimized", "onnx", *openvino, "torch"]
    gpu = [n for n, _ in auto_candidates(ckpt, "cuda")]
    assert gpu[0] == "torch-cuda" and gpu[-1] == "torch"
    assert [n for n, _ in auto_candidates(str(export_dir), "cuda")][0] == "tensorrt"
    # an export dir's manifest names its source checkpoint, which lets the torch backends load it;
    # other JSON files in the folder are not consulted
    (export_dir / "meta.json").write_text(json.dumps({"checkpoint": ckpt}))
    assert find_checkpoint(str(export_dir), required=False) is None
    sha = file_sha256(ckpt)
    write_manifest(str(export_dir), Manifest(source=checkpoint_source(ckpt, str(export_dir), "id", sha),
                                             fusion="decoder", opset=17, ranges={}))
    assert find_checkpoint(str(export_dir)) == ckpt
    # a run folder exported at `before/` and then moved whole to `after/`: found beside the export
    before, after = tmp_path / "before", tmp_path / "after"
    (after / "model").mkdir(parents=True)
    (after / "exp").mkdir()
    shutil.copyfile(ckpt, after / "model" / "ckpt.pt")
    source = checkpoint_source(str(before / "model" / "ckpt.pt"), str(before / "exp"), "id", sha)
    write_manifest(str(after / "exp"), Manifest(source=source, fusion="decoder", opset=17, ranges={}))
    assert find_checkpoint(str(after / "exp")) == str(after / "model" / "ckpt.pt")


def test_export_checkpoint_must_be_the_recorded_one(ckpt, tiny_encoders, tmp_path):
    """The manifest's checkpoint path is followed only to the file the export was made from."""
    from mimic_engine.checkpoint import load_checkpoint, update_checkpoint_meta

    model_id = load_checkpoint(ckpt).model_id
    other_enc = tiny_encoders("late")
    other = save_checkpoint(str(tmp_path / "x.pt"), other_enc.model, other_enc.tokenizer, {"step": 1})
    export_dir = tmp_path / "exp"
    export_dir.mkdir()
    source = {**checkpoint_source(ckpt, str(export_dir), model_id, file_sha256(ckpt)), "relative": "../x.pt"}
    write_manifest(str(export_dir), Manifest(source=source, fusion="decoder", opset=17, ranges={}))
    # ../x.pt is another model: refused, and the absolute path (the right file) is taken instead
    assert find_checkpoint(str(export_dir)) == ckpt
    source["checkpoint"] = other
    write_manifest(str(export_dir), Manifest(source=source, fusion="decoder", opset=17, ranges={}))
    with pytest.raises(CheckpointError, match="is not the one this export was made from"):
        find_checkpoint(str(export_dir))
    # the same model with updated meta (final metrics written after the export) is still the source
    same = tmp_path / "same.pt"
    shutil.copyfile(ckpt, same)
    update_checkpoint_meta(str(same), {"final_metrics": {"dev": 1.0}})
    assert file_sha256(str(same)) != file_sha256(ckpt)
    source["checkpoint"] = str(same)
    write_manifest(str(export_dir), Manifest(source=source, fusion="decoder", opset=17, ranges={}))
    assert find_checkpoint(str(export_dir)) == str(same)


def test_tensorrt_engine_paths_stay_in_the_export(tmp_path):
    from mimic_engine.runtime.export_format import ExportError, read_manifest

    for bad in ("../engine.plan", "/etc/passwd", "tensorrt/../../x.plan", "fusion.plan", 5):
        manifest = Manifest(source={"checkpoint": None, "model_id": "id"}, fusion="decoder", opset=17, ranges={},
                            tensorrt={"engines": {"fusion": bad}, "profiles": {}, "precision": "fp16"}, complete=True)
        write_manifest(str(tmp_path), manifest)
        with pytest.raises(ExportError, match="not a file name inside the export's tensorrt/ folder"):
            read_manifest(str(tmp_path))
    manifest.tensorrt["engines"]["fusion"] = "tensorrt/fusion.plan"
    write_manifest(str(tmp_path), manifest)
    assert read_manifest(str(tmp_path)).tensorrt["engines"] == {"fusion": "tensorrt/fusion.plan"}


def test_torch_backend_does_not_import_optional_runtimes(ckpt):
    """A missing onnxruntime / tensorrt only affects their own backends."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["onnxruntime"] = None   # import onnxruntime -> ImportError, as if not installed
        sys.modules["tensorrt"] = None
        sys.modules["openvino"] = None
        from mimic_engine.runtime import load_backend
        from mimic_engine.preprocess import Item
        b = load_backend("auto", {ckpt!r})
        print(b.name, b.encode([Item(text="x")]).shape)
        try:
            load_backend("onnx", {os.path.dirname(ckpt)!r})
        except ImportError as exc:
            print("onnx:", type(exc).__name__)
        loaded = [m for m, v in sys.modules.items() if v is not None]
        assert "onnxruntime" not in loaded and "openvino" not in loaded
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "torch (1, 16)" in out.stdout
    assert "onnx: " in out.stdout, out.stdout + out.stderr


def test_all_present_backends_agree(ckpt, tiny_export, fp32_cpu):
    """torch vs every backend an export here produces (ONNX fp32 / optimized / int8), within the
    export's own tolerances; TensorRT and CUDA graphs are covered where a GPU is (their own tests).
    The export is of another file holding the same model, so the ids agree too."""
    from mimic_engine.export.parity import TOLERANCES

    export_dir = tiny_export.out_dir
    items = mixed_items()
    reference = load_backend("torch", ckpt).encode(items)
    for name, variant in (("onnx", "fp32"), ("onnx-optimized", "optimized"), ("onnx-int8", "int8")):
        backend = load_backend(name, export_dir)
        assert backend.name == name and backend.model_id == load_backend("torch", ckpt).model_id
        got = backend.encode(items)
        max_abs, min_cos = TOLERANCES[variant]
        if max_abs is not None:
            np.testing.assert_allclose(got, reference, atol=max_abs, err_msg=name)
        assert (np.sum(got * reference, axis=1) >= min_cos).all(), name
    # auto on a CPU without bf16, with an export directory, prefers ONNX Runtime; the torch backends find the
    # checkpoint through the export's manifest
    assert load_backend("auto", export_dir).name.startswith("onnx")
    np.testing.assert_allclose(load_backend("torch", export_dir).encode(items), reference, atol=1e-6)


def test_torch_backend_on_cuda(ckpt):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch; the CUDA path of the torch backends runs on GPU machines only")
    items = mixed_items()
    cpu = load_backend("torch", ckpt).encode(items)
    np.testing.assert_allclose(load_backend("torch", ckpt, device="cuda").encode(items), cpu, atol=1e-4)
    fp16 = load_backend("torch-fp16", ckpt, device="cuda").encode(items)
    assert (np.sum(fp16 * cpu, axis=1) > 0.999).all()
    auto = load_backend("auto", ckpt, device="cuda")
    assert auto.name in ("torch-cuda", "torch") and auto.selection_reason
    assert (np.sum(auto.encode(items) * cpu, axis=1) > 0.999).all()
