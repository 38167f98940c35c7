"""Parity cases, the fp16 graph's fp32 islands, and `retrieval_check` (Recall@10 of two backends)."""
import numpy as np
import pytest

from mimic_engine.checkpoint import save_checkpoint
from mimic_engine.config import preset

onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install 'mimic-engine[export]'")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'mimic-engine[export]'")

from mimic_engine.export.artifacts import Range, ShapeRanges  # noqa: E402
from mimic_engine.export.onnx_export import trace_inputs  # noqa: E402
from mimic_engine.export.parity import parity_cases, retrieval_check  # noqa: E402


def test_parity_cases_are_unseen_varied_and_inside_the_ranges():
    config = preset("tiny")
    ranges = ShapeRanges.defaults(config, batch=Range("batch", 1, 8, 40))
    cases = parity_cases(config, ranges)
    traced = trace_inputs(type("M", (), {"config": config, "hidden_size": 32})(), "fusion")[0].shape
    assert len(cases) >= 6
    sizes = {len(c.text_lens) for c in cases}
    assert {1, 7, 40} <= sizes and traced[0] not in sizes
    p = config.visual_tokens_per_image
    for c in cases:
        assert len(c.text_lens) == len(c.image_counts) <= ranges.batch.max
        assert max(c.text_lens) <= ranges.text_len.max and max(c.image_counts) * p <= ranges.visual_tokens.max
        assert all(t > 0 or n > 0 for t, n in zip(c.text_lens, c.image_counts)), "an item with neither"
    all_lens = [t for c in cases for t in c.text_lens]
    assert 1 in all_lens and ranges.text_len.max in all_lens and 0 in all_lens
    assert any(max(c.image_counts) == 0 for c in cases) and any(max(c.image_counts) >= 2 for c in cases)


def test_fp16_graph_keeps_norms_softmax_and_ffn_output_in_fp32(tmp_path, tiny_encoders):
    from mimic_engine.export.fp16 import convert_to_fp16, fp32_nodes
    from mimic_engine.export.onnx_export import export_graph

    model = tiny_encoders("decoder").model
    path = str(tmp_path / "fusion.onnx")
    export_graph(model, "fusion", path, 17, {"model_id": "x"})
    graph = onnx.load(path)
    keep = set(fp32_nodes(graph))
    names = [n.name for n in graph.graph.node]
    for pattern in ("/DenseReluDense/wo/MatMul", "/final_layer_norm/", "/LayerNorm/", "Softmax", "/stage/ReduceL2"):
        hits = [n for n in names if pattern in n]
        assert hits and all(n in keep for n in hits), pattern
    q_proj = [n for n in names if "/SelfAttention/q/MatMul" in n]
    assert q_proj and not any(n in keep for n in q_proj)  # the bulk of the matmuls does go fp16

    half = onnx.shape_inference.infer_shapes(convert_to_fp16(graph))
    types = {v.name: v.type.tensor_type.elem_type for v in list(half.graph.value_info) + list(half.graph.output)}
    nodes = {n.name: n for n in half.graph.node}
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for n in half.graph.node:
        if n.op_type == "Softmax":
            assert types[n.output[0]] == fp32, n.name
    assert types[nodes[q_proj[0]].output[0]] == fp16
    wo = [n for n in half.graph.node if n.name.endswith("/DenseReluDense/wo/MatMul")]
    assert wo and all(types[n.output[0]] == fp32 for n in wo)
    assert all(v.type.tensor_type.elem_type != fp16 for v in half.graph.output)


class _Noisy:
    """A backend whose vectors are a seeded random rotation away from the real ones (quality loss)."""

    name = "noisy"

    def __init__(self, inner, noise):
        self.inner, self.noise = inner, noise

    def encode(self, items, role="document", batch_size=64):
        v = self.inner.encode(items, role, batch_size)
        rng = np.random.default_rng(len(items))
        v = v + self.noise * rng.standard_normal(v.shape).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def demo_like_dataset():
    from mimic_engine.data.types import DictImageStore, Document, Query, RetrievalDataset
    from tests.conftest import make_image_bytes

    images = DictImageStore({f"i{k}": make_image_bytes(k) for k in range(6)})
    docs = [Document(f"t{k}", "text", text=f"passage number {k} about topic {k % 4}") for k in range(14)]
    docs += [Document(f"im{k}", "image", text=f"caption {k}", image_ids=[f"i{k}"]) for k in range(6)]
    queries = [Query(f"q{k}", f"topic {k % 4} passage {k}", positives=[f"t{k}"]) for k in range(8)]
    queries += [Query(f"qi{k}", f"caption {k}", positives=[f"im{k}"]) for k in range(4)]
    return RetrievalDataset("mini", docs, {"test": queries}, images)


def test_retrieval_check_compares_two_backends(tiny_export):
    from mimic_engine.runtime.onnx_backend import OnnxBackend
    from mimic_engine.runtime.torch_backend import TorchBackend

    torch_backend, onnx_backend = TorchBackend.from_encoder(tiny_export.encoder), OnnxBackend(tiny_export.out_dir)
    data = demo_like_dataset()

    same = retrieval_check(torch_backend, onnx_backend, data, k=10)
    assert same["queries"] == 12 and same["documents"] == 20 and same["split"] == "test"
    assert same["topk_overlap"] == 1.0 and same["recall_delta"] == 0.0 and same["min_doc_cosine"] > 0.99999
    assert 0.0 <= same["recall@10_a"] <= 1.0

    worse = retrieval_check(torch_backend, _Noisy(onnx_backend, 0.5), data, k=10)
    assert worse["topk_overlap"] < 1.0 and worse["min_doc_cosine"] < 0.99
    assert worse["backend_b"] == "noisy"


def test_t5_backbone_exports_with_every_variant(tmp_path):
    """The base preset's text backbone is T5 (relative position buckets, RMS norm, its own decoder)."""
    from mimic_engine.encoder import MimicEncoder
    from mimic_engine.export.pipeline import ExportOptions, export_checkpoint

    t5 = dict(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=2,
              feed_forward_proj="relu")
    enc = MimicEncoder.from_preset("tiny", fusion="decoder", **{"text.kind": "t5", "text.hf_config": t5})
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    result = export_checkpoint(ckpt, ExportOptions(out_dir=str(tmp_path / "e"), tensorrt=False), log=lambda *_: None)
    assert set(result.manifest.variants) == {"fp32", "optimized", "int8", "fp16"}
    assert all(p["passed"] for p in result.parity.values()), {v: p["min_cosine"] for v, p in result.parity.items()}
    assert result.parity["fp32"]["max_abs_diff"] <= 1e-4
