"""`mimic-engine export`: ONNX graphs for every fusion, parity on unseen shapes, variants, the
output folder's contract, and the errors (nothing half-written left behind)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mimic_engine.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from mimic_engine.config import FUSIONS
from mimic_engine.errors import CheckpointError, ConfigError

onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install 'mimic-engine[export]'")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'mimic-engine[export]'")

from mimic_engine.export.artifacts import Range  # noqa: E402
from mimic_engine.export.onnx_export import read_metadata  # noqa: E402
from mimic_engine.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from mimic_engine.runtime.export_format import ExportError, read_manifest  # noqa: E402


def quiet(*_):
    pass


@pytest.fixture
def tiny_exports(tiny_fusion_exports):
    """fusion -> (checkpoint path, export dir, ExportResult) of the session's shared exports."""
    def get(fusion):
        e = tiny_fusion_exports(fusion)
        return e.checkpoint, e.out_dir, e.result

    return get


@pytest.mark.parametrize("fusion", FUSIONS)
def test_export_writes_checked_graphs_with_metadata_and_passes_parity(fusion, tiny_exports):
    ckpt, out, result = tiny_exports(fusion)
    manifest = read_manifest(out)
    assert manifest.complete and result.ok and manifest.fusion == fusion
    for name in ("vision.onnx", "fusion.onnx"):
        onnx.checker.check_model(os.path.join(out, name))
        meta = read_metadata(os.path.join(out, name))
        assert meta["model_id"] == manifest.model_id
        assert meta["config"]["fusion"]["fusion"] == fusion
        assert [t["name"] for t in meta["io"]["inputs"]] == (
            ["pixel_values"] if name == "vision.onnx" else ["input_ids", "attention_mask", "visual_tokens", "visual_mask"])
    # the graphs are separate and dynamic in batch, text length and visual tokens
    graph = onnx.load(os.path.join(out, "fusion.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "text_len"] and dims["visual_tokens"][:2] == ["batch", "visual_len"]
    # parity: at least six unseen shapes, all within the fp32 tolerance, saved beside the model
    parity = json.load(open(os.path.join(out, "parity.json")))["fp32"]
    rows = parity["rows"]
    assert len(rows) >= 6 and all(r["passed"] for r in rows)
    assert {1, 7, 64} <= {r["batch"] for r in rows}
    assert any(r["visual_len"] == 0 for r in rows) and any(r["images"] > r["batch"] for r in rows)
    assert parity["max_abs_diff"] <= 1e-4 and parity["min_cosine"] >= 0.99999
    # the files a runtime needs without the checkpoint; every file listed with its hash
    for name in ("config.json", "tokenizer/tokenizer_config.json", "model_card.json", "README.md", "parity.json"):
        assert name in manifest.files, name
    # the source checkpoint, named explicitly: its path (absolute and relative to the export), ids
    assert manifest.source == {"checkpoint": os.path.abspath(ckpt), "relative": "../ckpt.pt",
                               "model_id": load_checkpoint(ckpt).model_id, "file_sha256": file_sha256(ckpt)}


def test_model_card_documents_inputs_and_rules(tiny_exports):
    _, out, _ = tiny_exports("decoder")
    card = json.load(open(os.path.join(out, "model_card.json")))
    fusion_inputs = {t["name"]: (t["dtype"], t["shape"]) for t in card["io"]["fusion"]["inputs"]}
    assert fusion_inputs["input_ids"] == ("int64", ["batch", "text_len"])
    assert fusion_inputs["visual_tokens"][0] == "float32"
    assert card["io"]["vision"]["outputs"][0]["name"] == "visual_tokens"
    assert any("visual_len must be >= 1" in r for r in card["rules"])
    readme = open(os.path.join(out, "README.md")).read()
    assert "onnxruntime" in readme and "`pixel_values`" in readme


def test_plain_onnxruntime_can_use_the_folder_without_mimic_engine(tiny_exports, tmp_path):
    """Follow README.md with onnxruntime + transformers only and get the backend's vectors."""
    from mimic_engine.preprocess import Item
    from mimic_engine.runtime.onnx_backend import OnnxBackend

    _, out, _ = tiny_exports("late")
    expected = OnnxBackend(out).encode([Item(text="a red double-decker bus")])
    script = f"""
import json, sys, numpy as np, onnxruntime as ort
from transformers import AutoTokenizer
card = json.load(open("model_card.json"))
h = card["io"]["fusion"]["inputs"][2]["shape"][2]
tok = AutoTokenizer.from_pretrained("tokenizer")
enc = tok(["a red double-decker bus"], padding=True, return_tensors="np")
sess = ort.InferenceSession("fusion.onnx", providers=["CPUExecutionProvider"])
emb = sess.run(["embeddings"], {{"input_ids": enc["input_ids"].astype(np.int64),
    "attention_mask": enc["attention_mask"].astype(np.int64),
    "visual_tokens": np.zeros((1, 1, h), np.float32), "visual_mask": np.zeros((1, 1), np.int64)}})[0]
assert not any(m.startswith("mimic_engine") for m in sys.modules), "mimic_engine was imported"
print(json.dumps(emb.tolist()))
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.asarray(json.loads(res.stdout.strip().splitlines()[-1]), np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_variants_are_written_checked_and_loadable(tiny_export):
    from mimic_engine.preprocess import Item
    from mimic_engine.runtime.onnx_backend import OnnxBackend
    from tests.conftest import make_image_bytes

    out, result = tiny_export.out_dir, tiny_export.result
    manifest = read_manifest(out)
    assert set(manifest.variants) == {"fp32", "optimized", "int8", "fp16"}, manifest.skipped
    for variant in ("optimized", "int8", "fp16"):
        assert result.parity[variant]["passed"], (variant, result.parity[variant])
    assert result.parity["optimized"]["max_abs_diff"] <= 1e-4
    assert result.parity["fp16"]["min_cosine"] >= 0.999
    assert [s["step"] for s in manifest.skipped] == ["tensorrt"]
    # fp16: weights stored in fp16, io in fp32, norms and softmax computed in fp32
    half = onnx.load(os.path.join(out, "fusion.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in half.graph.input)
    assert read_metadata(half)["variant"] == "fp16"
    items = [Item(text="a cat"), Item(text="cap", images=[make_image_bytes(3)])]
    ref = OnnxBackend(out).encode(items)
    for variant, atol in (("optimized", 1e-5), ("int8", 0.05), ("fp16", 5e-3)):
        backend = OnnxBackend(out, variant=variant)
        assert backend.name == f"onnx-{variant}" and backend.model_id == manifest.model_id
        np.testing.assert_allclose(backend.encode(items), ref, atol=atol)


def test_large_graphs_use_external_data(tiny_encoders, tmp_path):
    from mimic_engine.preprocess import Item
    from mimic_engine.runtime.onnx_backend import OnnxBackend

    enc = tiny_encoders("early")
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    out = str(tmp_path / "export")
    # a threshold of 0 bytes makes every graph "large"; the real one is ~1.8 GB
    export_checkpoint(ckpt, ExportOptions(out_dir=out, variants=("int8",), tensorrt=False, external_data_bytes=0),
                      log=quiet)
    for name in ("vision.onnx", "fusion.onnx", "fusion.int8.onnx"):
        assert os.path.exists(os.path.join(out, name + ".data")), name
        onnx.checker.check_model(os.path.join(out, name))
    assert os.path.getsize(os.path.join(out, "fusion.onnx")) < 1_000_000  # weights live in the .data file
    np.testing.assert_allclose(OnnxBackend(out).encode([Item(text="x y z")]), enc.encode([Item(text="x y z")]), atol=1e-5)


def test_parity_failure_fails_the_export_and_marks_it_incomplete(tiny_encoders, tmp_path, monkeypatch):
    from mimic_engine.export import parity
    from mimic_engine.runtime.onnx_backend import OnnxBackend

    monkeypatch.setitem(parity.TOLERANCES, "fp32", (-1.0, 1.0))  # nothing can pass
    enc = tiny_encoders("decoder")
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    out = str(tmp_path / "export")
    with pytest.raises(ExportError, match="parity failed.*incomplete"):
        export_checkpoint(ckpt, ExportOptions(out_dir=out, variants=("int8",), tensorrt=False), log=quiet)
    manifest = read_manifest(out, require_complete=False)
    assert manifest.complete is False and "parity" in manifest.failure
    assert "int8" not in manifest.variants  # stopped at the failing step
    with pytest.raises(ExportError, match="INCOMPLETE"):
        OnnxBackend(out)


# ---- errors --------------------------------------------------------------------------------------
def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n]


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(str(tmp_path / "nope.pt"), ExportOptions(out_dir=str(tmp_path / "o")), log=quiet)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        export_checkpoint(str(bad), ExportOptions(out_dir=str(tmp_path / "o")), log=quiet)
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_bad_ranges_and_opsets_are_refused_before_any_work(tiny_exports, tmp_path):
    with pytest.raises(ConfigError, match="min=8, opt=4, max=16 violates"):
        Range.parse("batch", "8,4,16")
    with pytest.raises(ConfigError, match="has 2 values; write MIN,OPT,MAX"):
        Range.parse("text_len", "1,2")
    ckpt, _, _ = tiny_exports("decoder")
    with pytest.raises(ExportError, match="opset 99 cannot be written.*support opsets 14"):
        export_checkpoint(ckpt, ExportOptions(out_dir=str(tmp_path / "o"), opset=99), log=quiet)
    with pytest.raises(ConfigError, match="exceeds the model's text.max_length"):
        export_checkpoint(ckpt, ExportOptions(out_dir=str(tmp_path / "o"), text_len=Range("text_len", 1, 8, 4096)),
                          log=quiet)
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_output_folder_of_another_model_or_foreign_files_is_refused(tiny_exports, tmp_path):
    ckpt_a, out_a, _ = tiny_exports("decoder")
    ckpt_b, _, _ = tiny_exports("late")
    before = sorted(os.listdir(out_a))
    with pytest.raises(ExportError, match="artifacts of another model"):
        export_checkpoint(ckpt_b, ExportOptions(out_dir=out_a, variants=(), tensorrt=False), log=quiet)
    assert sorted(os.listdir(out_a)) == before and read_manifest(out_a).complete
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ExportError, match="not a mimic-engine export"):
        export_checkpoint(ckpt_a, ExportOptions(out_dir=str(foreign), variants=(), tensorrt=False), log=quiet)
    assert os.listdir(foreign) == ["holiday.jpg"] and not _leftovers(tmp_path)


def test_a_crash_mid_export_leaves_the_old_export_untouched(tiny_exports, tmp_path, monkeypatch):
    import shutil

    from mimic_engine.export import pipeline

    ckpt, shared, _ = tiny_exports("late")
    out = str(tmp_path / "export")
    shutil.copytree(shared, out)  # an earlier export of this checkpoint, to be re-exported over
    before = read_manifest(out).files

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "_finish", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(ckpt, ExportOptions(out_dir=out, variants=(), tensorrt=False), log=quiet)
    assert read_manifest(out).files == before and not _leftovers(tmp_path)


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_prints_progress_parity_table_and_summary(tiny_exports, tmp_path):
    from click.testing import CliRunner

    from mimic_engine.export.cli import export_command

    from mimic_engine.export.triton import MARKER

    ckpt, _, _ = tiny_exports("early")
    out, repo = tmp_path / "cli-export", tmp_path / "triton-repo"
    res = CliRunner().invoke(export_command, [ckpt, "--out", str(out), "--precision", "fp32", "--no-optimize",
                                              "--batch", "1,4,9", "--text-len", "1,8,16", "--visual-tokens", "1,16,32",
                                              "--triton-repo", str(repo)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    for text in ("[1/8]", "[4/8] parity", "min cos", "export summary (complete)", "fusion.onnx", "skipped:",
                 "tensorrt: ", "batch 1/4/9", "[8/8] Triton repository ->"):
        assert text in res.output, text
    # the Triton step of the pipeline (its repository's contents are tested in test_export_triton.py)
    assert json.load(open(repo / MARKER))["model_id"] == load_checkpoint(ckpt).model_id
    assert os.path.exists(repo / "mimic_fusion" / "1" / "model.onnx")
    manifest = read_manifest(str(out))
    assert manifest.ranges["batch"] == [1, 4, 9] and set(manifest.variants) == {"fp32"}
    rows = json.load(open(out / "parity.json"))["fp32"]["rows"]
    assert max(r["batch"] for r in rows) == 9 and max(r["text_len"] for r in rows) == 16


def test_cli_errors_exit_non_zero_with_the_message(tmp_path):
    res = subprocess.run([sys.executable, "-c", "from mimic_engine.cli import main; main()", "export",
                          str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_a_manifest_pointing_outside_the_export_folder_is_refused(tiny_exports, tmp_path):
    import json
    import shutil

    _, out, _ = tiny_exports("decoder")
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    path = os.path.join(copy, "manifest.json")
    manifest = json.load(open(path))
    manifest["variants"]["fp32"]["fusion"] = "../../elsewhere/fusion.onnx"
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ExportError, match="not a file name inside the export folder"):
        read_manifest(copy)
