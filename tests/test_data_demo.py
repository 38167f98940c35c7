"""The demo corpus: deterministic bytes, read back through the WebQA reader, and a design that
separates the splits (no dev/test pixels or numbers in training), shows the ink colour only in the
pixels and the writer only in the caption, and gives each query kind the facts it needs."""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections import Counter, defaultdict

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


def kind_counts(ds):
    return {split: dict(Counter(q.kind for q in qs)) for split, qs in ds.queries.items()}


EXPECTED_KINDS = {"train": {"conjunctive": 320, "pixel-only": 320, "caption-only": 320, "text": 600},
                  "dev": {"conjunctive": 160, "pixel-only": 80, "caption-only": 80, "text": 200},
                  "test": {"conjunctive": 160, "pixel-only": 80, "caption-only": 80, "text": 200}}


def test_read_back_with_webqa_reader(built):
    ds = read_webqa(built, strict=True)  # strict: every id resolves, qrels agree with the json
    assert Counter(d.modality for d in ds.documents) == {"image": 1797, "text": 1000}
    assert kind_counts(ds) == EXPECTED_KINDS  # every kind in every split, tens of queries at least
    for qs in ds.queries.values():
        for q in qs:  # "mixed" would show up here
            assert ds.positive_modality(q) == ("text" if q.kind == "text" else "image")
            assert all(ds.doc(n).modality == ds.positive_modality(q) for n in q.negatives)
            assert len(q.negatives) == demo.N_NEGATIVES
    info = json.loads((built / "demo_info.json").read_text())
    assert info["version"] == demo.FORMAT_VERSION == 2 and info["kinds"] == list(demo.KINDS)
    assert info["counts"]["dev_conjunctive_queries"] == 160 and info["counts"]["test_text_queries"] == 200
    from PIL import Image
    img = Image.open(io.BytesIO(ds.images.get(ds.documents[-1].id)))
    assert img.size == (32, 32) and img.format == "PNG" and img.mode == "RGB"


def test_splits_do_not_leak(built):
    ds = read_webqa(built)
    train_images = {d for q in ds.split("train") if q.kind != "text" for d in q.positives + q.negatives}
    heldout = {d for s in ("dev", "test") for q in ds.split(s) if q.kind != "text" for d in q.positives}
    assert len(heldout) == 1797  # dev/test relevance is the whole class
    assert 0.55 * 1797 < len(train_images) < 0.65 * 1797  # train queries only see the train pool

    def number(doc_id):
        return int(doc_id.split("-")[1])
    for split, rest in (("dev", 3), ("test", 4)):
        for q in ds.split(split):
            if q.kind == "text":
                assert len(q.positives) == 1 and number(q.positives[0]) % 5 == rest
                assert all(number(n) % 5 == rest for n in q.negatives)
    for q in ds.split("train"):
        if q.kind == "text":
            assert all(number(d) % 5 < 3 for d in q.positives + q.negatives)
    # unseen phrasings: no dev/test query text is a train query text
    train_texts = {q.text for q in ds.split("train")}
    assert not any(q.text in train_texts for s in ("dev", "test") for q in ds.split(s))


def words_of(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+|[0-9]", text)


def named_facts(text: str) -> dict:
    """The digit, ink colour and writer a caption or query names (None where it names none)."""
    words = words_of(text)
    digits = {int(w) if w.isdigit() else demo.DIGIT_WORDS.index(w)
              for w in words if w.isdigit() or w in demo.DIGIT_WORDS}
    colours = {w for w in words if w.lower() in demo.INK_COLOURS}
    writers = {w for w in words if w in demo.WRITERS}
    assert len(digits) == 1 and len(colours) <= 1 and len(writers) <= 1, text
    return {"digit": digits.pop(), "colour": colours.pop() if colours else None,
            "writer": writers.pop() if writers else None}


def ink_colour(png: bytes) -> str:
    """The ink colour the pixels show: the most inked pixel's nearest ink colour (it must be close)."""
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float).reshape(-1, 3)
    darkest = arr[np.argmax((255 - arr).sum(axis=1))]
    dist = {name: np.linalg.norm(darkest - np.asarray(rgb)) for name, rgb in demo.INK_COLOURS.items()}
    name = min(dist, key=dist.get)
    assert dist[name] < 60, (darkest, dist)
    return name


@pytest.fixture(scope="module")
def truth(built):
    """image id -> (digit, colour, writer): digit and writer from the caption, colour from the pixels."""
    ds = read_webqa(built)
    out = {}
    for d in ds.documents_of("image"):
        facts = named_facts(d.text)
        assert facts["colour"] is None and facts["writer"] is not None, d.text  # captions never name the colour
        out[d.id] = (facts["digit"], ink_colour(ds.images.get(d.id)), facts["writer"])
    return out


def test_captions_and_pixels_carry_different_facts(built, truth):
    ds = read_webqa(built)
    assert not any(w.lower() in demo.INK_COLOURS or w.lower() in ("ink", "colour", "color")
                   for d in ds.documents_of("image") for w in words_of(d.text))
    cells = Counter(truth.values())
    assert len(cells) == 10 * 4 * 4 and all(10 <= n <= 12 for n in cells.values())  # balanced, independent
    assert set(Counter(c for _, c, _ in truth.values()).values()) <= set(range(445, 455))
    # one digit's scans differ by colour: each colour's mean ink (255 - pixel) points its own way
    from PIL import Image
    mean_ink = {}
    for colour in demo.INK_COLOURS:
        arrs = [255 - np.asarray(Image.open(io.BytesIO(ds.images.get(i))), float) for i, t in truth.items()
                if t[:2] == (7, colour)]
        mean_ink[colour] = np.mean(arrs, axis=(0, 1, 2))  # (3,) per channel
    for colour, rgb in demo.INK_COLOURS.items():
        expected = 255 - np.asarray(rgb, dtype=float)
        cos = {c: v @ expected / np.linalg.norm(v) / np.linalg.norm(expected) for c, v in mean_ink.items()}
        assert max(cos, key=cos.get) == colour and cos[colour] > 0.99
    # the pixels of one cell are different scans
    assert len({ds.images.get(i) for i in truth}) == 1797


def test_query_kinds_need_their_facts(built, truth):
    ds = read_webqa(built)
    train_pool = {d for q in ds.split("train") if q.kind != "text" for d in q.positives + q.negatives}
    fields = {"conjunctive": ("digit", "colour", "writer"), "pixel-only": ("digit", "colour"),
              "caption-only": ("digit", "writer")}
    index = {"digit": 0, "colour": 1, "writer": 2}

    def grouped(pool):
        """(fact names, their values) -> the ids in `pool` that have them"""
        out = defaultdict(set)
        for i in pool:
            for which in (("digit",), ("digit", "colour"), ("digit", "writer"), ("digit", "colour", "writer")):
                out[which, tuple(truth[i][index[f]] for f in which)].add(i)
        return out
    groups = {"train": grouped(train_pool), "all": grouped(truth)}

    for split, qs in ds.queries.items():
        pool = train_pool if split == "train" else set(truth)
        images = groups["train" if split == "train" else "all"]
        for q in qs:
            if q.kind == "text":
                continue
            named = {f: v for f, v in named_facts(q.text).items() if v is not None}
            assert tuple(named) == fields[q.kind], (q.kind, q.text)

            def having(*which):
                return images[which, tuple(named[f] for f in which)]
            positives = set(q.positives)
            assert positives == having(*named)
            caption_side = having(*(f for f in named if f != "colour"))  # what the captions tell apart
            pixel_side = having(*(f for f in named if f != "writer"))  # what the pixels show
            if q.kind == "conjunctive":  # neither modality alone singles the positives out
                assert positives < caption_side and positives < pixel_side
                assert len(positives) <= (7 if split == "train" else 12)
            elif q.kind == "pixel-only":  # the caption cannot tell the colour; the pixels alone suffice
                assert positives < caption_side and positives == pixel_side
            else:  # caption-only: no pixel shows the writer; the caption alone suffices
                assert positives == caption_side and positives < pixel_side
            # negatives differ from the class in exactly one named fact: 2 for each of the last two
            differs = [[f for f in named if truth[n][index[f]] != named[f]] for n in q.negatives]
            assert all(len(d) == 1 for d in differs) and all(n in pool for n in q.negatives)
            assert sorted(d[0] for d in differs) == sorted(2 * list(fields[q.kind][-2:]))


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
    assert len(load_dataset("demo", target, strict=True).split("dev")) == 520
    with pytest.raises(DataError, match="seed 0, but version 2 with seed 3 was asked for"):
        load_dataset("demo", target, seed=3)


def test_earlier_version_cache_is_rebuilt(built, tmp_path):
    old = tmp_path / "demo"
    shutil.copytree(built, old)
    info = json.loads((old / "demo_info.json").read_text())
    (old / "demo_info.json").write_text(json.dumps({**info, "version": 1}))
    (old / "train.json").write_text((old / "train.json").read_text().replace('"kind": "conjunctive"', '"kind": "old"'))
    ds = load_dataset("demo", old)  # never reused: rebuilt as the current version
    assert hashes(old) == hashes(built) and kind_counts(ds) == EXPECTED_KINDS
    (old / "demo_info.json").write_text(json.dumps({**info, "version": 3}))  # a newer mimic-engine's: left alone
    with pytest.raises(DataError, match="version 3 with seed 0, but version 2 with seed 0"):
        load_dataset("demo", old)


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


def test_cli_command(built, tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "d"
    shutil.copytree(built, out)
    info = json.loads((out / "demo_info.json").read_text())
    (out / "demo_info.json").write_text(json.dumps({**info, "version": 1}))
    res = CliRunner().invoke(demo.demo_command, ["--out", str(out)])  # an earlier version: rebuilt without --force
    assert res.exit_code == 0, res.output
    assert "built" in res.output and "version 2" in res.output and hashes(out) == hashes(built)
    assert "1797 images" in res.output and "4 ink colours" in res.output and "1000 text facts" in res.output
    lines = res.output.splitlines()
    assert next(ln for ln in lines if ln.startswith("split")).split()[1:5] == list(demo.KINDS)
    assert [ln.split()[1:5] for ln in lines if ln.startswith(("train", "dev ", "test"))] == [
        ["320", "320", "320", "600"], ["160", "80", "80", "200"], ["160", "80", "80", "200"]]
    res = CliRunner().invoke(demo.demo_command, ["--out", str(out)])
    assert res.exit_code == 0 and "already present" in res.output and "--force" in res.output
    res = CliRunner().invoke(demo.demo_command, ["--out", str(out), "--force"])
    assert res.exit_code == 0 and "built" in res.output and hashes(out) == hashes(built)
