"""fp16 variant of an fp32 graph for GPUs, with the parts that overflow or lose meaning in fp16
kept in fp32 by explicit Cast nodes (so a strongly typed TensorRT network, or ONNX Runtime's CUDA
provider, runs exactly the precision the graph says).

Kept in fp32 (T5 in fp16 overflows in the FFN output and the RMS norm):
- every norm: T5's RMS norm (`layer_norm`, `final_layer_norm`), BERT's and CLIP's LayerNorm;
- every FFN output projection: T5 `DenseReluDense/wo`, BERT `layer.N/output/dense`, CLIP `mlp/fc2`;
- Softmax and the Add/Where that feeds it (scores + mask): a mask built from the fp32 minimum
  would become -inf in fp16 and a fully padded row NaN; constants are clamped to +-65504;
- mask and position arithmetic (T5's relative-position buckets use Log/Div and truncation): any
  float node not reached from the activations, found by data flow, not by name;
- the stage's own glue (concat, early fusion's packing, the head and the final L2 normalisation).
Graph inputs and outputs stay float32, so callers feed the same arrays as to the fp32 graph.
"""
from __future__ import annotations

import re

# node-name scopes (the TorchScript exporter names nodes after module paths: /stage/text/.../wo/MatMul)
FFN_OUTPUT = r"/DenseReluDense/wo/|/layer\.\d+/output/dense/|/mlp/fc2/"  # T5, BERT, CLIP
FP32_SCOPES = re.compile(
    r"/(layer_norm|final_layer_norm|LayerNorm|layer_norm1|layer_norm2|pre_layrnorm|post_layernorm)/"
    r"|" + FFN_OUTPUT + r"|^/stage/head/"
)
FP32_OPS = {"Softmax", "Log", "ReduceL2", "LayerNormalization", "CumSum", "Range", "Min", "Max", "TopK"}
_FLOAT = 1  # onnx.TensorProto.FLOAT


def fp32_nodes(graph) -> list[str]:
    """Names of the nodes to keep in fp32 (see the module docstring)."""
    import onnx

    nodes = graph.graph.node
    initializers = {t.name: t for t in graph.graph.initializer}
    float_inputs = {i.name for i in graph.graph.input if i.type.tensor_type.elem_type == _FLOAT}

    # Data flow: "activation" tensors descend from float graph inputs or from an embedding lookup
    # (Gather of a float weight). Float nodes outside that set compute masks and positions.
    active = set(float_inputs)
    for node in nodes:  # the exporter writes nodes in topological order
        from_table = node.op_type == "Gather" and node.input[0] in initializers and \
            initializers[node.input[0]].data_type == onnx.TensorProto.FLOAT
        if from_table or any(i in active for i in node.input):
            active.update(node.output)

    producer = {o: n for n in nodes for o in n.output}
    keep = set()
    for node in nodes:
        scope = node.name.rsplit("/", 1)[0]
        if node.op_type in FP32_OPS or FP32_SCOPES.search(node.name) or scope == "/stage":
            keep.add(node.name)
        elif not any(o in active for o in node.output):
            keep.add(node.name)  # mask / position arithmetic (and integer ops, which fp16 ignores)
        if node.op_type == "Softmax":  # the scores + mask sum feeding it
            src = producer.get(node.input[0])
            while src is not None and src.op_type in ("Add", "Where", "Cast"):
                keep.add(src.name)
                src = producer.get(src.input[0]) if src.op_type != "Where" else producer.get(src.input[2])
    return sorted(keep)


def convert_to_fp16(graph):
    """fp32 ModelProto -> fp16 ModelProto (fp32 islands as above, float32 inputs/outputs)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from onnxruntime.transformers.onnx_model import OnnxModel

    keep = fp32_nodes(graph)
    half = convert_float_to_float16(
        graph, keep_io_types=True, op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | FP32_OPS),
        node_block_list=keep, max_finite_val=65504.0,
    )
    OnnxModel(half).topological_sort()  # the converter appends its Cast nodes at the end
    return half
