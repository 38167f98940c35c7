"""TensorRT backend: the engines of an export directory (`tensorrt/vision.plan`, `tensorrt/fusion.plan`).

TensorRT 10 and 11 (the same name-based API in both): for each call the tightest optimisation
profile is selected for the input shapes, inputs are bound with set_input_shape /
set_tensor_address, outputs are allocated from the shapes the context reports, and
execute_async_v3 runs on a torch CUDA stream. All device
memory is torch tensors (no pycuda). Engines built for another checkpoint, GPU or TensorRT
version are refused when loading (see `export_format.check_compatible`).
"""
from __future__ import annotations

import os

import torch

from ..errors import ConfigError, require
from ..preprocess import Preprocessor
from .base import Backend, nonempty_visual
from .export_format import (TENSORRT_INSTALL, TRT_TO_NAME, ExportError, check_compatible, embed_dim, gpu_identity,
                            load_export_config, read_manifest, read_sidecar, select_profile)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
                "bool": torch.bool, "int8": torch.int8, "bfloat16": torch.bfloat16}


class _Engine:
    """One deserialized engine, its execution context and profiles."""

    def __init__(self, trt, runtime, path: str, sidecar, device: torch.device):
        with open(path, "rb") as fh:
            self.engine = runtime.deserialize_cuda_engine(fh.read())
        if self.engine is None:
            raise ConfigError(f"TensorRT could not deserialize {path!r} (see the TensorRT log); rebuild it with "
                              "`mimic-engine export`")
        self.context = self.engine.create_execution_context()
        self.profiles = sidecar.profile_objects()
        self.device = device
        self.active_profile = None
        self.inputs, self.outputs, self.dtypes = [], [], {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            key = str(self.engine.get_tensor_dtype(name)).split(".")[-1]  # "DataType.HALF" -> "HALF"
            self.dtypes[name] = TORCH_DTYPES[TRT_TO_NAME[key]]

    def run(self, feeds: dict, stream: torch.cuda.Stream) -> dict:
        shapes = {name: tuple(t.shape) for name, t in feeds.items()}
        index = select_profile(self.profiles, shapes)
        if index != self.active_profile:
            self.context.set_optimization_profile_async(index, stream.cuda_stream)
            self.active_profile = index
        keep = []  # device tensors must outlive the asynchronous run
        for name in self.inputs:
            t = feeds[name].to(self.device, self.dtypes[name], non_blocking=True).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs copied on the current stream
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for shapes {shapes}")
        stream.synchronize()
        del keep
        return outputs


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, export_dir: str, device: str = "cuda", allow_incomplete: bool = False):
        """`allow_incomplete` is for the exporter's parity step, which runs before the manifest is final."""
        trt = require("tensorrt", TENSORRT_INSTALL, "the TensorRT backend")
        if not torch.cuda.is_available():
            raise ConfigError("the TensorRT backend needs a CUDA GPU and torch sees none")
        manifest = read_manifest(export_dir, require_complete=not allow_incomplete)
        if not manifest.tensorrt:
            why = [s["reason"] for s in manifest.skipped if s.get("step") == "tensorrt"]
            raise ExportError(f"{export_dir!r} holds no TensorRT engines" + (f" ({why[0]})" if why else "") +
                              "; re-run `mimic-engine export` on a machine with TensorRT and a GPU")
        self.device = torch.device(device)
        gpu_name, cc = gpu_identity(self.device.index or 0)
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines = {}
        for stage, file in manifest.tensorrt["engines"].items():
            path = os.path.join(export_dir, file)
            sidecar = read_sidecar(path)
            check_compatible(sidecar, manifest.model_id, trt.__version__, gpu_name, cc, path)
            self.engines[stage] = _Engine(trt, runtime, path, sidecar, self.device)
        self.stream = torch.cuda.Stream(self.device)
        self.export_dir = export_dir
        config, tokenizer = load_export_config(export_dir)
        super().__init__(Preprocessor(config, tokenizer), manifest.model_id, embed_dim(config),
                         legacy_model_ids=(manifest.source.get("file_sha256"),))

    def run_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.engines["vision"].run({"pixel_values": pixel_values}, self.stream)
        return out["visual_tokens"].float()  # (N, P, H) on the GPU

    def run_fusion(self, input_ids, attention_mask, visual_tokens, visual_mask) -> torch.Tensor:
        visual_tokens, visual_mask = nonempty_visual(visual_tokens, visual_mask)  # profiles start at V=1
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "visual_tokens": visual_tokens,
                 "visual_mask": visual_mask}
        return self.engines["fusion"].run(feeds, self.stream)["embeddings"].float()  # (B, E)

    def capabilities(self) -> dict:
        return {**super().capabilities(), "device": str(self.device), "export_dir": self.export_dir}
