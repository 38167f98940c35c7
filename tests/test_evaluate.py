"""evaluate(), diagnostics(), format_table() and the `eval` command on a small synthetic corpus."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from mimic_engine.data.types import DictImageStore, Document, Query, RetrievalDataset, caption_kept
from mimic_engine.errors import DataError
from mimic_engine.evaluate import diagnostics, evaluate, format_rate, format_table
from mimic_engine.metrics import METRICS
from tests.conftest import make_image_bytes

N_TEXT, N_IMAGE = 8, 12  # text documents first: their order matters for tie-breaking below


# with kinds: text queries "text", image queries k < 14 "image-a", the others "image-b"; query q19 none
KIND_OF = {**{k: "text" for k in range(N_TEXT)}, **{k: "image-a" for k in range(N_TEXT, 14)},
           **{k: "image-b" for k in range(14, N_TEXT + N_IMAGE - 1)}}


def make_dataset(kinds: bool = False) -> RetrievalDataset:
    """Document k carries label k (in its passage or caption; image k's pixels are seed k).
    Query k asks for label k; its positive is document k. "i_nocap" (image 8's pixels, no caption)
    is relevant to nothing. `kinds`: queries carry KIND_OF's kinds."""
    images = DictImageStore({f"img{k}": make_image_bytes(seed=k) for k in range(N_TEXT, N_TEXT + N_IMAGE)})
    docs = [Document(id=f"t{k}", modality="text", text=f"passage about lab{k}") for k in range(N_TEXT)]
    docs += [Document(id=f"i{k}", modality="image", text=f"photo of lab{k}", image_ids=[f"img{k}"])
             for k in range(N_TEXT, N_TEXT + N_IMAGE)]
    docs.append(Document(id="i_nocap", modality="image", text=None, image_ids=[f"img{N_TEXT}"]))
    ids = [d.id for d in docs]
    queries = [Query(id=f"q{k}", text=f"what is lab{k}?", positives=[ids[k]], kind=KIND_OF.get(k) if kinds else None)
               for k in range(N_TEXT + N_IMAGE)]
    queries.append(Query(id="q_nopos", text="nothing relevant", positives=[]))  # not evaluable: skipped
    return RetrievalDataset(name="synthetic", documents=docs, queries={"dev": queries, "test": queries[:3]},
                            images=images)


class LabelEncoder:
    """A fake encoder: one-hot of the label it can see ("lab<k>" in the text, or the label of the
    image's pixels), or a fixed "nothing seen" direction.

    reads="text": pixel-blind (the collapsed model); "pixels": ignores text; "both": text, else pixels;
    "contradiction": the text's label, or a fixed "mismatch" direction when the pixels show another
    label (reacts to a contradicting image, ignores every pixel detail the text does not name).
    Records every item it encodes.
    """

    def __init__(self, reads: str, pixel_labels: dict[bytes, int], dim: int = 64):
        self.reads, self.pixel_labels, self.dim = reads, pixel_labels, dim
        self.seen = []  # (role, has_text, n_images)

    def label(self, item) -> int:
        text = re.search(r"lab(\d+)", item.text or "")
        if self.reads == "contradiction" and text:  # the caption, unless the pixels show another label
            seen = self.pixel_labels[item.images[0]] if item.images else None
            return int(text.group(1)) if seen in (None, int(text.group(1))) else self.dim - 2
        if self.reads in ("text", "both") and text:
            return int(text.group(1))
        if self.reads in ("pixels", "both") and item.images:
            return self.pixel_labels[item.images[0]]
        return self.dim - 1  # nothing this encoder can read

    def encode(self, items, role="document", batch_size=64):
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        for n, item in enumerate(items):
            self.seen.append((role, item.has_text, len(item.images)))
            out[n, self.label(item)] = 1.0
        return out


@pytest.fixture
def dataset():
    return make_dataset()


def pixel_labels(ds):
    return {ds.images.get(f"img{k}"): k for k in range(N_TEXT, N_TEXT + N_IMAGE)}


def check_schema(result, rates):
    assert set(result) >= {"split", "n_queries", "n_documents", "seed", "results"}
    assert list(result["results"]) == [format_rate(r) for r in rates]
    for groups in result["results"].values():
        assert {"all", "image", "text"} <= set(groups)
        for metrics in groups.values():
            assert list(metrics) == list(METRICS)
            assert all(0.0 <= v <= 100.0 for v in metrics.values())
    json.dumps(result, allow_nan=False)


def test_format_rate():
    assert [format_rate(r) for r in (1.0, 1, 0.5, 0.0, 0.25)] == ["1.0", "1.0", "0.5", "0.0", "0.25"]


def test_tiny_model_schema(dataset, tiny_encoders):
    rates = (1.0, 0.5, 0.0)
    result = evaluate(tiny_encoders("decoder"), dataset, split="dev", caption_keep=rates, batch_size=8)
    check_schema(result, rates)
    assert result["n_queries"] == N_TEXT + N_IMAGE and result["n_documents"] == N_TEXT + N_IMAGE + 1
    assert result["n_queries_by_modality"] == {"image": N_IMAGE, "text": N_TEXT}
    assert result["n_queries_by_kind"] == {}  # no query records a kind: no kind groups
    assert all(set(groups) == {"all", "image", "text"} for groups in result["results"].values())
    # corpus of 21 < 100 docs: every positive is retrieved
    assert result["results"]["1.0"]["all"]["Recall@100"] == pytest.approx(100.0)
    assert evaluate(tiny_encoders("decoder"), dataset, split="test", caption_keep=(1.0,))["n_queries"] == 3


def test_perfect_encoder_and_caption_removal(dataset):
    enc = LabelEncoder("text", pixel_labels(dataset))
    result = evaluate(enc, dataset, caption_keep=(1.0, 0.5, 0.0), seed=3)
    check_schema(result, (1.0, 0.5, 0.0))
    assert result["results"]["1.0"]["all"] == {m: pytest.approx(100.0) for m in METRICS}

    # text documents never lose their text
    for rate in ("1.0", "0.5", "0.0"):
        assert result["results"][rate]["text"]["MRR@10"] == pytest.approx(100.0)
    # a pixel-blind encoder scores every caption-less document 0 for every query; equal scores rank
    # by corpus index, so a dropped positive at index i has reciprocal rank 1 / (i + 1) (if <= 10)
    docs = dataset.documents
    for rate in (0.5, 0.0):
        rr = []
        for k in range(N_TEXT, N_TEXT + N_IMAGE):
            kept = caption_kept(docs[k].id, rate, seed=3)
            rr.append(1.0 if kept else (1.0 / (k + 1) if k < 10 else 0.0))
        assert result["results"][format_rate(rate)]["image"]["MRR@10"] == pytest.approx(100 * np.mean(rr))
    assert result["results"]["0.0"]["image"]["MRR@10"] < 10

    # what was encoded: every document once as given, captioned image docs once more without caption
    docs_seen = [s for s in enc.seen if s[0] == "document"]
    assert len(docs_seen) == len(docs) + N_IMAGE
    assert sum(1 for _, has_text, n_img in docs_seen if n_img and not has_text) == N_IMAGE + 1  # + i_nocap
    assert sum(1 for s in enc.seen if s[0] == "query") == N_TEXT + N_IMAGE


def test_splits_share_one_corpus_encoding_through_the_memo(dataset):
    # the final report scores dev and test against one encoding of the corpus
    enc = LabelEncoder("text", pixel_labels(dataset))
    alone = {split: evaluate(LabelEncoder("text", pixel_labels(dataset)), dataset, split, caption_keep=(1.0, 0.0))
             for split in ("dev", "test")}
    memo = {}
    shared = {split: evaluate(enc, dataset, split, caption_keep=(1.0, 0.0), corpus_memo=memo) for split in ("dev", "test")}
    assert shared == alone
    assert len([s for s in enc.seen if s[0] == "document"]) == len(dataset.documents) + N_IMAGE  # once, not twice
    evaluate(enc, dataset, "test", caption_keep=(1.0,), corpus_memo=memo)  # other rates: encoded again
    assert len([s for s in enc.seen if s[0] == "document"]) == 2 * len(dataset.documents) + N_IMAGE


def test_keep_zero_encodes_no_caption(dataset):
    enc = LabelEncoder("text", pixel_labels(dataset))
    evaluate(enc, dataset, caption_keep=(0.0,))
    image_items = [s for s in enc.seen if s[0] == "document" and s[2]]
    assert len(image_items) == N_IMAGE + 1 and not any(has_text for _, has_text, _ in image_items)
    enc = LabelEncoder("text", pixel_labels(dataset))
    evaluate(enc, dataset, caption_keep=(0.5,), seed=1)
    n_kept = sum(caption_kept(f"i{k}", 0.5, 1) for k in range(N_TEXT, N_TEXT + N_IMAGE))
    assert 0 < n_kept < N_IMAGE
    assert sum(1 for s in enc.seen if s[0] == "document" and s[2] and s[1]) == n_kept


def test_pixel_encoder_unaffected_by_captions(dataset):
    enc = LabelEncoder("both", pixel_labels(dataset))
    result = evaluate(enc, dataset, caption_keep=(1.0, 0.0))
    assert result["results"]["0.0"]["image"] == result["results"]["1.0"]["image"]


def test_max_queries_and_errors(dataset):
    enc = LabelEncoder("text", pixel_labels(dataset))
    result = evaluate(enc, dataset, max_queries=5, caption_keep=(1.0,))
    assert result["n_queries"] == 5
    assert result["results"]["1.0"]["image"] == {m: None for m in METRICS}  # no image query among the first 5
    assert "-" in format_table(result)
    with pytest.raises(DataError, match="no 'train' split"):
        evaluate(enc, dataset, split="train")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(enc, dataset, caption_keep=(1.5,))


def test_diagnostics_detect_collapse(dataset):
    labels = pixel_labels(dataset)
    blind = diagnostics(LabelEncoder("text", labels), dataset, seed=0)
    assert blind["n_items"] == N_IMAGE  # i_nocap has no caption: not eligible
    mc = blind["modality_collapse"]
    assert mc["image_swap_shift"] == pytest.approx(0.0) and mc["caption_removal_shift"] == pytest.approx(1.0)
    assert mc["collapse_ratio"] > 1e3

    pixels = diagnostics(LabelEncoder("pixels", labels), dataset, seed=0)["modality_collapse"]
    assert pixels["caption_removal_shift"] == pytest.approx(0.0) and pixels["image_swap_shift"] == pytest.approx(1.0)
    assert pixels["collapse_ratio"] == pytest.approx(0.0)

    # an aligned encoder: a caption and its image land on the same vector
    aligned = diagnostics(LabelEncoder("both", labels), dataset, max_items=5)["semantic_alignment"]
    assert aligned["matched_cosine"] == pytest.approx(1.0) and aligned["unmatched_cosine"] == pytest.approx(0.0)
    assert aligned["alignment_gap"] == pytest.approx(1.0) and aligned["modality_gap"] == pytest.approx(0.0)
    # the blind encoder maps every bare image to one point, far from the captions
    sa = blind["semantic_alignment"]
    assert sa["alignment_gap"] == pytest.approx(0.0)
    assert sa["modality_gap"] == pytest.approx(math.sqrt(1 + 1 / N_IMAGE))


def test_diagnostics_tiny_model_and_table(dataset, tiny_encoders):
    diag = diagnostics(tiny_encoders("late"), dataset, max_items=6, seed=1)
    assert diag["n_items"] == 6
    mc = diag["modality_collapse"]
    # every caption of this corpus is different: no pair to measure the same-caption shift on
    assert mc.pop("same_caption_image_swap_shift") is None and mc.pop("same_caption_pairs") == 0
    values = {**mc, **diag["semantic_alignment"]}
    assert all(math.isfinite(v) for v in values.values())
    assert 0 <= diag["modality_collapse"]["caption_removal_shift"] <= 2
    result = evaluate(LabelEncoder("text", pixel_labels(dataset)), dataset, caption_keep=(1.0, 0.5))
    table = format_table(result, diagnostics(tiny_encoders("late"), dataset, max_items=6, seed=1))
    assert "MRR@10" in table and "100.00" in table and "modality collapse" in table
    assert "same-caption image swap shift n/a" in table
    assert len(table.splitlines()) == 3 + 2 * 3 + 5


def test_per_kind_groups(tiny_encoders):
    ds = make_dataset(kinds=True)
    enc = LabelEncoder("text", pixel_labels(ds))
    result = evaluate(enc, ds, caption_keep=(1.0, 0.0), seed=3)
    check_schema(result, (1.0, 0.0))
    assert result["n_queries_by_modality"] == {"image": N_IMAGE, "text": N_TEXT}  # unchanged
    assert result["n_queries_by_kind"] == {"image-a": 6, "image-b": 5, "text": N_TEXT}  # q19 has no kind
    for groups in result["results"].values():
        assert list(groups) == ["all", "image", "text", "kind:image-a", "kind:image-b", "kind:text"]
    assert result["results"]["1.0"]["kind:image-b"]["MRR@10"] == pytest.approx(100.0)
    # at keep 0.0 the pixel-blind encoder finds a dropped positive at index i with rank i + 1 (ties
    # rank by corpus index), so "kind:image-a" (documents 8..13) scores 1/9, 1/10, then 0
    zero = result["results"]["0.0"]
    assert zero["kind:image-a"]["MRR@10"] == pytest.approx(100 * (1 / 9 + 1 / 10) / 6)
    assert zero["kind:image-b"]["MRR@10"] == pytest.approx(0.0) and zero["kind:text"]["MRR@10"] == pytest.approx(100.0)
    assert zero["text"] == zero["kind:text"]
    table = format_table(result)
    assert re.search(r"0\.0\s+kind:image-a\s+6\s", table) and len(table.splitlines()) == 3 + 2 * 6

    # a tiny real model: the same groups, every positive in the top 100 of a 21-document corpus
    tiny = evaluate(tiny_encoders("decoder"), ds, caption_keep=(1.0, 0.0), batch_size=8)
    assert tiny["n_queries_by_kind"] == result["n_queries_by_kind"]
    for groups in tiny["results"].values():
        assert list(groups) == list(result["results"]["1.0"])
        assert all(groups[g]["Recall@100"] == pytest.approx(100.0) for g in groups)


def same_caption_dataset() -> RetrievalDataset:
    """Two captions, three images each (different bytes, pixels labelled like their caption), plus
    a document whose image bytes repeat another's (not a pair of two images)."""
    images = {f"img{k}": make_image_bytes(seed=100 + k) for k in range(6)}
    docs = [Document(id=f"d{k}", modality="image", text=f"a scan of lab{1 + k // 3}", image_ids=[f"img{k}"])
            for k in range(6)]
    docs.append(Document(id="d_dup", modality="image", text="a scan of lab2", image_ids=["img_dup"]))
    images["img_dup"] = images["img5"]
    return RetrievalDataset(name="shared", documents=docs, queries={}, images=DictImageStore(images))


def test_same_caption_image_swap_shift(tiny_encoders):
    import copy

    import torch

    ds = same_caption_dataset()
    labels = {ds.images.get(f"img{k}"): 1 + k // 3 for k in range(6)}

    def shift(encoder, **kw):
        mc = diagnostics(encoder, ds, **kw)["modality_collapse"]
        return mc["same_caption_image_swap_shift"], mc["same_caption_pairs"], mc["image_swap_shift"]

    # d0-d1, d1-d2, d3-d4, d4-d5; d5-d_dup has identical image bytes and does not count
    assert shift(LabelEncoder("text", labels)) == (pytest.approx(0.0), 4, pytest.approx(0.0))
    assert shift(LabelEncoder("pixels", {**labels, **{ds.images.get(f"img{k}"): 10 + k for k in range(6)}}))[:2] == (
        pytest.approx(1.0), 4)
    # reacts to a contradicting image (the random swap moves it) but not to images that fit the
    # caption: only the same-caption shift shows that the pixels are ignored
    same, _, swapped = shift(LabelEncoder("contradiction", labels), seed=0)
    assert same == pytest.approx(0.0) and swapped > 0.3
    assert shift(LabelEncoder("text", labels), max_items=2)[1] == 1  # at most max_items // 2 pairs

    # tiny late fusion: its image head adds the pixels to the caption; zeroed, the image is ignored
    late = tiny_encoders("late")
    assert shift(late)[0] > 1e-4
    blind = copy.deepcopy(late)
    with torch.no_grad():
        blind.model.fusion_stage.image_head.weight.zero_()
        blind.model.fusion_stage.image_head.bias.zero_()
    assert shift(blind)[0] == pytest.approx(0.0, abs=1e-6)
    assert shift(tiny_encoders("decoder"))[0] > 1e-4


def test_diagnostics_needs_captioned_images(dataset):
    small = RetrievalDataset(name="few", documents=dataset.documents[:N_TEXT + 1], queries={}, images=dataset.images)
    with pytest.raises(DataError, match="at least 2"):
        diagnostics(LabelEncoder("text", {}), small)


# ---- the command ----------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path, tiny_encoders):
    from mimic_engine.checkpoint import save_checkpoint

    enc = tiny_encoders("decoder")
    return save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer, {"step": 0})


@pytest.fixture
def fake_loader(monkeypatch, dataset):
    import mimic_engine.data

    calls = []

    def load_dataset(kind, data_dir=None):
        calls.append((kind, data_dir))
        return dataset

    monkeypatch.setattr(mimic_engine.data, "load_dataset", load_dataset, raising=False)
    return calls


def test_eval_command(tmp_path, checkpoint, fake_loader):
    from click.testing import CliRunner

    from mimic_engine.eval_cli import eval_command

    out = tmp_path / "res.json"
    res = CliRunner().invoke(eval_command, [checkpoint, "--data", "jsonl", "--data-dir", str(tmp_path),
                                            "--caption-keep", "1.0,0.25", "--json", str(out), "--max-queries", "10",
                                            "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert fake_loader == [("jsonl", str(tmp_path))]
    assert "NDCG@10" in res.output and "0.25" in res.output and "modality collapse" in res.output
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["1.0", "0.25"] and report["n_queries"] == 10
    assert report["diagnostics"]["n_items"] == N_IMAGE
    assert report["diagnostics"]["modality_collapse"]["same_caption_pairs"] == 0
    assert report["n_queries_by_kind"] == {}
    assert len(report["model_id"]) == 64 and report["config"]["fusion"] == "decoder"

    res = CliRunner().invoke(eval_command, [checkpoint, "--data", "demo", "--no-diagnostics", "--caption-keep", "0"])
    assert res.exit_code == 0, res.output
    assert "modality collapse" not in res.output and fake_loader[-1] == ("demo", None)


@pytest.mark.parametrize("bad", ["abc", "1.0,1.5", "-0.1", ","])
def test_eval_command_bad_caption_keep(checkpoint, fake_loader, bad):
    from click.testing import CliRunner

    from mimic_engine.eval_cli import eval_command

    res = CliRunner().invoke(eval_command, [checkpoint, "--data", "demo", "--caption-keep", bad])
    assert res.exit_code == 2
    assert "--caption-keep" in res.output
    assert "[0, 1]" in res.output or "list of numbers" in res.output
    assert fake_loader == []
