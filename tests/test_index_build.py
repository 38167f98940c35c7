"""Bulk ingestion (build_index and `mimic-engine index build|stats`) with a tiny random encoder."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mimic_engine.data.types import DictImageStore, Document, RetrievalDataset
from mimic_engine.index import DocumentIndex, IndexMismatchError, build_index
from mimic_engine.preprocess import Item
from tests.conftest import make_image_bytes

pytest.importorskip("hnswlib")


def small_dataset(n_text=6, n_image=5) -> RetrievalDataset:
    docs = [Document(f"t{i}", "text", text=f"passage number {i} about topic {i % 3}", title=f"Title {i}") for i in range(n_text)]
    images = {}
    for i in range(n_image):
        images[f"img{i}"] = make_image_bytes(seed=i)
        docs.append(Document(f"i{i}", "image", text=f"a caption {i}", image_ids=[f"img{i}"]))
    return RetrievalDataset("toy", docs, {"dev": []}, DictImageStore(images))


class FailingEncoder:
    """Passes through `ok_calls` encode calls, then fails (an interrupted build)."""

    def __init__(self, encoder, ok_calls):
        self.encoder, self.ok_calls = encoder, ok_calls
        self.model_id, self.dim = encoder.model_id, encoder.dim

    def encode(self, items, role="document", batch_size=64):
        if self.ok_calls == 0:
            raise KeyboardInterrupt
        self.ok_calls -= 1
        return self.encoder.encode(items, role=role, batch_size=batch_size)


def test_build_stores_what_the_encoder_produces_and_resumes_after_interruption(tiny_encoders, tmp_path):
    enc = tiny_encoders("decoder")
    ds = small_dataset()
    path = str(tmp_path / "idx")
    with DocumentIndex(path, dim=enc.dim, model_id=enc.model_id) as idx:
        with pytest.raises(KeyboardInterrupt):  # chunks of 4 docs, batches of 2: dies in the 2nd chunk
            build_index(FailingEncoder(enc, ok_calls=3), ds, idx, batch_size=2, progress=False, chunk=4)
        assert idx.count() == 4  # the committed first chunk
    with DocumentIndex(path, dim=enc.dim, model_id=enc.model_id) as idx:
        assert build_index(enc, ds, idx, batch_size=2, progress=False, chunk=4) == 7
        assert build_index(enc, ds, idx, batch_size=2, progress=False, chunk=4) == 0  # nothing left
        assert idx.count("text") == 6 and idx.count("image") == 5
        assert idx.get("t1").text == "passage number 1 about topic 1" and idx.get("t1").metadata == {"title": "Title 1"}
        img = idx.get("i2")
        assert (img.caption, img.image_ref, img.text) == ("a caption 2", "dataset:toy:img2", None)
        expected = enc.encode([Item(text="a caption 2", images=[make_image_bytes(seed=2)])], role="document")[0]
        np.testing.assert_allclose(idx.get_vector("i2"), expected, atol=1e-5)
        assert idx.search(expected, k=1)[0][0].id == "i2"


def test_caption_keep_zero_indexes_pixels_only(tiny_encoders, tmp_path):
    enc = tiny_encoders("decoder")
    with DocumentIndex(str(tmp_path / "idx"), dim=enc.dim, model_id=enc.model_id) as idx:
        build_index(enc, small_dataset(2, 2), idx, batch_size=8, progress=False, caption_keep=0.0, source="webqa")
        img = idx.get("i1")
        assert img.caption is None and img.metadata == {"caption_dropped": True} and img.image_ref == "dataset:webqa:img1"
        expected = enc.encode([Item(images=[make_image_bytes(seed=1)])], role="document")[0]
        np.testing.assert_allclose(idx.get_vector("i1"), expected, atol=1e-5)
        assert idx.get("t0").text is not None  # text documents always keep their text


def test_build_refuses_an_index_of_another_model(tiny_encoders, tmp_path):
    enc = tiny_encoders("decoder")
    with DocumentIndex(str(tmp_path / "idx"), dim=enc.dim, model_id="someone-else") as idx:
        with pytest.raises(IndexMismatchError, match="someone-else"):
            build_index(enc, small_dataset(), idx, progress=False)


def test_cli_build_then_stats(tiny_encoders, tmp_path, monkeypatch):
    import mimic_engine.data
    from mimic_engine.checkpoint import save_checkpoint
    from mimic_engine.cli import cli

    enc = tiny_encoders("decoder")
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt, enc.model, enc.tokenizer, {"step": 0})
    seen = {}

    def fake_load_dataset(kind, data_dir=None):
        seen["args"] = (kind, data_dir)
        return small_dataset()

    monkeypatch.setattr(mimic_engine.data, "load_dataset", fake_load_dataset, raising=False)
    index_dir = str(tmp_path / "idx")
    runner = CliRunner()
    res = runner.invoke(cli, ["index", "build", "--model", ckpt, "--data", "demo", "--index", index_dir, "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == ("demo", None) and "added 11 documents" in res.output
    res = runner.invoke(cli, ["index", "build", "--model", ckpt, "--data", "demo", "--index", index_dir])
    assert res.exit_code == 0 and "added 0 documents (11 were already there)" in res.output
    res = runner.invoke(cli, ["index", "stats", "--index", index_dir])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert stats["count"] == 11 and stats["count_by_modality"] == {"image": 5, "text": 6}
    assert stats["dim"] == enc.dim and stats["model_id"] and stats["snapshot_lag"] == 0
    with DocumentIndex(index_dir, dim=enc.dim, model_id=stats["model_id"]) as idx:
        assert idx.get("i0").image_ref == "dataset:demo:img0"
