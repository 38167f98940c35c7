"""EVQA reader on a small fixture written here: image+text queries, KB sections and KB images."""
from __future__ import annotations

import csv
import json
import logging

import pytest

from mimic_engine.data import load_dataset
from mimic_engine.data.evqa import cut, kb_image_key, read_evqa
from mimic_engine.errors import ConfigError, DataError

CAT, OWL = "https://en.wikipedia.org/wiki/Cat", "https://en.wikipedia.org/wiki/Owl"
COLUMNS = ["question", "answer", "dataset_image_ids", "dataset_name", "question_type", "wikipedia_url",
           "wikipedia_title", "evidence"]


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


@pytest.fixture
def evqa(tmp_path, image_bytes):
    kb = {
        CAT: {"title": "Cat", "url": CAT, "section_titles": ["Cat", "Behaviour", "Empty"],
              "section_texts": ["The cat is a small carnivore.", "Cats sleep a lot,\nand purr.", "  "],
              "image_urls": ["https://upload/cat1.jpg", "https://upload/cat2.jpg"],
              "image_reference_descriptions": ["A tabby cat", "A cat asleep"], "image_section_indices": [0, 1]},
        OWL: {"title": "Owl", "url": OWL, "section_titles": ["Owl"], "section_texts": ["Owls hunt at night."],
              "image_urls": [], "image_reference_descriptions": [], "image_section_indices": []},
    }
    (tmp_path / "encyclopedic_kb_wiki.json").write_text(json.dumps(kb))
    (tmp_path / "kb_images").mkdir()
    (tmp_path / "kb_images" / f"{kb_image_key('https://upload/cat1.jpg')}.jpg").write_bytes(image_bytes(5, fmt="JPEG"))
    (tmp_path / "images" / "inat").mkdir(parents=True)  # searched recursively
    query_images = {"q_a": image_bytes(1), "q_b": image_bytes(2), "q_c": image_bytes(3)}
    for k, v in query_images.items():
        (tmp_path / "images" / "inat" / f"{k}.png").write_bytes(v)
    write_csv(tmp_path / "train.csv", [
        {"question": "How long does this animal sleep?", "answer": "16 hours|all day", "dataset_image_ids": "q_a|q_b",
         "wikipedia_url": CAT, "question_type": "templated", "evidence": "a long,\nquoted cell"},
        {"question": "What eats the prey of this bird and of this cat?", "answer": "x", "dataset_image_ids": "q_c",
         "wikipedia_url": f"{CAT}|{OWL}", "question_type": "2_hop"},
    ])
    write_csv(tmp_path / "val.csv", [
        {"question": "When does it hunt?", "answer": "night", "dataset_image_ids": "q_c", "wikipedia_url": OWL},
        {"question": "Lost image?", "answer": "y", "dataset_image_ids": "q_missing", "wikipedia_url": OWL},
    ])
    return tmp_path, query_images


def test_documents_and_image_text_queries(evqa, caplog):
    folder, images = evqa
    with caplog.at_level(logging.WARNING, logger="mimic_engine.data"):
        ds = load_dataset("evqa", folder)
    ids = [d.id for d in ds.documents]
    # empty section skipped; cat2.jpg has no pixels -> no image document
    assert ids == [f"{CAT}#0", f"{CAT}#1", f"{CAT}#image0", f"{OWL}#0"]
    assert ds.doc(f"{CAT}#1").text == "Cat - Behaviour: Cats sleep a lot,\nand purr."
    img_doc = ds.doc(f"{CAT}#image0")
    assert img_doc.modality == "image" and img_doc.text == "A tabby cat" and img_doc.metadata["section"] == 0
    assert ds.images.get(img_doc.image_ids[0])[:2] == b"\xff\xd8"  # the JPEG bytes of the KB image
    assert "1 knowledge-base images have no file" in caplog.text

    assert sorted(ds.queries) == ["dev", "train"]  # val.csv -> dev
    q0, q1 = ds.split("train")
    assert q0.id == "train-0" and q0.image_ids == ["q_a"]  # max_query_images=1
    assert q0.answers == ["16 hours", "all day"]
    assert q0.positives == [f"{CAT}#0", f"{CAT}#1", f"{CAT}#image0"]
    assert q1.positives == [f"{CAT}#0", f"{CAT}#1", f"{CAT}#image0", f"{OWL}#0"]  # 2-hop: both pages
    item = q0.to_item(ds.images)
    assert item.text == "How long does this animal sleep?" and item.images[0] == images["q_a"]
    # the dev question without its image is dropped with a warning
    assert [q.id for q in ds.split("dev")] == ["dev-0"]
    assert "question without images" in caplog.text and "val.csv:3" in caplog.text


def test_options(evqa):
    folder, _ = evqa
    ds = read_evqa(folder, max_query_images=None, pages="referenced", max_section_chars=12)
    assert ds.split("train")[0].image_ids == ["q_a", "q_b"]
    assert ds.doc(f"{CAT}#0").text == "Cat - Cat:"  # cut at a word boundary
    with pytest.raises(DataError, match=r"val\.csv:3: none of the question's images"):
        read_evqa(folder, strict=True)
    with pytest.raises(ConfigError, match="pages='some'"):
        read_evqa(folder, pages="some")
    assert cut("abc def ghi", 9) == "abc def" and cut("abcdefghij", 4) == "abcd"


def test_kb_without_images_folder_is_text_only(evqa):
    folder, _ = evqa
    import shutil
    shutil.rmtree(folder / "kb_images")
    ds = read_evqa(folder)
    assert {d.modality for d in ds.documents} == {"text"}


def test_query_images_from_tsv(evqa, tmp_path):
    import shutil
    from tests.test_data_webqa import write_tsv

    folder, images = evqa
    shutil.rmtree(folder / "images")
    write_tsv(folder, images)
    ds = read_evqa(folder)
    assert ds.split("train")[1].to_item(ds.images).images[0] == images["q_c"]


def test_errors(evqa):
    folder, _ = evqa
    with open(folder / "test.csv", "w") as fh:
        fh.write("question,answer\nq,a\n")
    with pytest.raises(DataError, match=r"test\.csv:1: missing column\(s\) \['dataset_image_ids', 'wikipedia_url'\]"):
        read_evqa(folder)
    (folder / "test.csv").unlink()
    (folder / "encyclopedic_kb_wiki.json").write_text('{"a": [}')
    with pytest.raises(DataError, match=r"encyclopedic_kb_wiki\.json: not valid JSON \(parse error: unallowed token"):
        read_evqa(folder)
    (folder / "encyclopedic_kb_wiki.json").write_text('[{"a": 1}]')
    with pytest.raises(DataError, match=r"expected one JSON object mapping wikipedia_url -> page, found '\['"):
        read_evqa(folder)
    (folder / "encyclopedic_kb_wiki.json").unlink()
    with pytest.raises(DataError, match="knowledge base .* not found"):
        read_evqa(folder)


def test_knowledge_base_is_streamed_page_by_page(tmp_path):
    """Pages come out one at a time: the first is read before the parser reaches a broken tail (a
    whole-file json.load would hold the multi-GB release file in memory and fail before any page)."""
    from mimic_engine.data.evqa import _kb_pages

    path = tmp_path / "kb.json"
    path.write_bytes(b'{"https://en.wikipedia.org/wiki/Cat": {"title": "Cat", "section_titles": ["Cat"], '
                     b'"section_texts": ["A small carnivore."], "score": 0.5}, "https://broken": {"title": ')
    pages = _kb_pages(path)
    url, page = next(pages)
    assert url == "https://en.wikipedia.org/wiki/Cat" and page["section_texts"] == ["A small carnivore."]
    assert page["score"] == 0.5 and isinstance(page["score"], float)
    with pytest.raises(DataError, match="not valid JSON"):
        next(pages)
