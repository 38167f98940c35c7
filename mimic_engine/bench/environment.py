"""Where a benchmark ran: recorded in every report, since numbers mean little without it.

CPU model and its vector-instruction flags (they decide ONNX Runtime's int8 and fp16 kernels),
usable cores and the 1-minute load average at the start (above the core count = a shared, noisy
machine), library versions, thread settings, and the GPU with its CUDA version.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = ("mimic-engine", "torch", "transformers", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino",
            "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "triton", "hnswlib")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict:
    """{"cpu", "cpu_vendor", "cpu_kind", "cpu_flags", "cpu_count", "cpus_usable", "load_average_1m", "platform", "python", "versions",
    "torch_threads", "torch_interop_threads", "thread_env", "device", "gpu", "cuda"?} for `device`."""
    import torch

    from ..runtime.cpu_features import cpu_info  # the runtime package imports torch

    cpu = cpu_info()
    env = {
        "cpu": cpu.model,
        "cpu_vendor": cpu.vendor,
        "cpu_kind": cpu.kind,  # cpu_features.CpuInfo.kind: the row group of the docs' result tables
        "cpu_flags": cpu.simd_flags,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "device": device,
        "gpu": None,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def describe(env: dict) -> str:
    """One line for a table's header: device, CPU, cores, load, GPU, torch threads."""
    return (f"device: {env['device']}  cpu: {env['cpu']} [{env.get('cpu_kind', '?')}] ({env['cpus_usable']} usable cores, "
            f"load {env['load_average_1m']})  gpu: {env['gpu'] or '-'}  torch threads {env['torch_threads']}")
