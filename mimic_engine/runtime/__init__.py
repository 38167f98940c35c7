"""Inference backends behind one interface (`base.Backend`) and the factory that picks one.

    backend = load_backend("auto", "runs/small/ckpt.pt")       # or an export directory
    vectors = backend.encode([Item(text="a red bus")], role="query")   # (N, E) float32

Backends and what they need:

    torch, torch-fp16        a ckpt.pt (or an export dir, whose manifest names its ckpt.pt); CPU or CUDA
    torch-bf16               the same; CPU autocast to bf16 on a CPU with native bf16 (AMX / AVX-512 BF16)
    onnx, onnx-optimized,    an export dir (`mimic-engine export`); onnxruntime
      onnx-int8
    openvino, openvino-bf16, an export dir; openvino; fp32, bf16 (native bf16 CPUs only) and int8
      openvino-int8            (the export's int8 graphs), each precision set explicitly
    tensorrt                 an export dir with a TensorRT engine; TensorRT 10 or 11 + a CUDA GPU
    torch-cuda               a ckpt.pt; the project's CUDA-graph backend on a CUDA GPU

Optional packages are imported only by the backend that needs them, so a missing onnxruntime
affects the onnx backends and nothing else. `auto` orders the candidates by the machine
(`auto_candidates`): on the CPU by its flags (`cpu_features`), the installed packages and the
export's variants.
"""
from __future__ import annotations

import importlib.util
import logging
import os

from ..device import resolve_device
from ..errors import CheckpointError, ConfigError
from .base import Backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "torch-fp16", "torch-bf16", "onnx", "onnx-optimized", "onnx-int8", "openvino",
            "openvino-bf16", "openvino-int8", "tensorrt", "torch-cuda")
TORCH_DTYPES = {"torch": "fp32", "torch-fp16": "fp16", "torch-bf16": "bf16"}
ONNX_VARIANTS = {"onnx": "fp32", "onnx-optimized": "optimized", "onnx-int8": "int8"}
OPENVINO_PRECISIONS = {"openvino": "fp32", "openvino-bf16": "bf16", "openvino-int8": "int8"}


def load_backend(name: str, model: str, device: str = "cpu", threads: int | None = None, **kw) -> Backend:
    """Build backend `name` for `model` (a ckpt.pt or an export directory) on `device`.

    `device` is "cpu", "cuda", "cuda:N" or "auto" (CUDA when torch sees a GPU). `threads` sets the
    CPU threads per operator (torch.set_num_threads for the PyTorch backends, which is process-wide;
    ONNX Runtime's intra-op threads, OpenVINO's inference threads); None keeps the libraries' defaults. Extra keyword arguments
    go to the backend's constructor (e.g. `providers=` for ONNX Runtime). "auto" tries the fastest
    candidates for this model and hardware in order and logs why it chose one.
    """
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads!r} must be a positive integer (or None for the default)")
        import torch

        torch.set_num_threads(threads)
    if name not in BACKENDS:
        raise ConfigError(f"backend {name!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if not os.path.exists(model):
        raise CheckpointError(f"model {model!r} does not exist; pass a ckpt.pt written by training or a directory "
                              "written by `mimic-engine export`")
    device = resolve_device(device)
    if name != "auto":
        return _build(name, model, device, threads, **kw)

    errors = []
    for candidate, why in auto_candidates(model, device):
        try:
            backend = _build(candidate, model, device, threads, **kw)
        except Exception as exc:  # a candidate that cannot load is skipped, with its reason logged
            errors.append(f"{candidate}: {exc.__class__.__name__}: {exc}")
            log.info("backend auto: skipping %s (%s: %s)", candidate, exc.__class__.__name__, exc)
            continue
        backend.selection_reason = why
        log.info("backend auto: chose %s because %s", candidate, why)
        return backend
    raise ConfigError(f"no backend could load {model!r} on {device}: " + "; ".join(errors))


def auto_candidates(model: str, device: str) -> list[tuple[str, str]]:
    """(backend, reason) in order of preference for this model and hardware."""
    is_export = os.path.isdir(model)
    if device.startswith("cuda"):
        order = []
        if is_export:
            order.append(("tensorrt", "a CUDA GPU and an export directory: TensorRT is the fastest when installed"))
        if find_checkpoint(model, required=False):
            order.append(("torch-cuda", "a CUDA GPU: CUDA graphs remove the per-kernel launch cost of eager PyTorch"))
        if is_export and _onnx_has_cuda():
            order.append(("onnx", "ONNX Runtime with its CUDA provider"))
        order.append(("torch", "eager PyTorch on the GPU is always available"))
        return order
    from .cpu_features import cpu_info

    variants = set()
    if is_export:
        from .export_format import VARIANTS, ExportError, read_manifest

        try:
            variants = set(read_manifest(model).variants)
        except ExportError:  # the candidates' own loading says what is wrong with the folder
            variants = set(VARIANTS)
    return cpu_candidates(cpu_info(), variants,
                          installed={p for p in ("openvino", "onnxruntime") if importlib.util.find_spec(p)})


def cpu_candidates(cpu, variants: set, installed: set) -> list[tuple[str, str]]:
    """(backend, reason) on a CPU, best first: `cpu` a cpu_features.CpuInfo, `variants` the export's
    graph variants (empty for a bare checkpoint), `installed` the runtimes among openvino/onnxruntime.

    OpenVINO bf16 on a CPU that computes bf16 natively is the fastest there and costs no Recall@10 on
    the demo (min cosine against fp32: 0.99996 with the ViT tower, 0.991 with EfficientNet-Lite0's 16
    convolution blocks; docs/results.md has the table); elsewhere, and without OpenVINO, the fp32
    graphs. PyTorch bf16 autocast (`torch-bf16`) is not chosen: measured on an AMX Xeon it was no
    faster than eager fp32 for single items (0.93x at batch 1, 0.68x at batch 8, 1.18x at 64). The
    int8 backends are lossy (min cosine about 0.98) and are never chosen by `auto`: name them to use them.
    """
    order = []
    fp32_graphs = "fp32" in variants
    if cpu.native_bf16 and fp32_graphs and "openvino" in installed:
        order.append(("openvino-bf16", f"{cpu.describe()} computes bf16 natively: OpenVINO bf16 (AMX/AVX-512 BF16 "
                                       "kernels) is the fastest CPU backend there"))
    if "onnxruntime" in installed:
        if "optimized" in variants:
            order.append(("onnx-optimized", "CPU with an export directory: ONNX Runtime with fused graphs"))
        if fp32_graphs:
            order.append(("onnx", "CPU with an export directory: ONNX Runtime beats eager PyTorch"))
    if fp32_graphs and "openvino" in installed:
        order.append(("openvino", "CPU with an export directory: OpenVINO fp32"))
    why = "eager PyTorch as the fallback" if variants else "a checkpoint (export it for the graph runtimes)"
    order.append(("torch", f"{why}; eager PyTorch fp32 on the CPU"))  # its loading says when there is no ckpt.pt
    return order


def find_checkpoint(model: str, required: bool = True) -> str | None:
    """The ckpt.pt behind `model`: the file itself, or the checkpoint an export directory's manifest
    names as its source (`export_format.source_checkpoint`)."""
    from .export_format import ExportError, source_checkpoint

    if os.path.isfile(model):
        return model
    try:
        found = source_checkpoint(model)
        why = "its manifest's source checkpoint is no longer there"
    except ExportError as exc:  # not an export directory (or a broken one)
        found, why = None, str(exc)
    if found is None and required:
        raise CheckpointError(f"{model!r} leads to no ckpt.pt ({why}); the PyTorch backends need the training "
                              "checkpoint: pass the ckpt.pt itself")
    return found


def _onnx_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _build(name: str, model: str, device: str, threads: int | None = None, **kw) -> Backend:
    if name in TORCH_DTYPES:
        from .torch_backend import TorchBackend

        return TorchBackend.from_checkpoint(find_checkpoint(model), device, TORCH_DTYPES[name])
    if name in ONNX_VARIANTS or name in OPENVINO_PRECISIONS:
        if not os.path.isdir(model):
            raise ConfigError(f"backend {name!r} needs an export directory, but {model!r} is a file; run "
                              f"`mimic-engine export {model} --out DIR` and pass DIR")
    if name in OPENVINO_PRECISIONS:
        if device != "cpu":
            raise ConfigError(f"backend {name!r} runs on the CPU; pass device='cpu' (got {device!r})")
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(model, precision=OPENVINO_PRECISIONS[name], threads=threads, **kw)
    if name in ONNX_VARIANTS:
        from .onnx_backend import OnnxBackend

        if "providers" not in kw and device.startswith("cuda") and _onnx_has_cuda():
            kw["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return OnnxBackend(model, variant=ONNX_VARIANTS[name], threads=threads, **kw)
    if name == "tensorrt":
        if not os.path.isdir(model):
            raise ConfigError(f"backend 'tensorrt' needs an export directory with an engine, but {model!r} is a file")
        _need_cuda(name, device)
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(model, device=device, **kw)
    if name == "torch-cuda":
        _need_cuda(name, device)
        from .cuda_backend import CudaGraphBackend

        return CudaGraphBackend.from_checkpoint(find_checkpoint(model), device=device, **kw)
    raise AssertionError(name)  # unreachable: names are checked by load_backend


def _need_cuda(name: str, device: str) -> None:
    if not device.startswith("cuda"):
        raise ConfigError(f"backend {name!r} runs on a CUDA GPU; pass device='cuda' (got {device!r})")


__all__ = ["BACKENDS", "Backend", "auto_candidates", "cpu_candidates", "find_checkpoint", "load_backend",
           "resolve_device"]
