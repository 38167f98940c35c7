"""The model id is a hash of the model's content (config, weights, tokenizer), not of the checkpoint
file: bookkeeping and re-saving leave it alone, any weight changes it. Indexes and exports that
recorded the checkpoint file's sha256 (the id before) keep opening with the same model."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from mimic_engine.checkpoint import (file_sha256, load_checkpoint, model_content_id, read_checkpoint, save_checkpoint,
                                     update_checkpoint_meta)
from mimic_engine.encoder import MimicEncoder
from mimic_engine.errors import CheckpointError
from mimic_engine.preprocess import Item


@pytest.fixture
def ckpt(tiny_encoders, tmp_path):
    enc = tiny_encoders("decoder")
    return save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer, {"step": 1})


def test_the_id_is_unchanged_by_a_meta_update_and_by_re_saving(ckpt, tmp_path):
    loaded = load_checkpoint(ckpt)
    assert loaded.model_id == read_checkpoint(ckpt)["model_id"] and len(loaded.model_id) == 64
    assert loaded.model_id != loaded.sha256 and loaded.legacy_ids == (loaded.sha256,)

    update_checkpoint_meta(ckpt, {"final_metrics": {"test": {"mrr@10": 0.5}}})
    updated = load_checkpoint(ckpt)
    assert updated.meta["final_metrics"] == {"test": {"mrr@10": 0.5}} and updated.meta["step"] == 1  # merged
    assert updated.sha256 != loaded.sha256  # the file changed ...
    assert updated.model_id == loaded.model_id  # ... the model did not
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # written through the atomic path

    again = save_checkpoint(str(tmp_path / "again.pt"), updated.model, updated.tokenizer, {"step": 99})
    assert load_checkpoint(again).model_id == loaded.model_id


def test_the_id_changes_with_one_weight_the_config_or_the_tokenizer(ckpt):
    payload = read_checkpoint(ckpt)
    base = model_content_id(payload["config"], payload["state_dict"], payload["tokenizer"])
    assert base == payload["model_id"]
    name = next(n for n in sorted(payload["state_dict"]) if payload["state_dict"][n].dtype == torch.float32)
    weights = {**payload["state_dict"], name: payload["state_dict"][name].clone()}
    weights[name].view(-1)[0] += 1e-3
    assert model_content_id(payload["config"], weights, payload["tokenizer"]) != base
    # same bytes, another dtype or shape: another model
    as_int = {**payload["state_dict"], name: payload["state_dict"][name].view(torch.int32)}
    assert model_content_id(payload["config"], as_int, payload["tokenizer"]) != base
    config = json.loads(json.dumps(payload["config"]))
    config["fusion"]["embed_dim"] = 7
    assert model_content_id(config, payload["state_dict"], payload["tokenizer"]) != base
    tokenizer = {**payload["tokenizer"], "extra.txt": b""}
    assert model_content_id(payload["config"], payload["state_dict"], tokenizer) != base
    # the truncation / padding of the fast tokenizer's last call is state, not the model
    spec = json.loads(payload["tokenizer"]["tokenizer.json"])
    called = {**spec, "truncation": {"max_length": 7, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}}
    tokenizer = {**payload["tokenizer"], "tokenizer.json": json.dumps(called).encode()}
    assert model_content_id(payload["config"], payload["state_dict"], tokenizer) == base
    vocab = {**spec, "model": {**spec["model"], "unk_token": "[NOPE]"}}
    tokenizer = {**payload["tokenizer"], "tokenizer.json": json.dumps(vocab).encode()}
    assert model_content_id(payload["config"], payload["state_dict"], tokenizer) != base


def test_a_changed_weight_under_the_old_id_is_refused_and_an_old_checkpoint_gets_its_id(ckpt, tmp_path):
    payload = read_checkpoint(ckpt)
    name = next(n for n in sorted(payload["state_dict"]) if payload["state_dict"][n].dtype == torch.float32)
    payload["state_dict"][name].view(-1)[0] += 1.0  # edited without save_checkpoint: the stored id is stale
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="records model id .* hash to .*re-save the model"):
        load_checkpoint(str(tmp_path / "edited.pt"))

    old = read_checkpoint(ckpt)
    del old["model_id"]  # a checkpoint written before ids were stored
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(str(tmp_path / "old.pt")).model_id == load_checkpoint(ckpt).model_id
    update_checkpoint_meta(str(tmp_path / "old.pt"), {"note": "x"})
    assert read_checkpoint(str(tmp_path / "old.pt"))["model_id"] == load_checkpoint(ckpt).model_id


def test_an_index_built_with_the_file_sha256_still_opens_with_that_checkpoint(ckpt, tmp_path, tiny_encoders):
    pytest.importorskip("hnswlib")
    from mimic_engine.index import DocumentIndex, IndexMismatchError, StoredDocument, build_index
    from mimic_engine.runtime import load_backend
    from mimic_engine.server.bootstrap import default_index_path
    from tests.test_index_build import small_dataset

    legacy_id = file_sha256(ckpt)  # what an index recorded before model ids hashed the content
    root = tmp_path / "indexes"
    path = str(root / legacy_id[:16])
    encoder = MimicEncoder.from_checkpoint(ckpt)
    vector = encoder.encode([Item(text="kept from before")])
    with DocumentIndex(path, dim=encoder.dim, model_id=legacy_id) as index:
        index.upsert([StoredDocument("old", "text", text="kept from before")], vector)

    assert encoder.model_id != legacy_id and encoder.legacy_model_ids == (legacy_id,)
    with DocumentIndex(path, dim=encoder.dim, model_id=encoder.model_id,
                       legacy_model_ids=encoder.legacy_model_ids) as index:
        assert index.model_id == legacy_id  # it keeps the id it was built with
        assert build_index(encoder, small_dataset(), index, progress=False) == 11
        assert index.search(vector[0], k=1)[0][0].id == "old"
    # the server's default folder for this model is the one named after the legacy id
    backend = load_backend("torch", ckpt)
    assert default_index_path(str(root), backend) == path
    assert default_index_path(str(tmp_path / "empty"), backend).endswith(backend.model_id[:16])
    # another model still cannot open it, whatever its legacy ids
    with pytest.raises(IndexMismatchError, match="vectors of different models"):
        DocumentIndex(path, dim=encoder.dim, model_id="another-model", legacy_model_ids=("0" * 64,))


def test_an_export_without_a_source_entry_still_loads(tiny_export, tmp_path):
    """A format-1 export: top-level checkpoint + checkpoint_sha256, graphs tagged with the file's sha256."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("hnswlib")
    from mimic_engine.export.artifacts import check_target
    from mimic_engine.index import DocumentIndex, StoredDocument
    from mimic_engine.runtime import find_checkpoint, load_backend
    from mimic_engine.runtime.export_format import MANIFEST, METADATA_PREFIX, ExportError, read_manifest
    from mimic_engine.runtime.onnx_backend import OnnxBackend

    old = str(tmp_path / "old-export")
    shutil.copytree(tiny_export.out_dir, old)
    sha = file_sha256(tiny_export.checkpoint)
    manifest = json.load(open(os.path.join(old, MANIFEST)))
    source = manifest.pop("source")
    manifest.update(format_version=1, checkpoint=source["checkpoint"], checkpoint_sha256=sha)
    json.dump(manifest, open(os.path.join(old, MANIFEST), "w"))
    for stage, file in manifest["variants"]["fp32"].items():
        graph = onnx.load(os.path.join(old, file))
        props = [(p.key, p.value) for p in graph.metadata_props if p.key != METADATA_PREFIX + "model_id"]
        del graph.metadata_props[:]
        for key, value in props + [(METADATA_PREFIX + "checkpoint_sha256", sha)]:
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, os.path.join(old, file))

    read = read_manifest(old)
    assert read.model_id == sha and read.checkpoint == tiny_export.checkpoint
    backend = OnnxBackend(old)
    assert backend.model_id == sha  # the id of its time, which its indexes recorded
    items = [Item(text="a red bus")]
    np.testing.assert_allclose(backend.encode(items), tiny_export.encoder.encode(items), atol=1e-5)
    assert find_checkpoint(old) == tiny_export.checkpoint  # the torch backends still find the checkpoint
    # an index built with the old export opens with the checkpoint it came from, and the other way round
    with DocumentIndex(str(tmp_path / "idx"), backend.dim, backend.model_id) as index:
        index.upsert([StoredDocument("d", "text", text="a red bus")], backend.encode(items))
    torch_backend = load_backend("torch", old)
    with DocumentIndex(str(tmp_path / "idx"), torch_backend.dim, torch_backend.model_id,
                       legacy_model_ids=torch_backend.legacy_model_ids) as index:
        assert index.get("d") is not None
    # re-exporting the same model over it is allowed; another model is refused
    ckpt = load_checkpoint(tiny_export.checkpoint)
    check_target(old, (ckpt.model_id, *ckpt.legacy_ids), force=False)
    with pytest.raises(ExportError, match="artifacts of another model"):
        check_target(old, ("f" * 64,), force=False)
