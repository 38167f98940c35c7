"""TensorRT engines from the exported ONNX graphs (TensorRT 10 and 11), with their default
optimisation profiles and timing-cache keys. What the runtime reads back (profiles, the JSON
sidecar of an engine, `check_compatible`, `select_profile`) lives in
`mimic_engine.runtime.export_format`.

Engines: one per stage, `tensorrt/vision.plan` and `tensorrt/fusion.plan`, built from the fp16
ONNX graph as a STRONGLY TYPED network (the graph's Casts say which parts stay fp32), or from the
fp32 graph for an fp32 engine. That is the only mode TensorRT 11 has: it removed the weak-typing
API (BuilderFlag.FP16/INT8/BF16/FP8, precision constraints, calibrators, platform_has_fast_fp16),
which nothing here uses. What differs between the versions is feature-detected, not read from the
version number: the STRONGLY_TYPED creation flag (required on 10.x, accepted and ignored on 11.x) is
passed where it exists, and TF32 is cleared for fp32 engines where the flag exists. Name-based I/O
only (num_io_tensors, set_input_shape, set_tensor_address, execute_async_v3), workspace via
set_memory_pool_limit. GPU memory and streams come from torch (no pycuda).

An engine is only valid for the TensorRT version and GPU that built it, and for the weights it
holds: each `.plan` has a `.plan.json` sidecar (TensorRT version, GPU name and compute capability,
profiles, model id, source ONNX sha256) and `check_compatible` refuses any mismatch with
a message saying what differs and how to rebuild.

Profiles: two per stage by default, so both ends are tuned: "latency" (opt at batch 1) and
"throughput" (opt at the largest batch). At run time `select_profile` picks the tightest profile
that contains a shape.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict

from ..checkpoint import file_sha256
from ..runtime.export_format import TENSORRT_INSTALL as INSTALL
from ..runtime.export_format import TRT_TO_NAME, EngineSidecar, ExportError, Profile, gpu_identity, write_sidecar
from .artifacts import ShapeRanges, io_spec

DEFAULT_WORKSPACE = 4 << 30  # bytes of scratch memory TensorRT may use while building and running


# ---- profiles ----------------------------------------------------------------------------------
def stage_profiles(config, ranges: ShapeRanges, stage: str) -> list[Profile]:
    """The default profiles of a stage: "latency" (opt = smallest batch) and "throughput" (opt = largest)."""
    spec = io_spec(config)[stage]
    b, t, v, n = ranges.batch, ranges.text_len, ranges.visual_tokens, ranges.images
    out = []
    for name, batch_opt, images_opt in (("latency", b.min, n.min), ("throughput", b.max, n.max)):
        sizes = {  # symbolic dim -> (min, opt, max)
            "num_images": (n.min, images_opt, n.max),
            "batch": (b.min, batch_opt, b.max),
            "text_len": (t.min, t.opt, t.max),
            "visual_len": (v.min, v.opt, v.max),
        }
        shapes = {}
        for tensor in spec["inputs"]:
            triple = [[], [], []]
            for dim in tensor["shape"]:
                for k in range(3):
                    triple[k].append(sizes[dim][k] if isinstance(dim, str) else int(dim))
            shapes[tensor["name"]] = triple
        out.append(Profile(name, shapes).validate())
    return out


def timing_cache_name(tensorrt_version: str, gpu_name: str, compute_capability: str) -> str:
    """File name of the timing cache valid for one TensorRT version on one GPU model.

    Tactic timings depend on both, so they are part of the key; the name is filesystem-safe.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    trt = re.sub(r"[^0-9.]+", "", tensorrt_version) or "unknown"
    sm = compute_capability.replace(".", "")
    return f"timing-trt{trt}-sm{sm}-{gpu}.cache"


# ---- environment --------------------------------------------------------------------------------
def availability() -> tuple[bool, str]:
    """(can build here?, reason when not): TensorRT importable, version 10+, a CUDA GPU visible to torch."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install raising at import
        return False, (f"the 'tensorrt' package is not importable ({exc.__class__.__name__}: {exc}); install "
                       f"{INSTALL} on a machine with an NVIDIA GPU")
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:  # the name-based I/O and strongly typed builds need 10 or newer
        return False, f"TensorRT {trt.__version__} is installed; the engines need TensorRT 10 or 11: install {INSTALL}"
    import torch

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU (TensorRT engines are built on, and for, the GPU that runs them)"
    return True, ""


# ---- building -----------------------------------------------------------------------------------
def network_flags(trt) -> int:
    """create_network's flags: strongly typed, so layer precisions come from the graph's own types and
    Casts (an fp32 graph gives an fp32 engine, the fp16 graph an fp16 engine with its fp32 islands).
    TensorRT 10 needs the STRONGLY_TYPED flag; 11 is always strongly typed and keeps the flag only
    for compatibility, so it is passed where it exists."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: str, engine_path: str, profiles: list[Profile], model_id: str, stage: str,
                 precision: str, timing_cache_dir: str, workspace_bytes: int = DEFAULT_WORKSPACE,
                 log=print) -> EngineSidecar:
    """Build one engine from one ONNX graph; writes engine_path, its sidecar and the timing cache."""
    import tensorrt as trt

    for p in profiles:
        p.validate()
    gpu_name, cc = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):  # by path: external weights beside the graph are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {os.path.basename(onnx_path)}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)  # on by default; fp32 parity (1e-4) needs real fp32 matmuls

    cache_name = timing_cache_name(trt.__version__, gpu_name, cc)
    cache_path = os.path.join(timing_cache_dir, cache_name)
    cache_bytes = open(cache_path, "rb").read() if os.path.exists(cache_path) else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(p)

    start = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {os.path.basename(onnx_path)} (see the TensorRT "
                          "log above); a larger workspace or narrower profiles may help")
    seconds = time.time() - start
    os.makedirs(os.path.dirname(engine_path), exist_ok=True)
    with open(engine_path, "wb") as fh:
        fh.write(memoryview(serialized))
    os.makedirs(timing_cache_dir, exist_ok=True)
    with open(cache_path, "wb") as fh:
        fh.write(memoryview(config.get_timing_cache().serialize()))

    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(memoryview(serialized)))
    io = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        kind = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
        dtype = TRT_TO_NAME.get(str(engine.get_tensor_dtype(name)).split(".")[-1], str(engine.get_tensor_dtype(name)))
        io[kind].append({"name": name, "dtype": dtype, "shape": list(engine.get_tensor_shape(name))})
    sidecar = EngineSidecar(
        stage=stage, precision=precision, tensorrt_version=trt.__version__, gpu_name=gpu_name,
        compute_capability=cc, model_id=model_id, onnx_file=os.path.basename(onnx_path),
        onnx_sha256=file_sha256(onnx_path), profiles=[asdict(p) for p in profiles], inputs=io["inputs"],
        outputs=io["outputs"], timing_cache=cache_name, build_seconds=round(seconds, 1),
    )
    write_sidecar(engine_path, sidecar)
    log(f"    built {os.path.basename(engine_path)} ({precision}, {len(profiles)} profiles) in {seconds:.0f} s")
    return sidecar
