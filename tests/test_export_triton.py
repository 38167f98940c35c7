"""Triton model repository: config.pbtxt files that Triton's own protobuf schema accepts, with
names, dtypes and -1 dims matching the ONNX graphs, and the client flow that chains the stages."""
import importlib.util
import os
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install 'mimic-engine[export]'")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'mimic-engine[export]'")

from mimic_engine.export.triton import MARKER, to_pbtxt, write_repository  # noqa: E402
from mimic_engine.runtime.export_format import ExportError, read_manifest  # noqa: E402

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_export):
    """The Triton repository of the shared export (what `export --triton-repo` writes as its last
    step; that route through the pipeline is tested in test_export.py)."""
    out, repo_dir = tiny_export.out_dir, str(tmp_path_factory.mktemp("triton") / "repo")
    write_repository(out, repo_dir, read_manifest(out), tiny_export.encoder.config, log=lambda *_: None)
    return tiny_export.encoder, tiny_export.checkpoint, out, repo_dir


def parse_pbtxt(text: str):
    """A small parser for protobuf text format: `key: value`, `key: [a, b]`, `key { ... }`.

    -> dict: repeated fields (a key seen twice, or a [list]) become lists. Raises on anything else.
    """
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,]+', text)
    pos = 0

    def value(tok):
        if tok.startswith('"'):
            return tok[1:-1]
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if tok in ("true", "false"):
            return tok == "true"
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", tok):
            return tok  # enum
        raise ValueError(f"bad scalar {tok!r}")

    def message(end):
        nonlocal pos
        out = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            assert re.fullmatch(r"[a-z_][a-z0-9_]*", key), f"bad field name {key!r}"
            pos += 1
            if tokens[pos] == "{":
                pos += 1
                item = message("}")
                pos += 1
            else:
                assert tokens[pos] == ":", f"expected ':' after {key}"
                pos += 1
                if tokens[pos] == "[":
                    pos += 1
                    item = []
                    while tokens[pos] != "]":
                        if tokens[pos] != ",":
                            item.append(value(tokens[pos]))
                        pos += 1
                    pos += 1
                else:
                    item = value(tokens[pos])
                    pos += 1
            if key in out:
                out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [item]
            else:
                out[key] = item
        return out

    result = message(None)
    assert pos == len(tokens)
    return result


def _as_list(v):
    return v if isinstance(v, list) else [v]


def graph_io(path):
    g = onnx.load(path, load_external_data=False).graph
    io = {}
    for t in list(g.input) + list(g.output):
        dims = [-1 if d.dim_param else d.dim_value for d in t.type.tensor_type.shape.dim]
        io[t.name] = (ONNX_TO_TRITON[t.type.tensor_type.elem_type], dims[1:])  # batch dim is implicit
    return io


def test_repository_layout_and_configs_match_the_graphs(repo):
    _, _, out, repo_dir = repo
    assert sorted(n for n in os.listdir(repo_dir) if not n.startswith(".")) == ["README.md", "mimic_fusion", "mimic_vision"]
    assert os.path.exists(os.path.join(repo_dir, MARKER))
    for model, stage in (("mimic_vision", "vision"), ("mimic_fusion", "fusion")):
        cfg = parse_pbtxt(open(os.path.join(repo_dir, model, "config.pbtxt")).read())
        assert cfg["name"] == model and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] > 0
        assert "dynamic_batching" in cfg
        graph = os.path.join(repo_dir, model, "1", "model.onnx")
        io = graph_io(graph)
        tensors = _as_list(cfg["input"]) + _as_list(cfg["output"])
        assert {t["name"]: (t["data_type"], t["dims"]) for t in tensors} == io
        assert graph_io(os.path.join(out, f"{stage}.onnx")) == io
    fusion = parse_pbtxt(open(os.path.join(repo_dir, "mimic_fusion", "config.pbtxt")).read())
    dims = {t["name"]: t["dims"] for t in fusion["input"]}
    assert dims["input_ids"] == [-1] and dims["visual_tokens"] == [-1, 32]


def test_configs_parse_with_tritons_model_config_schema(repo):
    """Triton's own ModelConfig protobuf (shipped in tritonclient) must accept every config.pbtxt."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (pip install tritonclient); the text-format parser test covers it")
    pb2_path = os.path.join(spec.submodule_search_locations[0], "grpc", "model_config_pb2.py")
    # load the generated module by path: `tritonclient.grpc`'s __init__ needs grpcio, the schema does not
    mod_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", pb2_path)
    pb2 = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(pb2)
    from google.protobuf import text_format

    _, _, _, repo_dir = repo
    for model in ("mimic_vision", "mimic_fusion"):
        cfg = text_format.Parse(open(os.path.join(repo_dir, model, "config.pbtxt")).read(), pb2.ModelConfig())
        assert cfg.name == model and cfg.platform == "onnxruntime_onnx"
        assert cfg.HasField("dynamic_batching") and cfg.max_batch_size > 0
        assert all(d == -1 or d > 0 for t in list(cfg.input) + list(cfg.output) for d in t.dims)
    fusion = text_format.Parse(open(os.path.join(repo_dir, "mimic_fusion", "config.pbtxt")).read(), pb2.ModelConfig())
    assert [i.name for i in fusion.input] == ["input_ids", "attention_mask", "visual_tokens", "visual_mask"]
    assert pb2.DataType.Name(fusion.input[0].data_type) == "TYPE_INT64"
    assert pb2.DataType.Name(fusion.output[0].data_type) == "TYPE_FP32"


def test_pbtxt_writer_escapes_and_nests():
    text = to_pbtxt({"name": 'a "b"', "max_batch_size": 4, "input": [{"name": "x", "data_type": "TYPE_FP32",
                                                                       "dims": [-1, 3]}],
                     "instance_group": [{"kind": "KIND_GPU", "count": 1, "profile": ["0", "1"]}]})
    parsed = parse_pbtxt(text)
    assert parsed["name"] == 'a \\"b\\"' and parsed["input"]["dims"] == [-1, 3]
    assert parsed["instance_group"]["profile"] == ["0", "1"] and parsed["instance_group"]["kind"] == "KIND_GPU"


def test_client_flow_in_the_readme_chains_the_stages(repo):
    """Run the README's gather code against the graphs with onnxruntime standing in for Triton."""
    import onnxruntime as ort

    from mimic_engine.preprocess import Item
    from tests.conftest import make_image_bytes

    enc, _, _, repo_dir = repo
    readme = open(os.path.join(repo_dir, "README.md")).read()
    code = readme.split("```python")[1].split("```")[0]
    code = code.replace("import tritonclient.http as httpclient\n", "").replace(
        'client = httpclient.InferenceServerClient("127.0.0.1:8000")\n', "")
    code = re.sub(r"def infer\(.*?\n\n", "", code, flags=re.S)  # replaced by the ORT stand-in below
    sessions = {m: ort.InferenceSession(os.path.join(repo_dir, m, "1", "model.onnx")) for m in ("mimic_vision", "mimic_fusion")}

    def infer(model, inputs, output):
        return sessions[model].run([output], inputs)[0]

    items = [Item(text="a cat"), Item(text="two", images=[make_image_bytes(1), make_image_bytes(2)]),
             Item(images=[make_image_bytes(3)])]
    batch = enc.preprocessor.collate(items)
    scope = {"np": np, "infer": infer, "input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy(),
             "pixel_values": batch.pixel_values.numpy(), "image_counts": batch.image_counts.numpy(), "H": 32}
    exec(code, scope)
    np.testing.assert_allclose(scope["emb"], enc.encode(items, batch_size=64), atol=1e-5)


def test_repository_of_another_model_is_refused(repo, tmp_path, tiny_encoders):
    enc, _, out, repo_dir = repo
    manifest = read_manifest(out)
    other = type(manifest)(**{**manifest.__dict__, "source": {**manifest.source, "model_id": "0" * 64,
                                                              "file_sha256": "1" * 64}})
    with pytest.raises(ExportError, match="artifacts of another model"):
        write_repository(out, repo_dir, other, enc.config, log=lambda *_: None)
