"""WebQA reader on small fixtures written here: images read by byte offset, qrels, and the errors."""
from __future__ import annotations

import base64
import json
import logging
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest

from mimic_engine.data.webqa import TsvImageStore, read_qrels, read_webqa
from mimic_engine.errors import DataError

IMAGE_IDS = ["101", "102", "103"]


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_tsv(folder, images: dict[str, bytes]):
    """imgs.tsv + imgs.lineidx.new exactly as released: id<TAB>base64, id<TAB>byte offset."""
    offsets, blob = {}, b""
    for image_id, data in images.items():
        offsets[image_id] = len(blob)
        blob += image_id.encode() + b"\t" + base64.b64encode(data) + b"\n"
    (folder / "imgs.tsv").write_bytes(blob)
    (folder / "imgs.lineidx.new").write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items()))
    return offsets


@pytest.fixture
def webqa(tmp_path, image_bytes):
    images = {k: image_bytes(seed=i, size=(20 + i, 16)) for i, k in enumerate(IMAGE_IDS)}
    write_tsv(tmp_path, images)
    write_lines(tmp_path / "all_imgs.json", [  # 103 has no metadata -> no caption
        {"title": "Cat", "caption": "a grey cat", "image_id": 101},
        {"title": "Dog", "caption": "a brown dog", "image_id": 102},
    ])
    write_lines(tmp_path / "all_docs.json", [
        {"title": "Cats", "fact": "Cats purr.", "url": "u1", "snippet_id": "s1"},
        {"title": "Dogs", "fact": "Dogs bark.", "url": "u2", "snippet_id": "s2"},
        {"title": "Fish", "fact": "Fish swim.", "url": "u3", "snippet_id": "s3"},
    ])
    q = dict(A=["x"], img_negFacts=[], txt_negFacts=[])
    write_lines(tmp_path / "train.json", [
        {**q, "qid": "t1", "Q": "what does a cat look like", "img_posFacts": [101], "txt_posFacts": [],
         "img_negFacts": [102], "txt_negFacts": ["s3"]},
        {**q, "qid": "t2", "Q": "do dogs bark", "img_posFacts": [], "txt_posFacts": ["s2"]},
    ])
    write_lines(tmp_path / "dev.json", [
        {**q, "qid": "d1", "Q": "show a dog", "img_posFacts": [102], "txt_posFacts": []},
        {**q, "qid": "d2", "Q": "fish?", "img_posFacts": [], "txt_posFacts": ["s3"]},
    ])
    (tmp_path / "dev_qrels.txt").write_text("d1\t102\t1\nd2\ts3\t1\n")
    return tmp_path, images


def test_reads_corpus_queries_and_images_by_offset(webqa):
    folder, images = webqa
    ds = read_webqa(folder)
    assert [d.id for d in ds.documents] == ["s1", "s2", "s3", "101", "102", "103"]
    assert ds.doc("s2").modality == "text" and ds.doc("s2").text == "Dogs bark."
    assert ds.doc("101").modality == "image" and ds.doc("101").text == "a grey cat" and ds.doc("101").title == "Cat"
    assert ds.doc("103").text is None  # in lineidx, no all_imgs.json metadata
    assert sorted(ds.queries) == ["dev", "train"]
    t1 = ds.split("train")[0]
    assert t1.positives == ["101"] and t1.negatives == ["102", "s3"] and t1.answers == ["x"]
    assert ds.qrels("dev") == {"d1": {"102": 1}, "d2": {"s3": 1}}
    assert ds.positive_modality(ds.split("dev")[0]) == "image"
    for image_id in reversed(IMAGE_IDS):  # any order: each read seeks to its own offset
        assert ds.images.get(image_id) == images[image_id]
    item = ds.doc("102").to_item(ds.images)
    assert item.text == "a brown dog" and item.images[0] == images["102"]


def test_store_is_thread_safe_and_picklable(webqa):
    folder, images = webqa
    store = TsvImageStore(folder / "imgs.tsv", folder / "imgs.lineidx.new")
    ids = IMAGE_IDS * 200
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(store.get, ids))
    assert got == [images[i] for i in ids]
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get("102") == images["102"] and len(clone) == 3 and "103" in clone and "999" not in clone


def test_missing_image_id_is_a_clear_error(webqa):
    folder, _ = webqa
    store = TsvImageStore(folder / "imgs.tsv", folder / "imgs.lineidx.new")
    with pytest.raises(DataError, match=r"'999' is not in .*imgs\.lineidx\.new"):
        store.get("999")


def test_lineidx_that_does_not_match_the_tsv(webqa):
    folder, _ = webqa
    lines = (folder / "imgs.lineidx.new").read_text().splitlines()
    offsets = [ln.split("\t")[1] for ln in lines]
    swapped = [f"101\t{offsets[1]}", f"102\t{offsets[0]}", lines[2]]
    (folder / "imgs.lineidx.new").write_text("\n".join(swapped) + "\n")
    store = TsvImageStore(folder / "imgs.tsv", folder / "imgs.lineidx.new")
    with pytest.raises(DataError, match=r"holds image id '102', but .* maps '101'"):
        store.get("101")


@pytest.mark.parametrize("line, pattern", [
    ("102 17", r"imgs\.lineidx\.new:2: expected 'image_id<TAB>byte offset'"),
    ("102\tabc", r"imgs\.lineidx\.new:2: byte offset 'abc'"),
    ("102\t999999", r"imgs\.lineidx\.new:2: byte offset 999999 .* outside"),
    ("101\t0", r"imgs\.lineidx\.new:2: image id '101' is listed twice"),
])
def test_malformed_lineidx(webqa, line, pattern):
    folder, _ = webqa
    first = (folder / "imgs.lineidx.new").read_text().splitlines()[0]
    (folder / "imgs.lineidx.new").write_text(f"{first}\n{line}\n")
    with pytest.raises(DataError, match=pattern):
        read_webqa(folder)


def test_malformed_json_line_names_file_and_line(webqa):
    folder, _ = webqa
    with open(folder / "all_docs.json", "a") as fh:
        fh.write('{"title": "broken", "fact": \n')
    with pytest.raises(DataError, match=r"all_docs\.json:4: not valid JSON"):
        read_webqa(folder)


def test_missing_field_and_duplicate_id(webqa):
    folder, _ = webqa
    write_lines(folder / "all_docs.json", [{"title": "a", "fact": "b"}])
    with pytest.raises(DataError, match=r"all_docs\.json:1: snippet_id must be"):
        read_webqa(folder)
    write_lines(folder / "all_docs.json", [{"fact": "b", "snippet_id": "s"}, {"fact": "c", "snippet_id": "s"}])
    with pytest.raises(DataError, match=r"all_docs\.json:2: snippet_id 's' already used at .*all_docs\.json:1"):
        read_webqa(folder)


def test_query_kind(webqa):
    folder, _ = webqa
    q = dict(A=["x"], img_posFacts=[102], img_negFacts=[], txt_posFacts=[], txt_negFacts=[])
    write_lines(folder / "dev.json", [{**q, "qid": "d1", "Q": "a dog", "kind": "pixel-only"},
                                      {**q, "qid": "d2", "Q": "another dog"}])
    (folder / "dev_qrels.txt").unlink()
    assert [q.kind for q in read_webqa(folder).split("dev")] == ["pixel-only", None]  # optional
    for bad, pattern in ((" ", r"dev\.json:1: kind must be a non-blank string"), (3, r"dev\.json:1: kind must be a string")):
        write_lines(folder / "dev.json", [{**q, "qid": "d1", "Q": "a dog", "kind": bad}])
        with pytest.raises(DataError, match=pattern):
            read_webqa(folder)


def test_json_array_is_refused_with_a_fix(webqa):
    folder, _ = webqa
    (folder / "all_imgs.json").write_text(json.dumps([{"caption": "c", "image_id": 101}], indent=1))
    with pytest.raises(DataError, match=r"all_imgs\.json:1: this file is a JSON array; expected JSON lines"):
        read_webqa(folder)


def test_missing_positive_warns_and_drops_or_fails_when_strict(webqa, caplog):
    folder, _ = webqa
    write_lines(folder / "train.json", [
        {"qid": "t1", "Q": "q", "A": [], "img_posFacts": [101, 555], "txt_posFacts": [], "img_negFacts": [777]},
        {"qid": "t2", "Q": "q", "A": [], "img_posFacts": [556], "txt_posFacts": []},
    ])
    with caplog.at_level(logging.WARNING, logger="mimic_engine.data"):
        ds = read_webqa(folder)
    assert [q.id for q in ds.split("train")] == ["t1"]  # t2 had no positive left
    assert ds.split("train")[0].positives == ["101"] and ds.split("train")[0].negatives == []
    log = caplog.text
    assert "2 x positive not in corpus" in log and "1 x query without positives" in log and "train.json:1" in log
    with pytest.raises(DataError, match=r"train\.json:1: query 't1': positive '555' is not a document"):
        read_webqa(folder, strict=True)


def test_qrels_win_over_json_and_disagreement_is_reported(webqa, caplog):
    folder, _ = webqa
    (folder / "dev_qrels.txt").write_text("d1\t101\t1\nd1\t102\t1\nd2\ts3\t1\nd9\ts1\t1\n")
    with caplog.at_level(logging.WARNING, logger="mimic_engine.data"):
        ds = read_webqa(folder)
    assert ds.qrels("dev")["d1"] == {"101": 1, "102": 1}
    assert "qrels disagreeing with json" in caplog.text and "qrels of unknown query" in caplog.text


def test_qrels_format(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("a\td1\t1\na\td2\t0\nb\td3\t1\n")
    assert read_qrels(path) == {"a": (1, ["d1"]), "b": (3, ["d3"])}
    path.write_text("a\t0\td1\t1\n")
    with pytest.raises(DataError, match=r"q\.txt:1: expected 3 columns .*4-column TREC form"):
        read_qrels(path)


def test_mined_train_file_gives_hard_negatives(webqa):
    folder, _ = webqa
    write_lines(folder / "train_all.json", [{"qid": "t1", "Q": "q", "A": "yes", "img_posFacts": [101], "txt_posFacts": [],
                                             "all_negFacts": ["s1", 103]}])
    q = read_webqa(folder, train_file="train_all.json").split("train")[0]
    assert q.hard_negatives == ["s1", "103"] and q.answers == ["yes"]
    with pytest.raises(DataError, match="train_none.json not found"):
        read_webqa(folder, train_file="train_none.json")


def test_folder_without_corpus(tmp_path):
    with pytest.raises(DataError, match="no corpus found"):
        read_webqa(tmp_path)
    (tmp_path / "imgs.lineidx.new").write_text("1\t0\n")
    with pytest.raises(DataError, match=r"imgs\.tsv, which is missing"):
        read_webqa(tmp_path)
