"""CPU fast path: an ONNX Runtime-optimised graph and a dynamically quantised int8 graph.

- optimized: `onnxruntime.transformers.optimizer` (the BERT fusions for the fusion stage, the CLIP
  ones for the vision stage: SkipLayerNormalization, Gelu/QuickGelu, FusedMatMul; constant
  folding), written once so a session loads a graph that is already fused. ONNX Runtime's
  attention fusion does not match the pattern transformers' SDPA attention exports (Softmax
  followed by an IsNaN/Where guard), so attention stays as MatMul/Softmax/MatMul.
- int8: `quantize_dynamic` (int8 weights, activations quantised per batch at run time) of the
  fp32 graph: weight MatMul/Gemm only (not the activation x activation products of attention),
  per-output-channel scales, and the FFN output projections left in fp32 (their inputs have the
  largest outliers; quantising them cost the most cosine on the small model: min cosine
  0.983 per-tensor, 0.997 per-channel, 0.998 per-channel with FFN outputs in fp32). Its parity
  is reported against fp32 PyTorch and its retrieval quality can be compared with
  `parity.retrieval_check`.
Both keep the fp32 graph's inputs, outputs and metadata.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile

from .onnx_export import EXTERNAL_DATA_BYTES, read_metadata, save_graph, set_metadata

OPTIMIZER_MODEL_TYPE = {"fusion": "bert", "vision": "clip"}


def write_optimized(src: str, dst: str, stage: str, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict:
    """src fp32 graph -> dst ONNX Runtime-fused graph (CPU). -> save_graph's info."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size 0: read from the graph where a fusion needs them
    optimized = optimize_model(src, model_type=OPTIMIZER_MODEL_TYPE[stage], num_heads=0, hidden_size=0,
                               opt_level=1, use_gpu=False)
    graph = optimized.model
    if not isinstance(graph, onnx.ModelProto):
        raise TypeError(f"onnxruntime optimizer returned {type(graph).__name__}")
    set_metadata(graph, {**read_metadata(src), "variant": "optimized"})
    # ONNX Runtime's own ops (SimplifiedLayerNormalization, com.microsoft.*) are unknown to
    # onnx.checker; the parity step loads and runs the graph in ONNX Runtime instead.
    return save_graph(graph, dst, external_data_bytes, check=False)


def write_int8(src: str, dst: str, stage: str, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict:
    """src fp32 graph -> dst with dynamically quantised int8 MatMul/Gemm weights."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .fp16 import FFN_OUTPUT

    keep_fp32 = [n.name for n in onnx.load(src, load_external_data=False).graph.node if re.search(FFN_OUTPUT, n.name)]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dst)) as tmp:
        raw = os.path.join(tmp, os.path.basename(dst))
        large = os.path.exists(src + ".data")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # it logs a generic "consider pre-processing" warning per call
        try:
            quantize_dynamic(src, raw, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep_fp32,
                             op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            logging.disable(previous)
        graph = onnx.load(raw)
    set_metadata(graph, {**read_metadata(src), "variant": "int8"})
    return save_graph(graph, dst, external_data_bytes)


def write_fp16(src: str, dst: str, stage: str, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict:
    """src fp32 graph -> dst fp16 graph with fp32 islands (see fp16.py)."""
    import onnx

    from .fp16 import convert_to_fp16

    graph = convert_to_fp16(onnx.load(src))
    set_metadata(graph, {**read_metadata(src), "variant": "fp16"})
    return save_graph(graph, dst, external_data_bytes)


# variant -> writer(src, dst, stage, external_data_bytes)
WRITERS = {"optimized": write_optimized, "int8": write_int8, "fp16": write_fp16}
