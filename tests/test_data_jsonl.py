"""JSONL reader for users' own corpora: paths and base64 images, queries, and errors with file:line."""
from __future__ import annotations

import base64
import json
import logging

import pytest

from mimic_engine.data import load_dataset
from mimic_engine.data.jsonl import read_jsonl
from mimic_engine.errors import ConfigError, DataError


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def corpus(tmp_path, image_bytes):
    imgs = {"a": image_bytes(1), "b": image_bytes(2), "c": image_bytes(3), "q": image_bytes(4)}
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(imgs["a"])
    (tmp_path / "img" / "q.png").write_bytes(imgs["q"])
    write_lines(tmp_path / "corpus.jsonl", [
        {"id": "t1", "text": "A passage about cats.", "title": "Cats", "metadata": {"source": "wiki"}},
        {"id": "i1", "image": "img/a.png", "caption": "a cat"},
        {"id": "i2", "images": [base64.b64encode(imgs["b"]).decode()], "text": "caption given as text"},
        "",
        {"id": 7, "image": "data:image/png;base64," + base64.b64encode(imgs["c"]).decode()},
    ])
    write_lines(tmp_path / "queries_train.jsonl", [
        {"id": "q1", "text": "cats?", "positives": ["t1"], "negatives": ["i2"], "kind": "text"},
        {"id": "q2", "image": "img/q.png", "positives": ["i1", "7"], "answers": ["cat"]},
    ])
    write_lines(tmp_path / "queries_test.jsonl", [{"id": "q3", "text": "x", "positives": ["i2"]}])
    return tmp_path, imgs


def test_reads_documents_queries_and_images(corpus):
    folder, imgs = corpus
    ds = load_dataset("jsonl", folder)
    assert [d.id for d in ds.documents] == ["t1", "i1", "i2", "7"]
    assert [d.modality for d in ds.documents] == ["text", "image", "image", "image"]
    assert ds.doc("t1").metadata == {"source": "wiki"} and ds.doc("t1").title == "Cats"
    assert ds.doc("i1").text == "a cat" and ds.doc("i2").text == "caption given as text" and ds.doc("7").text is None
    for doc_id, key in (("i1", "a"), ("i2", "b"), ("7", "c")):
        assert ds.doc(doc_id).to_item(ds.images).images[0] == imgs[key]
    assert ds.doc("i1").to_item(ds.images, keep_caption=False).text is None
    assert sorted(ds.queries) == ["test", "train"]
    q1, q2 = ds.split("train")
    assert q1.negatives == ["i2"] and q1.image_ids == [] and q1.kind == "text" and q2.kind is None
    assert q2.text is None and q2.to_item(ds.images).images[0] == imgs["q"] and q2.answers == ["cat"]
    assert ds.qrels("train")["q2"] == {"i1": 1, "7": 1}


def test_unknown_positive_warns_or_fails_when_strict(corpus, caplog):
    folder, _ = corpus
    write_lines(folder / "queries_dev.jsonl", [{"id": "d1", "text": "x", "positives": ["t1", "nope"]},
                                               {"id": "d2", "text": "y", "positives": ["nope"]}])
    with caplog.at_level(logging.WARNING, logger="mimic_engine.data"):
        ds = read_jsonl(folder)
    assert [q.positives for q in ds.split("dev")] == [["t1"]]
    assert "2 x positive not in corpus" in caplog.text and "queries_dev.jsonl:1" in caplog.text
    with pytest.raises(DataError, match=r"queries_dev\.jsonl:1: query 'd1': positive 'nope'"):
        read_jsonl(folder, strict=True)


@pytest.mark.parametrize("line, pattern", [
    ('{"id": "x", "text": ', r"corpus\.jsonl:2: not valid JSON"),
    ('["x"]', r"corpus\.jsonl:2: expected a JSON object, got list"),
    ({"id": "x"}, r"corpus\.jsonl:2: document 'x' has neither text nor an image"),
    ({"text": "x"}, r"corpus\.jsonl:2: id must be a non-empty string or integer id, got None"),
    ({"id": "t0", "text": "again"}, r"corpus\.jsonl:2: document id 't0' already used at line 1"),
    ({"id": "x", "image": "img/missing.png"}, r"corpus\.jsonl:2: image 0: 'img/missing.png' is not a file \(looked for .*img/missing\.png\)"),
    ({"id": "x", "caption": "c"}, r"corpus\.jsonl:2: 'caption' describes an image"),
    ({"id": "x", "text": "t", "image": "img/a.png", "images": ["img/a.png"]}, r"either 'image' or 'images'"),
    ({"id": "x", "text": "t", "txt": "typo"}, r"corpus\.jsonl:2: unknown field\(s\) \['txt'\]"),
    ({"id": "x", "text": "t", "metadata": [1]}, r"metadata must be an object"),
    ({"id": "x", "image": "data:image/png;base64,@@@"}, r"the data: URL is not valid base64"),
])
def test_corpus_errors_name_file_and_line(tmp_path, line, pattern):
    write_lines(tmp_path / "corpus.jsonl", [{"id": "t0", "text": "first"}, line])
    with pytest.raises(DataError, match=pattern):
        read_jsonl(tmp_path)


@pytest.mark.parametrize("line, pattern", [
    ({"id": "q", "positives": ["t0"]}, r"queries_train\.jsonl:1: query 'q' has neither text nor an image"),
    ({"id": "q", "text": "x"}, r"queries_train\.jsonl:1: missing field 'positives'"),
    ({"id": "q", "text": "x", "positives": "t0"}, r"positives must be a list of ids"),
    ({"id": "q", "text": "x", "positives": ["t0"], "answers": "a"}, r"answers must be a list of strings"),
    ({"id": "q", "text": "x", "positives": ["t0"], "kind": ""}, r"queries_train\.jsonl:1: kind must be a non-blank"),
    ({"id": "q", "text": "x", "positives": ["t0"], "kinds": "text"}, r"unknown field\(s\) \['kinds'\]"),
])
def test_query_errors(tmp_path, line, pattern):
    write_lines(tmp_path / "corpus.jsonl", [{"id": "t0", "text": "first"}])
    write_lines(tmp_path / "queries_train.jsonl", [line])
    with pytest.raises(DataError, match=pattern):
        read_jsonl(tmp_path)


def test_missing_corpus_and_bad_options(tmp_path):
    with pytest.raises(DataError, match="corpus.jsonl not found"):
        read_jsonl(tmp_path)
    with pytest.raises(ConfigError, match="needs a data folder"):
        load_dataset("jsonl")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['strictness'\]"):
        load_dataset("jsonl", tmp_path, strictness=True)
