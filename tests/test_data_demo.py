"""The demo corpus: deterministic bytes, read back through the WebQA reader, and a design that
separates the splits (no dev/test pixels or numbers in training) and labels weight by real ink."""
from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict

import numpy as np
import pytest

from mimic_engine.data import default_demo_dir, default_home, load_dataset
from mimic_engine.data import demo
from mimic_engine.data.webqa import read_webqa
from mimic_engine.errors import DataError


def hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.build_demo_corpus(root / "a", seed=0)
    return root / "a"


def test_deterministic_bytes(built, tmp_path):
    demo.build_demo_corpus(tmp_path / "b", seed=0)
    assert hashes(built) == hashes(tmp_path / "b")
    assert set(hashes(built)) == {"all_docs.json", "all_imgs.json", "imgs.tsv", "imgs.lineidx.new", "train.json",
                                  "dev.json", "test.json", "dev_qrels.txt", "test_qrels.txt", "demo_info.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_read_back_with_webqa_reader(built):
    ds = read_webqa(built, strict=True)  # strict: every id resolves, qrels agree with the json
    mods = defaultdict(int)
    for d in ds.documents:
        mods[d.modality] += 1
    assert mods == {"image": 1797, "text": 1000}
    counts = {s: defaultdict(int) for s in ds.queries}
    for split, qs in ds.queries.items():
        for q in qs:
            counts[split][ds.positive_modality(q)] += 1  # "mixed" would show up here
    assert {s: dict(c) for s, c in counts.items()} == {
        "train": {"image": 320, "text": 600}, "dev": {"image": 40, "text": 200}, "test": {"image": 40, "text": 200}}
    assert json.loads((built / "demo_info.json").read_text())["counts"]["dev_text_queries"] == 200
    from PIL import Image
    img = Image.open(io.BytesIO(ds.images.get(ds.documents[-1].id)))
    assert img.size == (32, 32) and img.format == "PNG"


def test_splits_do_not_leak(built):
    ds = read_webqa(built)
    train_images = {d for q in ds.split("train") if ds.positive_modality(q) == "image" for d in q.positives + q.negatives}
    heldout = {d for s in ("dev", "test") for q in ds.split(s) if ds.positive_modality(q) == "image" for d in q.positives}
    assert len(heldout) == 1797  # dev/test relevance is the whole class
    assert 0.55 * 1797 < len(train_images) < 0.65 * 1797  # train queries only see the train pool
    for q in ds.split("dev"):
        if ds.positive_modality(q) == "image":
            assert 85 <= len(q.positives) <= 92

    def number(doc_id):
        return int(doc_id.split("-")[1])
    for split, rest in (("dev", 3), ("test", 4)):
        for q in ds.split(split):
            if ds.positive_modality(q) == "text":
                assert len(q.positives) == 1 and number(q.positives[0]) % 5 == rest
                assert all(number(n) % 5 == rest for n in q.negatives)
    for q in ds.split("train"):
        if ds.positive_modality(q) == "text":
            assert all(number(d) % 5 < 3 for d in q.positives + q.negatives)
    # unseen phrasings: no dev/test image query text is a train query text
    train_texts = {q.text for q in ds.split("train")}
    assert not any(q.text in train_texts for s in ("dev", "test") for q in ds.split(s))


def test_weight_labels_follow_the_ink(built):
    """Captions say light/bold; the pixels agree: per digit, 'bold' scans carry more ink."""
    from PIL import Image

    ds = read_webqa(built)
    words = {w: set(a) for w, a in demo.CAPTION_ADJECTIVES.items()}
    ink = defaultdict(list)  # (digit, weight) -> mean darkness
    for i, d in enumerate(ds.documents_of("image")):
        weight = next(w for w, adjs in words.items() if any(f" {a} " in f" {d.text} " for a in adjs))
        digit = next(k for k in range(10) if str(k) in d.text.split() or demo.DIGIT_WORDS[k] in d.text.split())
        ink[(digit, weight)].append(255 - np.asarray(Image.open(io.BytesIO(ds.images.get(d.id))), float).mean())
    assert len(ink) == 20 and all(85 <= len(v) <= 92 for v in ink.values())
    for digit in range(10):
        assert np.mean(ink[(digit, "bold")]) > np.mean(ink[(digit, "light")]) + 5


def test_number_facts():
    assert demo.number_words(0) == "zero" and demo.number_words(47) == "forty-seven"
    assert demo.number_words(113) == "one hundred thirteen" and demo.number_words(190) == "one hundred ninety"
    assert demo.roman(199) == "CXCIX" and demo.roman(44) == "XLIV"
    assert demo.fact_answer("prime", 13) == ("is a prime number", "yes")
    assert demo.fact_answer("prime", 91)[1] == "no" and "7" in demo.fact_answer("prime", 91)[0]
    assert demo.fact_answer("roman", 0) is None


def test_load_dataset_builds_then_reuses(tmp_path, monkeypatch):
    target = tmp_path / "cache" / "demo"
    ds = load_dataset("demo", target)
    assert ds.name == "demo" and len(ds.documents) == 2797
    monkeypatch.setattr(demo, "build_demo_corpus", lambda *a, **k: pytest.fail("rebuilt an existing corpus"))
    assert len(load_dataset("demo", target, strict=True).split("dev")) == 240
    with pytest.raises(DataError, match="seed 0, but version 1 with seed 3 was asked for"):
        load_dataset("demo", target, seed=3)


def test_default_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("MIMIC_HOME", str(tmp_path / "home"))
    assert default_home() == tmp_path / "home" and default_demo_dir() == tmp_path / "home" / "demo"
    monkeypatch.delenv("MIMIC_HOME")
    assert default_home().parts[-2:] == (".cache", "mimic-engine")


def test_refuses_to_overwrite(built, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a demo corpus"):
        demo.build_demo_corpus(tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    demo.build_demo_corpus(tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(DataError, match="already holds the demo corpus"):
        demo.build_demo_corpus(tmp_path / "empty")


def test_cli_command(tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "d"
    res = CliRunner().invoke(demo.demo_command, ["--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "1797 images" in res.output and "1000 text facts" in res.output
    assert [ln.split()[1:3] for ln in res.output.splitlines() if ln.startswith(("train", "dev ", "test"))] == [
        ["320", "600"], ["40", "200"], ["40", "200"]]
    before = hashes(out)
    res = CliRunner().invoke(demo.demo_command, ["--out", str(out), "--force"])
    assert res.exit_code == 0 and "built" in res.output and hashes(out) == before
