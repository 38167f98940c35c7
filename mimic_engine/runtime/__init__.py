"""Inference backends behind one interface (`base.Backend`) and the factory that picks one.

    backend = load_backend("auto", "runs/small/ckpt.pt")       # or an export directory
    vectors = backend.encode([Item(text="a red bus")], role="query")   # (N, E) float32

Backends and what they need:

    torch, torch-fp16        a ckpt.pt (or an export dir, whose manifest names its ckpt.pt); CPU or CUDA
    onnx, onnx-optimized,    an export dir (`mimic-engine export`); onnxruntime
      onnx-int8
    tensorrt                 an export dir with a TensorRT engine; tensorrt + a CUDA GPU
    torch-cuda               a ckpt.pt; the project's CUDA-graph backend on a CUDA GPU

Optional packages are imported only by the backend that needs them, so a missing onnxruntime
affects the onnx backends and nothing else.
"""
from __future__ import annotations

import logging
import os

from ..device import resolve_device
from ..errors import CheckpointError, ConfigError
from .base import Backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "torch-fp16", "onnx", "onnx-optimized", "onnx-int8", "tensorrt", "torch-cuda")
ONNX_VARIANTS = {"onnx": "fp32", "onnx-optimized": "optimized", "onnx-int8": "int8"}


def load_backend(name: str, model: str, device: str = "cpu", threads: int | None = None, **kw) -> Backend:
    """Build backend `name` for `model` (a ckpt.pt or an export directory) on `device`.

    `device` is "cpu", "cuda", "cuda:N" or "auto" (CUDA when torch sees a GPU). `threads` sets the
    CPU threads per operator (torch.set_num_threads for the PyTorch backends, which is process-wide;
    ONNX Runtime's intra-op threads); None keeps the libraries' defaults. Extra keyword arguments
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
    if is_export:
        return [("onnx-optimized", "CPU with an export directory: ONNX Runtime with fused graphs is fastest"),
                ("onnx", "CPU with an export directory: ONNX Runtime beats eager PyTorch"),
                ("torch", "eager PyTorch as the fallback")]
    return [("torch", f"{model!r} is a checkpoint (export it for ONNX Runtime); eager PyTorch on the CPU")]


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
    if name in ("torch", "torch-fp16"):
        from .torch_backend import TorchBackend

        return TorchBackend.from_checkpoint(find_checkpoint(model), device, "fp16" if name == "torch-fp16" else "fp32")
    if name in ONNX_VARIANTS:
        if not os.path.isdir(model):
            raise ConfigError(f"backend {name!r} needs an export directory, but {model!r} is a file; run "
                              f"`mimic-engine export {model} --out DIR` and pass DIR")
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


__all__ = ["BACKENDS", "Backend", "auto_candidates", "find_checkpoint", "load_backend", "resolve_device"]
