"""OpenVINO backend: the ONNX graphs of an export directory compiled by OpenVINO's CPU plugin.

    backend = OpenVinoBackend("runs/small/export", precision="bf16")
    vectors = backend.encode(items)            # (N, E) float32 unit vectors

Precisions, each set explicitly (`INFERENCE_PRECISION_HINT`): OpenVINO's CPU plugin *defaults* to
bf16 on CPUs with AMX or AVX-512 BF16, so an unset hint would make the "fp32" backend a bf16 one.

    fp32   (`openvino`)        the fp32 graphs, hint f32: the reference, equal to ONNX Runtime fp32
    bf16   (`openvino-bf16`)   the fp32 graphs, hint bf16: matmuls and convolutions on AMX / AVX-512
                               BF16, OpenVINO keeps its normalisations and softmax in fp32; refused on
                               CPUs without native bf16 (`cpu_features`), where it would be emulated
    int8   (`openvino-int8`)   the export's int8 graphs (dynamically quantised weights), hint f32 for
                               what is not quantised: int8 dot products on VNNI / AMX-INT8

Compiled models are cached on disk (OpenVINO's CACHE_DIR, default `default_cache_dir()`), in one
folder per precision and thread count, where OpenVINO keys them by graph and device; a restarted
server loads the compiled blob instead of compiling again.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import ConfigError, choice, require
from ..preprocess import Preprocessor
from .base import Backend, as_numpy, nonempty_visual
from .cpu_features import require_native_bf16
from .export_format import (check_graph_model_id, embed_dim, graph_model_id, load_export_config, read_manifest,
                            variant_graphs)

INSTALL = "pip install 'mimic-engine[openvino]'  (or: pip install openvino)"
PRECISIONS = ("fp32", "bf16", "int8")
GRAPH_VARIANT = {"fp32": "fp32", "bf16": "fp32", "int8": "int8"}  # precision -> the export's graphs
HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INFERENCE_PRECISION_HINT
NAMES = {"fp32": "openvino", "bf16": "openvino-bf16", "int8": "openvino-int8"}


def default_cache_dir() -> str:
    """Where compiled models are kept: $MIMIC_HOME/openvino-cache (default ~/.cache/mimic-engine/openvino-cache)."""
    from ..data import default_home

    return str(default_home() / "openvino-cache")


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, export_dir: str, precision: str = "fp32", threads: int | None = None,
                 cache_dir: str | None = None, allow_incomplete: bool = False):
        """`threads`: OpenVINO's inference threads (default: its own choice, all cores). `cache_dir`: the
        compiled-model cache (default `default_cache_dir()`; "" turns caching off)."""
        ov = require("openvino", INSTALL, "the OpenVINO backend")
        choice("precision", precision, PRECISIONS)
        if precision == "bf16":
            require_native_bf16(NAMES[precision])
        manifest = read_manifest(export_dir, require_complete=not allow_incomplete)
        files = variant_graphs(export_dir, manifest, GRAPH_VARIANT[precision])
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads={threads!r} must be a positive integer (or None for OpenVINO's default)")
        self.cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        settings = {"INFERENCE_PRECISION_HINT": HINT[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            settings["INFERENCE_NUM_THREADS"] = threads
        if self.cache_dir:
            # one folder per setting: OpenVINO 2026.4's cache key leaves out the precision hint, so an f32
            # blob was loaded for a bf16 compile (and gave NaN); tests/test_cpu_backends.py checks this
            folder = os.path.join(self.cache_dir, f"{HINT[precision]}-threads{threads or 'default'}")
            os.makedirs(folder, exist_ok=True)
            settings["CACHE_DIR"] = folder

        core = ov.Core()
        self.export_dir = export_dir
        self.precision = precision
        self.manifest = manifest
        self.requests, self.outputs = {}, {}
        for stage, file in files.items():
            graph = core.read_model(os.path.join(export_dir, file))
            check_graph_model_id(_model_id(graph), manifest, file, export_dir)
            compiled = core.compile_model(graph, "CPU", settings)
            got = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type
            if got != getattr(ov.Type, HINT[precision]):
                raise ConfigError(f"OpenVINO compiled {file} with inference precision {got}, not the "
                                  f"{HINT[precision]} that was asked for; this OpenVINO ignores the hint")
            self.requests[stage] = compiled.create_infer_request()
            self.outputs[stage] = compiled.outputs[0]
        self.settings = settings
        config, tokenizer = load_export_config(export_dir)
        super().__init__(Preprocessor(config, tokenizer), manifest.model_id, embed_dim(config),
                         legacy_model_ids=(manifest.source.get("file_sha256"),))
        self.name = NAMES[precision]

    def _run(self, stage: str, feed: dict) -> torch.Tensor:
        request = self.requests[stage]
        request.infer(feed)
        # copy: the request owns its output buffer and overwrites it on the next call
        return torch.from_numpy(np.array(request.get_tensor(self.outputs[stage]).data, copy=True))

    def run_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._run("vision", {"pixel_values": as_numpy(pixel_values, np.float32)})  # (N, P, H)

    def run_fusion(self, input_ids, attention_mask, visual_tokens, visual_mask) -> torch.Tensor:
        visual_tokens, visual_mask = nonempty_visual(visual_tokens, visual_mask)
        return self._run("fusion", {  # (B, E)
            "input_ids": as_numpy(input_ids, np.int64), "attention_mask": as_numpy(attention_mask, np.int64),
            "visual_tokens": as_numpy(visual_tokens, np.float32), "visual_mask": as_numpy(visual_mask, np.int64)})

    def capabilities(self) -> dict:
        return {**super().capabilities(), "precision": self.precision, "export_dir": self.export_dir,
                "inference_precision_hint": self.settings["INFERENCE_PRECISION_HINT"], "cache_dir": self.cache_dir}


def _model_id(graph) -> str | None:
    """The model id of a graph read by OpenVINO, which keeps the ONNX metadata_props in rt_info["framework"]."""
    rt = graph.get_rt_info()
    framework = rt["framework"] if "framework" in rt else {}
    return graph_model_id({key: value.astype(str) for key, value in framework.items()})
