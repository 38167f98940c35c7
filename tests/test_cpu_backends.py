"""The CPU-feature-driven backends: cpu_features, `auto` on the CPU, torch-bf16 and OpenVINO.

The choice logic runs everywhere on stand-in CPUs; the bf16 numerics run where this CPU has native
bf16 and skip with the reason elsewhere; the OpenVINO tests need `openvino` (pip install openvino).
"""
import os

import numpy as np
import pytest

from mimic_engine.errors import ConfigError
from mimic_engine.runtime import auto_candidates, cpu_candidates, load_backend
from mimic_engine.runtime import cpu_features
from mimic_engine.runtime.cpu_features import CpuInfo, cpu_info, parse_cpuinfo
from tests.conftest import mixed_items

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: should not be read
"""
EPYC_ZEN2 = """vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_2 avx avx2 fma f16c
"""
GRAVITON3 = """processor\t: 0
Features\t: fp asimd evtstrm aes sha2 crc32 atomics fphp asimdhp asimddp sve i8mm bf16 svebf16
CPU implementer\t: 0x41
"""
NO_BF16 = parse_cpuinfo(EPYC_ZEN2)
NEEDS_BF16 = pytest.mark.skipif(not cpu_info().native_bf16,
                                reason=f"this CPU has no native bf16 ({cpu_info().describe()}): the bf16 backends "
                                       "refuse to run here (tested below with a stand-in CPU)")


# ---- cpu_features ------------------------------------------------------------------------------------
def test_cpuinfo_parsing_and_kinds():
    xeon, epyc, arm = parse_cpuinfo(XEON_AMX), parse_cpuinfo(EPYC_ZEN2), parse_cpuinfo(GRAVITON3)
    assert (xeon.vendor, xeon.model) == ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+")
    assert xeon.native_bf16 and xeon.amx and xeon.int8_dot and xeon.kind == "AMX + bf16"
    assert "amx_bf16" in xeon.simd_flags and "fpu" not in xeon.simd_flags
    assert not epyc.native_bf16 and not epyc.int8_dot and epyc.avx2 and epyc.kind == "AVX2"
    assert arm.vendor == "0x41" and arm.native_bf16 and arm.int8_dot and not arm.amx
    assert "amx_bf16" in xeon.describe() and "AVX2" in epyc.describe()
    assert parse_cpuinfo("").kind == "other"


def test_this_machines_cpu_is_read_and_recorded_by_the_benchmark():
    from mimic_engine.bench.environment import environment

    env = environment("cpu")
    cpu = cpu_info()
    assert env["cpu"] == cpu.model and env["cpu_kind"] == cpu.kind and env["cpu_flags"] == cpu.simd_flags
    if os.path.exists("/proc/cpuinfo") and "GenuineIntel" in open("/proc/cpuinfo").read():
        assert env["cpu_vendor"] == "GenuineIntel" and "avx2" in env["cpu_flags"]


# ---- auto on the CPU ---------------------------------------------------------------------------------
ALL_VARIANTS = {"fp32", "optimized", "int8", "fp16"}
BOTH = {"openvino", "onnxruntime"}


def names(order):
    return [n for n, _ in order]


def test_auto_on_a_bf16_cpu_prefers_bf16_and_never_int8():
    amx = parse_cpuinfo(XEON_AMX)
    order = cpu_candidates(amx, ALL_VARIANTS, installed=BOTH)
    assert names(order) == ["openvino-bf16", "onnx-optimized", "onnx", "openvino", "torch"]
    assert "amx_bf16" in order[0][1]  # the reason names the flag it was chosen for
    # without openvino: the fp32 graphs (PyTorch bf16 autocast measured no faster than fp32, never auto)
    order = cpu_candidates(amx, ALL_VARIANTS, installed={"onnxruntime"})
    assert names(order)[:2] == ["onnx-optimized", "onnx"]
    # a bare checkpoint
    assert names(cpu_candidates(amx, set(), installed=BOTH)) == ["torch"]
    assert not any("int8" in n for n in names(cpu_candidates(amx, ALL_VARIANTS, BOTH)))


def test_auto_on_a_cpu_without_bf16_uses_fp32_graphs():
    order = names(cpu_candidates(NO_BF16, ALL_VARIANTS, installed=BOTH))
    assert order == ["onnx-optimized", "onnx", "openvino", "torch"]
    # only the fp32 graphs exported, no ONNX Runtime
    assert names(cpu_candidates(NO_BF16, {"fp32"}, {"openvino"})) == ["openvino", "torch"]
    assert names(cpu_candidates(NO_BF16, set(), BOTH)) == ["torch"]


def test_auto_candidates_read_the_export_and_the_cpu(tiny_export, monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_info", lambda: NO_BF16)
    assert names(auto_candidates(tiny_export.out_dir, "cpu"))[0] == "onnx-optimized"
    monkeypatch.setattr(cpu_features, "cpu_info", lambda: parse_cpuinfo(XEON_AMX))
    first = names(auto_candidates(tiny_export.out_dir, "cpu"))[0]
    assert first == ("openvino-bf16" if _has("openvino") else "onnx-optimized")
    assert names(auto_candidates(tiny_export.checkpoint, "cpu")) == ["torch"]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---- torch-bf16 ----------------------------------------------------------------------------------------
def test_bf16_backends_are_refused_on_a_cpu_without_bf16(tiny_export, monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_info", lambda: NO_BF16)
    for name in ("torch-bf16", "openvino-bf16"):
        if name.startswith("openvino") and not _has("openvino"):
            continue
        with pytest.raises(ConfigError, match="native bf16") as exc:
            load_backend(name, tiny_export.out_dir)
        assert "AMD EPYC 7B12" in str(exc.value) and "avx512_bf16" in str(exc.value)


@NEEDS_BF16
def test_torch_bf16_matches_fp32_with_norms_in_fp32(tiny_encoders):
    import torch

    from mimic_engine.runtime.torch_backend import TorchBackend

    enc = tiny_encoders("decoder")
    items = mixed_items()
    fp32 = TorchBackend.from_encoder(enc).encode(items)
    backend = TorchBackend.from_encoder(enc, dtype="bf16")
    assert backend.name == "torch-bf16" and backend.model is not enc.model  # bf16 weights in its own copy
    assert next(enc.model.parameters()).dtype == torch.float32  # the shared encoder is untouched
    seen = {}

    def record(key):
        def hook(module, args, out):  # returns None: the output is kept
            seen.setdefault(key, (args[0].dtype, out.dtype))
        return hook

    norm = next(m for m in backend.model.modules() if isinstance(m, torch.nn.LayerNorm))
    linear = next(m for m in backend.model.modules() if isinstance(m, torch.nn.Linear))
    hooks = [norm.register_forward_hook(record("norm")), linear.register_forward_hook(record("linear"))]
    bf16 = backend.encode(items)
    for h in hooks:
        h.remove()
    assert seen["norm"] == (torch.float32, torch.float32) and seen["linear"][1] == torch.bfloat16
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)  # final normalisation in fp32
    assert (np.sum(bf16 * fp32, axis=1) > 0.999).all()
    backend.close()
    assert not backend._hooks


# ---- OpenVINO ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    pytest.importorskip("openvino", reason="openvino is not installed: pip install 'mimic-engine[openvino]'")
    return str(tmp_path_factory.mktemp("openvino-cache"))


def test_openvino_fp32_and_int8_match_pytorch_and_set_their_precision(tiny_export, ov_cache):
    from mimic_engine.export.parity import TOLERANCES

    items = mixed_items()
    reference = load_backend("torch", tiny_export.checkpoint).encode(items)
    fp32 = load_backend("openvino", tiny_export.out_dir, cache_dir=ov_cache)
    assert fp32.name == "openvino" and fp32.capabilities()["inference_precision_hint"] == "f32"
    assert fp32.model_id == load_backend("torch", tiny_export.checkpoint).model_id
    np.testing.assert_allclose(fp32.encode(items), reference, atol=TOLERANCES["fp32"][0])
    int8 = load_backend("openvino-int8", tiny_export.out_dir, cache_dir=ov_cache, threads=1)
    assert (np.sum(int8.encode(items) * reference, axis=1) >= TOLERANCES["int8"][1]).all()
    # a batch without images (the one masked visual token)
    text_only = [i for i in items if not i.images]
    np.testing.assert_allclose(fp32.encode(text_only), load_backend("torch", tiny_export.checkpoint).encode(text_only),
                               atol=TOLERANCES["fp32"][0])


@NEEDS_BF16
def test_openvino_bf16_after_fp32_in_one_cache_is_right(tiny_export, ov_cache):
    """OpenVINO 2026.4's cache key leaves out the precision hint: a bf16 compile after an fp32 one in the
    same CACHE_DIR loaded the f32 blob and returned NaN. The backend keeps one folder per precision."""
    items = mixed_items()
    reference = load_backend("torch", tiny_export.checkpoint).encode(items)
    load_backend("openvino", tiny_export.out_dir, cache_dir=ov_cache).encode(items)
    bf16 = load_backend("openvino-bf16", tiny_export.out_dir, cache_dir=ov_cache)
    assert bf16.capabilities()["inference_precision_hint"] == "bf16"
    got = bf16.encode(items)
    assert np.isfinite(got).all() and (np.sum(got * reference, axis=1) > 0.999).all()
    assert {"f32-threadsdefault", "bf16-threadsdefault"} <= set(os.listdir(ov_cache))


def test_openvino_caches_compiled_models_on_disk(tiny_export, tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed: pip install 'mimic-engine[openvino]'")
    cache = tmp_path / "cache"
    load_backend("openvino", tiny_export.out_dir, cache_dir=str(cache), threads=1)
    blobs = sorted(p.name for p in (cache / "f32-threads1").iterdir())
    assert len(blobs) == 2  # one compiled model per stage
    before = {p: p.stat().st_mtime_ns for p in (cache / "f32-threads1").iterdir()}
    load_backend("openvino", tiny_export.out_dir, cache_dir=str(cache), threads=1)  # a restart: read, not rewritten
    assert {p: p.stat().st_mtime_ns for p in (cache / "f32-threads1").iterdir()} == before


def test_openvino_errors_name_the_fix(tiny_export, tiny_fusion_exports, monkeypatch, ov_cache):
    from mimic_engine.errors import MissingDependencyError
    from mimic_engine.runtime.export_format import ExportError
    from mimic_engine.runtime.openvino_backend import OpenVinoBackend

    with pytest.raises(ConfigError, match="export directory"):
        load_backend("openvino", tiny_export.checkpoint)
    with pytest.raises(ConfigError, match="precision='fp8'"):
        OpenVinoBackend(tiny_export.out_dir, precision="fp8")
    with pytest.raises(ExportError, match="no 'int8' graphs"):  # this export holds the fp32 graphs only
        load_backend("openvino-int8", tiny_fusion_exports("late").out_dir, cache_dir=ov_cache)
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        load_backend("openvino", tiny_export.out_dir)
