"""PyTorch -> ONNX for the two stages, as separate graphs with dynamic axes.

    vision.onnx  pixel_values (N, 3, S, S) float32 -> visual_tokens (N, P, H) float32
    fusion.onnx  input_ids (B, T) int64, attention_mask (B, T) int64,
                 visual_tokens (B, V, H) float32, visual_mask (B, V) int64 -> embeddings (B, E) float32

Exporter: the TorchScript-based one, chosen explicitly (`dynamo=False`). The dynamo exporter (the
default since torch 2.9) fails on HF T5 with a dynamic sequence length. Tracing records one path
through the Python code, so the trace inputs are chosen to take the general path:
- batch and lengths >= 2 (a size-1 dimension can be specialised away);
- masks WITH padding, a text-less row and an image-less row: transformers skips building the
  attention mask when it is all ones, and a trace with all-ones masks would bake that shortcut in
  (every padded input would then be wrong).
The wrapper modules are put in eval mode before export: the exporter restores the wrapper's own
training flag afterwards, recursively, and a fresh nn.Module is in training mode, which would
silently switch dropout on in the caller's model.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch
from torch import nn

from ..runtime.export_format import METADATA_PREFIX, ExportError
from .artifacts import io_spec

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on
MIN_OPSET = 14  # scaled_dot_product_attention has no TorchScript symbolic below 14
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot serialise 2 GiB; stay clear of it


class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.stage = model.vision_stage

    def forward(self, pixel_values):
        return self.stage(pixel_values)  # (N, P, H)


class FusionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.stage = model.fusion_stage

    def forward(self, input_ids, attention_mask, visual_tokens, visual_mask):
        return self.stage(input_ids, attention_mask, visual_tokens, visual_mask)  # (B, E)


DYNAMIC_AXES = {
    "vision": {"pixel_values": {0: "num_images"}, "visual_tokens": {0: "num_images"}},
    "fusion": {
        "input_ids": {0: "batch", 1: "text_len"},
        "attention_mask": {0: "batch", 1: "text_len"},
        "visual_tokens": {0: "batch", 1: "visual_len"},
        "visual_mask": {0: "batch", 1: "visual_len"},
        "embeddings": {0: "batch"},
    },
}


def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) opset this installation can write with the TorchScript exporter."""
    import onnx
    from torch.onnx import _constants

    highest = min(onnx.defs.onnx_opset_version(),
                  getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))
    return MIN_OPSET, highest


def check_opset(opset: int) -> int:
    lo, hi = supported_opsets()
    if not isinstance(opset, int) or not lo <= opset <= hi:
        import onnx

        raise ExportError(f"opset {opset!r} cannot be written here: the installed onnx {onnx.__version__} and torch "
                          f"{torch.__version__} (TorchScript exporter) support opsets {lo}..{hi}; pass --opset "
                          f"between them (default {DEFAULT_OPSET})")
    return opset


def trace_inputs(model, stage: str, seed: int = 0) -> tuple:
    """Inputs that take the general path (see the module docstring). Never the shapes parity checks."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if stage == "vision":
        s = cfg.vision.image_size
        return (torch.randn(3, 3, s, s, generator=g),)
    b, t, p, h = 3, 5, cfg.visual_tokens_per_image, model.hidden_size
    vocab = int(cfg.text.hf_config.get("vocab_size", 1000))
    input_ids = torch.randint(1, min(vocab, 1000), (b, t), generator=g)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])  # full, padded, no text
    visual_tokens = torch.randn(b, 2 * p, h, generator=g)
    visual_mask = torch.zeros(b, 2 * p, dtype=torch.long)
    visual_mask[0, :] = 1  # two images
    visual_mask[2, :p] = 1  # one image (and padding); row 1 has no image
    return input_ids, attention_mask, visual_tokens, visual_mask


def export_graph(model, stage: str, path: str, opset: int, metadata: dict,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict:
    """Export one stage to `path`, attach metadata, check it. -> {"external_data": bool, "bytes": int}.

    Weights go to `<file>.data` beside the graph when they exceed `external_data_bytes`.
    """
    import onnx

    check_opset(opset)
    spec = io_spec(model.config)[stage]
    wrapper = (VisionGraph if stage == "vision" else FusionGraph)(model).eval()
    was_training = model.training
    model.eval()
    scratch = os.path.join(os.path.dirname(path), f".scratch-{stage}")
    os.makedirs(scratch, exist_ok=True)
    try:
        raw = os.path.join(scratch, os.path.basename(path))
        with torch.no_grad(), warnings.catch_warnings():
            # Shape-dependent Python branches are traced once; parity checks unseen shapes instead.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            # transformers' mask indexing; its indices are never negative (parity covers it)
            warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
            torch.onnx.export(
                wrapper, trace_inputs(model, stage), raw, dynamo=False, opset_version=opset,
                input_names=[t["name"] for t in spec["inputs"]], output_names=[t["name"] for t in spec["outputs"]],
                dynamic_axes=DYNAMIC_AXES[stage], do_constant_folding=True,
            )
        graph = onnx.load(raw)  # loads external tensors the exporter may have written beside it
        _declare_shapes(graph, spec)
        set_metadata(graph, {**metadata, "stage": stage, "io": spec})
        info = save_graph(graph, path, external_data_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        model.train(was_training)
    return info


def _declare_shapes(graph, spec: dict) -> None:
    """Write the contract's dims into the graph's inputs/outputs: the tracer leaves some static
    dims symbolic (P after the CLS slice), and Triton and TensorRT read these declarations."""
    declared = {t["name"]: t["shape"] for t in spec["inputs"] + spec["outputs"]}
    for value in list(graph.graph.input) + list(graph.graph.output):
        dims = value.type.tensor_type.shape.dim
        for d, want in zip(dims, declared[value.name]):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want


def set_metadata(graph, values: dict) -> None:
    """metadata_props[mimic_engine.<key>] = value (dicts/lists as JSON), replacing older values."""
    keep = [(p.key, p.value) for p in graph.metadata_props
            if not (p.key.startswith(METADATA_PREFIX) and p.key[len(METADATA_PREFIX):] in values)]
    del graph.metadata_props[:]
    for key, value in keep:
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    for key, value in values.items():
        entry = graph.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)  # dict, list, number


def read_metadata(path_or_graph) -> dict:
    """{key: value} of the mimic_engine.* metadata of a graph (JSON values decoded)."""
    import onnx

    graph = onnx.load(path_or_graph, load_external_data=False) if isinstance(path_or_graph, str) else path_or_graph
    out = {}
    for p in graph.metadata_props:
        if p.key.startswith(METADATA_PREFIX):
            structured = p.value[:1] in ("{", "[")  # dicts and lists were written as JSON, strings as-is
            out[p.key[len(METADATA_PREFIX):]] = json.loads(p.value) if structured else p.value
    return out


def weight_bytes(graph) -> int:
    total = 0
    for t in graph.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def save_graph(graph, path: str, external_data_bytes: int = EXTERNAL_DATA_BYTES, check: bool = True) -> dict:
    """Save (weights external when large) and run onnx.checker on the file. -> {"external_data", "bytes"}."""
    import onnx

    external = weight_bytes(graph) > external_data_bytes
    data_name = os.path.basename(path) + ".data"
    if os.path.exists(os.path.join(os.path.dirname(path), data_name)):
        os.remove(os.path.join(os.path.dirname(path), data_name))  # save_model appends to an existing file
    if external:
        onnx.save_model(graph, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(graph, path)
    try:
        if check:
            onnx.checker.check_model(path, full_check=False)  # by path: works for external data and > 2 GB
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {os.path.basename(path)}: {str(exc).splitlines()[0][:300]}") from exc
    size = os.path.getsize(path) + (os.path.getsize(os.path.join(os.path.dirname(path), data_name)) if external else 0)
    return {"external_data": external, "bytes": size}
