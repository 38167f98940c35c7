"""TensorRT: the plain-Python parts everywhere (profiles, sidecars, compatibility, cache keys);
engine building and the backend only where `import tensorrt` works and a GPU is visible."""
import dataclasses
import json
import os

import numpy as np
import pytest

from mimic_engine.config import preset
from mimic_engine.export.artifacts import Range, ShapeRanges
from mimic_engine.export.tensorrt_build import availability, stage_profiles, timing_cache_name
from mimic_engine.runtime.export_format import (EngineMismatchError, EngineSidecar, Profile, ShapeOutOfProfileError,
                                                check_compatible, read_sidecar, select_profile, write_sidecar)

SHA = "ab" * 32


def tiny_ranges():
    config = preset("tiny")
    return config, ShapeRanges.defaults(config)


def test_default_profiles_cover_the_ranges_for_every_input():
    config, ranges = tiny_ranges()  # tiny: 16 visual tokens per image, hidden 32, max_length 32
    fusion = stage_profiles(config, ranges, "fusion")
    assert [p.name for p in fusion] == ["latency", "throughput"]
    lo, opt, hi = fusion[0].shapes["visual_tokens"]
    assert lo == [1, 1, 32] and hi == [64, 64, 32] and opt == [1, 16, 32]
    assert fusion[1].shapes["input_ids"] == [[1, 1], [64, 16], [64, 32]]
    vision = stage_profiles(config, ranges, "vision")
    assert vision[0].shapes["pixel_values"] == [[1, 3, 32, 32], [1, 3, 32, 32], [256, 3, 32, 32]]


def test_profile_validation_names_the_violation():
    with pytest.raises(Exception, match="min=8, opt=4, max=16 violates"):
        Profile("p", {"input_ids": [[8, 1], [4, 1], [16, 1]]}).validate()
    with pytest.raises(Exception, match="ranks differ"):
        Profile("p", {"input_ids": [[1, 1], [4], [16, 1]]}).validate()
    with pytest.raises(Exception, match="violates 1 <= min"):
        Range("visual_tokens", 0, 1, 2)


def test_select_profile_picks_the_tightest_fitting_one():
    config, ranges = tiny_ranges()
    profiles = stage_profiles(config, ranges, "fusion")
    small = [Profile("small", {k: [v[0], v[0], [1] + v[2][1:]] for k, v in profiles[0].shapes.items()})] + profiles
    shapes = {"input_ids": (1, 5), "attention_mask": (1, 5), "visual_tokens": (1, 16, 32), "visual_mask": (1, 16)}
    assert select_profile(small, shapes) == 0  # batch-1 profile is the tightest
    big = {**shapes, "input_ids": (40, 5), "attention_mask": (40, 5), "visual_tokens": (40, 16, 32),
           "visual_mask": (40, 16)}
    assert select_profile(small, big) in (1, 2)
    with pytest.raises(ShapeOutOfProfileError, match="outside every TensorRT profile"):
        select_profile(profiles, {**shapes, "input_ids": (1, 999), "attention_mask": (1, 999)})
    with pytest.raises(ShapeOutOfProfileError, match="not inputs of this engine"):
        select_profile(profiles, {"pixel_values": (1, 3, 32, 32)})


def make_sidecar(**kw):
    config, ranges = tiny_ranges()
    base = dict(stage="fusion", precision="fp16", tensorrt_version="10.8.0.43", gpu_name="NVIDIA H100 80GB HBM3",
                compute_capability="9.0", model_id=SHA, onnx_file="fusion.fp16.onnx", onnx_sha256="cd" * 32,
                profiles=[dataclasses.asdict(p) for p in stage_profiles(config, ranges, "fusion")])
    return EngineSidecar(**{**base, **kw})


def test_sidecar_round_trip_and_compatibility(tmp_path):
    engine = str(tmp_path / "fusion.plan")
    write_sidecar(engine, make_sidecar())
    side = read_sidecar(engine)
    assert side.tensorrt_version == "10.8.0.43" and side.profile_objects()[1].name == "throughput"
    check_compatible(side, SHA, "10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")  # same everything: accepted
    with pytest.raises(EngineMismatchError, match="holds model abababababab, this export is ffffffffffff"):
        check_compatible(side, "f" * 64, "10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.8.0.43, this is TensorRT 10.9.0.34"):
        check_compatible(side, SHA, "10.9.0.34", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(EngineMismatchError, match=r"built on NVIDIA H100 80GB HBM3 \(compute capability 9.0\), this "
                                                  r"GPU is NVIDIA A100-SXM4-40GB \(8.0\)"):
        check_compatible(side, SHA, "10.8.0.43", "NVIDIA A100-SXM4-40GB", "8.0")
    with pytest.raises(EngineMismatchError, match="Rebuild it here"):
        check_compatible(side, SHA, "10.8.0.43", "NVIDIA H200", "9.0")


def test_missing_or_corrupt_sidecar_is_refused(tmp_path):
    engine = str(tmp_path / "vision.plan")
    with pytest.raises(EngineMismatchError, match="has no sidecar"):
        read_sidecar(engine)
    (tmp_path / "vision.plan.json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="not readable"):
        read_sidecar(engine)


def test_timing_cache_key_depends_on_version_and_gpu_and_is_a_safe_file_name():
    a = timing_cache_name("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
    assert a == "timing-trt10.8.0.43-sm90-nvidia-h100-80gb-hbm3.cache"
    assert a != timing_cache_name("10.9.0.34", "NVIDIA H100 80GB HBM3", "9.0")
    assert a != timing_cache_name("10.8.0.43", "NVIDIA H200", "9.0")
    weird = timing_cache_name("10.8.0", "GPU/../x y", "8.6")
    assert "/" not in weird and " " not in weird and weird.endswith(".cache")


def test_export_without_tensorrt_says_what_it_skipped_and_why(tmp_path, tiny_encoders):
    ok, reason = availability()
    if ok:
        pytest.skip("TensorRT and a GPU are available here; the skip path does not apply")
    from mimic_engine.checkpoint import save_checkpoint
    from mimic_engine.runtime.export_format import read_manifest
    from mimic_engine.export.pipeline import ExportOptions, export_checkpoint

    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    enc = tiny_encoders("decoder")
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    lines = []
    export_checkpoint(ckpt, ExportOptions(out_dir=str(tmp_path / "e"), variants=("fp16",)), log=lines.append)
    manifest = read_manifest(str(tmp_path / "e"))
    assert manifest.tensorrt is None
    assert manifest.skipped == [{"step": "tensorrt", "reason": reason}]
    assert any("skipped tensorrt: " + reason in line for line in lines)
    assert os.path.exists(tmp_path / "e" / "fusion.fp16.onnx")  # the ONNX artifacts are all there
    from mimic_engine.runtime.tensorrt_backend import TensorRTBackend

    with pytest.raises(Exception, match="tensorrt|CUDA GPU"):
        TensorRTBackend(str(tmp_path / "e"))


# ---- real TensorRT (skipped where it is not installed) -----------------------------------------------
@pytest.mark.gpu
def test_tensorrt_engine_matches_pytorch(tmp_path, tiny_encoders):
    ok, reason = availability()
    if not ok:
        pytest.skip(f"TensorRT engine test needs TensorRT 10 or 11 and a CUDA GPU: {reason}")
    from mimic_engine.checkpoint import save_checkpoint
    from mimic_engine.runtime.export_format import read_manifest
    from mimic_engine.export.pipeline import ExportOptions, export_checkpoint
    from mimic_engine.preprocess import Item
    from mimic_engine.runtime.tensorrt_backend import TensorRTBackend
    from tests.conftest import make_image_bytes

    enc = tiny_encoders("decoder")
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    out = str(tmp_path / "e")
    export_checkpoint(ckpt, ExportOptions(out_dir=out, variants=("fp16",)), log=print)
    manifest = read_manifest(out)
    assert manifest.tensorrt and set(manifest.tensorrt["engines"]) == {"vision", "fusion"}
    backend = TensorRTBackend(out)
    items = [Item(text="a cat"), Item(images=[make_image_bytes(1)]),
             Item(text="two", images=[make_image_bytes(2), make_image_bytes(3)])]
    cos = (backend.encode(items) * enc.encode(items)).sum(1)
    assert cos.min() >= 0.999, cos
    assert np.isfinite(backend.encode([Item(text="text only")])).all()
    # an engine claiming another checkpoint is refused
    side = read_sidecar(os.path.join(out, manifest.tensorrt["engines"]["fusion"]))
    write_sidecar(os.path.join(out, manifest.tensorrt["engines"]["fusion"]),
                  dataclasses.replace(side, model_id="0" * 64))
    with pytest.raises(EngineMismatchError):
        TensorRTBackend(out)


# ---- the build code against a strict stand-in for the TensorRT 10 Python API -----------------------
class _FakeTensorRT:
    """Only what TensorRT 10 offers and build_engine needs: any other attribute (max_workspace_size,
    binding indices, ...) raises AttributeError, so a call to a removed API fails this test. It
    checks the call sequence and the sidecar; the real engine is tested above where TensorRT runs."""

    import enum as _enum

    __version__ = "10.8.0.43"
    NetworkDefinitionCreationFlag = _enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
    MemoryPoolType = _enum.Enum("MemoryPoolType", "WORKSPACE")
    BuilderFlag = _enum.Enum("BuilderFlag", "FP16 TF32")
    TensorIOMode = _enum.Enum("TensorIOMode", "INPUT OUTPUT")
    DataType = _enum.Enum("DataType", "FLOAT HALF INT64")
    calls = []

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class _Cache:
        def serialize(self):
            return b"timing-cache"

    class _Config:
        def set_memory_pool_limit(self, pool, size):
            _FakeTensorRT.calls.append(("pool", pool.name, size))

        def clear_flag(self, flag):
            _FakeTensorRT.calls.append(("clear_flag", flag.name))

        def create_timing_cache(self, data):
            _FakeTensorRT.calls.append(("timing_cache_in", bytes(data)))
            return _FakeTensorRT._Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return _FakeTensorRT._Cache()

        def add_optimization_profile(self, profile):
            _FakeTensorRT.calls.append(("profile", dict(profile.shapes)))

    class _Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            _FakeTensorRT.calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return _FakeTensorRT._Config()

        def create_optimization_profile(self):
            return _FakeTensorRT._Profile()

        def build_serialized_network(self, network, config):
            return b"engine-bytes"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            _FakeTensorRT.calls.append(("parse", os.path.basename(path)))
            return os.path.exists(path)

    class _Engine:
        io = [("input_ids", "INPUT", "INT64", [-1, -1]), ("embeddings", "OUTPUT", "FLOAT", [-1, 16])]
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return self.io[i][0]

        def _row(self, name):
            return next(r for r in self.io if r[0] == name)

        def get_tensor_mode(self, name):
            return _FakeTensorRT.TensorIOMode[self._row(name)[1]]

        def get_tensor_dtype(self, name):
            return _FakeTensorRT.DataType[self._row(name)[2]]

        def get_tensor_shape(self, name):
            return self._row(name)[3]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _FakeTensorRT._Engine()


def test_build_engine_uses_the_tensorrt10_api_and_writes_sidecar_and_cache(tmp_path, monkeypatch, tiny_encoders):
    import sys

    from mimic_engine.export import tensorrt_build
    from mimic_engine.export.onnx_export import export_graph

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT)
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda device=0: ("NVIDIA H100 80GB HBM3", "9.0"))
    _FakeTensorRT.calls = []
    model = tiny_encoders("decoder").model
    onnx_path = str(tmp_path / "fusion.onnx")
    export_graph(model, "fusion", onnx_path, 17, {"model_id": SHA})
    config, ranges = tiny_ranges()
    profiles = stage_profiles(config, ranges, "fusion")
    engine = str(tmp_path / "tensorrt" / "fusion.plan")
    side = tensorrt_build.build_engine(onnx_path, engine, profiles, SHA, "fusion", "fp32", str(tmp_path / "tensorrt"),
                                       log=lambda *_: None)
    calls = _FakeTensorRT.calls
    assert ("network_flags", 1 << 5) in calls and ("parse", "fusion.onnx") in calls
    assert ("pool", "WORKSPACE", tensorrt_build.DEFAULT_WORKSPACE) in calls and ("clear_flag", "TF32") in calls
    assert [c[1]["visual_tokens"] for c in calls if c[0] == "profile"] == [tuple(map(tuple, p.shapes["visual_tokens"]))
                                                                           for p in profiles]
    assert open(engine, "rb").read() == b"engine-bytes"
    cache = tmp_path / "tensorrt" / timing_cache_name("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
    assert cache.read_bytes() == b"timing-cache" and side.timing_cache == cache.name
    stored = read_sidecar(engine)
    assert stored.model_id == SHA and stored.tensorrt_version == "10.8.0.43"
    assert stored.inputs == [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]}]
    assert [p.name for p in stored.profile_objects()] == ["latency", "throughput"]
    # a second build reads the cache it wrote
    _FakeTensorRT.calls = []
    tensorrt_build.build_engine(onnx_path, engine, profiles, SHA, "fusion", "fp16", str(tmp_path / "tensorrt"),
                                log=lambda *_: None)
    assert ("timing_cache_in", b"timing-cache") in _FakeTensorRT.calls
    assert not any(c[0] == "clear_flag" for c in _FakeTensorRT.calls)  # fp16: the graph's types decide


def test_a_sidecar_of_a_format_1_export_is_read_with_its_checkpoint_sha256_as_the_model_id(tmp_path):
    engine = str(tmp_path / "fusion.plan")
    write_sidecar(engine, make_sidecar())
    path = engine + ".json"
    data = json.load(open(path))
    data["checkpoint_sha256"] = data.pop("model_id")  # how format-1 exports wrote it
    json.dump(data, open(path, "w"))
    side = read_sidecar(engine)
    assert side.model_id == SHA
    check_compatible(side, SHA, "10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


class _FakeTensorRT11(_FakeTensorRT):
    """TensorRT 11 as far as build_engine is concerned: the weak-typing flags are gone (BuilderFlag has
    no FP16/INT8/BF16), and this stand-in also drops the STRONGLY_TYPED creation flag (11 keeps it only
    for compatibility and ignores it), so the build must not depend on either."""

    import enum as _enum

    __version__ = "11.4.0.106"
    NetworkDefinitionCreationFlag = _enum.IntEnum("NetworkDefinitionCreationFlag", {"PREFER_JIT_PYTHON_PLUGINS": 3})
    BuilderFlag = _enum.Enum("BuilderFlag", "TF32 REFIT")
    calls = []


def test_build_engine_works_with_the_tensorrt11_api(tmp_path, monkeypatch, tiny_encoders):
    import sys

    from mimic_engine.export import tensorrt_build
    from mimic_engine.export.onnx_export import export_graph

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT11)
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda device=0: ("NVIDIA H200", "9.0"))
    _FakeTensorRT.calls = []  # the inner classes append to the base's list
    onnx_path = str(tmp_path / "fusion.onnx")
    export_graph(tiny_encoders("decoder").model, "fusion", onnx_path, 17, {"model_id": SHA})
    config, ranges = tiny_ranges()
    engine = str(tmp_path / "tensorrt" / "fusion.plan")
    side = tensorrt_build.build_engine(onnx_path, engine, stage_profiles(config, ranges, "fusion"), SHA, "fusion",
                                       "fp32", str(tmp_path / "tensorrt"), log=lambda *_: None)
    assert ("network_flags", 0) in _FakeTensorRT.calls  # no STRONGLY_TYPED flag to pass: 11 is strongly typed anyway
    assert ("clear_flag", "TF32") in _FakeTensorRT.calls
    assert side.tensorrt_version == "11.4.0.106" and read_sidecar(engine).precision == "fp32"


def test_network_flags_are_feature_detected():
    from mimic_engine.export.tensorrt_build import network_flags

    assert network_flags(_FakeTensorRT) == 1 << 5  # 10.x: the STRONGLY_TYPED bit
    assert network_flags(_FakeTensorRT11) == 0


def test_availability_and_install_hint_name_tensorrt_10_and_11(monkeypatch):
    import sys
    import types

    from mimic_engine.runtime.export_format import TENSORRT_INSTALL

    assert "tensorrt-cu12" in TENSORRT_INSTALL and "tensorrt-cu13" in TENSORRT_INSTALL
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    ok, reason = availability()
    assert not ok and "tensorrt-cu12" in reason and "10 or 11" in reason
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    ok, reason = availability()
    assert not ok and "TensorRT 8.6.1" in reason and "10 or 11" in reason
