"""ONNX Runtime backend: the two exported graphs of an export directory, no checkpoint needed.

    backend = OnnxBackend("runs/small/export", variant="optimized")
    vectors = backend.encode(items)            # (N, E) float32 unit vectors

Variants (files written by `mimic-engine export`): "fp32" (reference), "optimized" (ONNX
Runtime's transformer fusions, CPU), "int8" (dynamic int8 weights, CPU), "fp16" (fp16 with fp32
norms/softmax/FFN output; for GPUs through the CUDA provider of onnxruntime-gpu).

A batch without images is given one zero visual token per item with visual_mask 0
(`base.nonempty_visual`).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import MissingDependencyError, choice, require
from ..preprocess import Preprocessor
from .base import Backend, as_numpy, nonempty_visual
from .export_format import (VARIANTS, check_graph_model_id, embed_dim, graph_model_id, load_export_config, read_manifest,
                            variant_graphs)

INSTALL = "pip install 'mimic-engine[export]'  (or: pip install onnxruntime)"
GPU_INSTALL = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, export_dir: str, providers: list | None = None, variant: str = "fp32",
                 threads: int | None = None, spin: bool = True, allow_incomplete: bool = False):
        """`threads`: ONNX Runtime intra-op threads (default: its own choice). `spin=False` stops idle
        worker threads from busy-waiting after a run (fair benchmarks next to other work on few
        cores; spinning lowers latency when ONNX Runtime has the cores to itself).
        `allow_incomplete` is for the exporter's own parity step, which runs before the manifest is final."""
        ort = require("onnxruntime", INSTALL, "the ONNX Runtime backend")
        choice("variant", variant, VARIANTS)
        manifest = read_manifest(export_dir, require_complete=not allow_incomplete)
        files = variant_graphs(export_dir, manifest, variant)
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            hint = f"; for CUDA install onnxruntime-gpu: {GPU_INSTALL}" if "CUDAExecutionProvider" in missing else ""
            raise MissingDependencyError(f"ONNX Runtime providers {missing} are not available here (available: "
                                         f"{ort.get_available_providers()}){hint}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: ORT warns about every fp32 node placed on CPU

        self.export_dir = export_dir
        self.variant = variant
        self.manifest = manifest
        self.sessions = {}
        for stage, file in files.items():
            session = ort.InferenceSession(os.path.join(export_dir, file), options, providers=providers)
            check_graph_model_id(graph_model_id(session.get_modelmeta().custom_metadata_map), manifest, file, export_dir)
            self.sessions[stage] = session
        self.providers = self.sessions["fusion"].get_providers()
        config, tokenizer = load_export_config(export_dir)
        super().__init__(Preprocessor(config, tokenizer), manifest.model_id, embed_dim(config),
                         legacy_model_ids=(manifest.source.get("file_sha256"),))
        self.name = "onnx" if variant == "fp32" else f"onnx-{variant}"

    def run_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feed = {"pixel_values": as_numpy(pixel_values, np.float32)}
        return torch.from_numpy(self.sessions["vision"].run(["visual_tokens"], feed)[0])  # (N, P, H)

    def run_fusion(self, input_ids, attention_mask, visual_tokens, visual_mask) -> torch.Tensor:
        visual_tokens, visual_mask = nonempty_visual(visual_tokens, visual_mask)
        feed = {
            "input_ids": as_numpy(input_ids, np.int64),
            "attention_mask": as_numpy(attention_mask, np.int64),
            "visual_tokens": as_numpy(visual_tokens, np.float32),
            "visual_mask": as_numpy(visual_mask, np.int64),
        }
        return torch.from_numpy(self.sessions["fusion"].run(["embeddings"], feed)[0])  # (B, E)

    def capabilities(self) -> dict:
        return {**super().capabilities(), "variant": self.variant, "providers": self.providers,
                "export_dir": self.export_dir}

