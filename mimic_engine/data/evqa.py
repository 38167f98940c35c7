"""Reader for Encyclopedic-VQA (google-research `encyclopedic_vqa`) as a retrieval dataset.

Files of a data folder:

    train.csv, val.csv, test.csv     one question per row; used columns: question, answer,
                                     dataset_image_ids ("|"-separated), wikipedia_url ("|"-separated
                                     for 2-hop questions); others (question_type, dataset_name, ...)
                                     are ignored. val.csv becomes the "dev" split.
    encyclopedic_kb_wiki.json        the knowledge base: one JSON object mapping each wikipedia_url
                                     to {title, section_titles, section_texts, image_urls,
                                     image_reference_descriptions, image_section_indices, url}
    images/                          the questions' images, `<dataset_image_id>.<jpg|png|...>`
                                     (searched recursively), or instead
    imgs.tsv + imgs.lineidx.new      the same images in the WebQA TSV form (read by byte offset)
    kb_images/                       optional: knowledge-base image pixels, one file per image URL
                                     named `<sha1 hex of the URL>.<jpg|png|...>` (`kb_image_key`)

Choices made here (the release does not fix them):
- Documents: one text document per non-empty KB section, id `<url>#<section index>`, text
  "<page title> - <section title>: <section text>" cut to `max_section_chars` characters at a word
  boundary; and one image document per KB image whose pixels are in kb_images/, id
  `<url>#image<k>`, caption = its image_reference_description. Without kb_images/ the corpus is
  text-only (logged). The KB is streamed page by page (ijson: the release's file is several GB, and
  a whole-file `json.load` needs many times that in memory); `pages="referenced"` keeps only the pages
  some loaded question points to (a small benchmark corpus).
- Queries: image + text (the question and its first `max_query_images` dataset images, default 1
  as in the EVQA retrieval papers); id `<split>-<row index>`; answers = the `answer` cell split on
  "|". Positives: every document of the question's wikipedia_url page(s).
- A question whose images are all missing, or whose pages are all absent from the KB, is dropped
  with one summary warning per kind (DataError with `strict=True`).
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import sys
from pathlib import Path

from ..errors import ConfigError, DataError, choice

log = logging.getLogger("mimic_engine.data")

SPLIT_FILES = {"train": "train.csv", "dev": "val.csv", "test": "test.csv"}
REQUIRED_COLUMNS = ("question", "answer", "dataset_image_ids", "wikipedia_url")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
KB_FIELDS = ("section_titles", "section_texts")


def kb_image_key(image_url: str) -> str:
    """File stem of a knowledge-base image in kb_images/: the sha1 hex digest of its URL."""
    return hashlib.sha1(image_url.encode("utf-8")).hexdigest()


def scan_image_folder(folder: Path) -> dict[str, str]:
    """{file stem: path} of every image file under `folder` (recursively)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in IMAGE_EXTS:
                continue
            path = os.path.join(dirpath, fn)
            if stem in found:
                raise DataError(f"two image files for id {stem!r}: {found[stem]} and {path}; keep one")
            found[stem] = path
    return found


def cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at the last space when there is one."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ")
    return head[:space] if space > limit // 2 else head


def read_evqa(data_dir: str | Path, *, strict: bool = False, kb_file: str = "encyclopedic_kb_wiki.json",
              image_dir: str = "images", kb_image_dir: str = "kb_images", max_query_images: int | None = 1,
              max_section_chars: int = 2000, pages: str = "all", name: str = "evqa"):
    """Read an Encyclopedic-VQA folder -> RetrievalDataset (see the module docstring for the layout)."""
    from .types import ChainImageStore, DataProblems, FileImageStore, RetrievalDataset

    choice("pages", pages, ("all", "referenced"))
    if max_query_images is not None and max_query_images < 1:
        raise ConfigError(f"max_query_images={max_query_images} must be >= 1 (or None for all of a question's images)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"EVQA data folder {root} does not exist")
    problems = DataProblems(name, strict)

    rows = {split: _read_csv(root / fn) for split, fn in SPLIT_FILES.items() if (root / fn).is_file()}
    if not rows:
        raise DataError(f"{root}: no question file found; expected one of {', '.join(SPLIT_FILES.values())}")
    query_images = _query_image_store(root, image_dir)
    kb_images = FileImageStore(scan_image_folder(root / kb_image_dir)) if (root / kb_image_dir).is_dir() else None
    if kb_images is None:
        log.info("%s: no %s/ folder: knowledge-base images are not indexed (text sections only)", name, kb_image_dir)

    wanted = None
    if pages == "referenced":
        wanted = {u for split_rows in rows.values() for _, _, r in split_rows for u in _urls(r["wikipedia_url"])}
    documents, page_docs = _kb_documents(root / kb_file, wanted, kb_images, max_section_chars, problems)

    queries = {}
    for split, split_rows in rows.items():
        queries[split] = _queries(split, root / SPLIT_FILES[split], split_rows, page_docs, query_images,
                                  max_query_images, problems)
    problems.report(log)
    stores = (query_images,) if kb_images is None else (query_images, kb_images)
    return RetrievalDataset(name, documents, queries, ChainImageStore(*stores))


def _urls(cell: str) -> list[str]:
    return [u.strip() for u in (cell or "").split("|") if u.strip()]


def _read_csv(path: Path) -> list[tuple[int, int, dict]]:
    """-> [(row index, line number, row)] with the required columns checked."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # evidence cells can exceed the 128 KiB default
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {missing}; the header has {reader.fieldnames}")
        out = []
        try:
            for i, row in enumerate(reader):
                if None in row:  # more cells than header columns
                    raise DataError(f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells, "
                                    f"the header has {len(reader.fieldnames)} columns")
                out.append((i, reader.line_num, row))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return out


def _query_image_store(root: Path, image_dir: str):
    from .types import FileImageStore
    from .webqa import LINEIDX_FILE, TSV_FILE, TsvImageStore

    if (root / image_dir).is_dir():
        return FileImageStore(scan_image_folder(root / image_dir))
    if (root / LINEIDX_FILE).is_file():
        return TsvImageStore(root / TSV_FILE, root / LINEIDX_FILE)
    raise DataError(f"{root}: no question images found; expected a folder {image_dir}/ with "
                    f"<dataset_image_id>.jpg files, or {TSV_FILE} + {LINEIDX_FILE}")


def _kb_documents(path: Path, wanted, kb_images, max_chars: int, problems):
    """The knowledge base -> (documents, {url: [doc ids]})."""
    from .types import Document

    if not path.is_file():
        raise DataError(f"knowledge base {path} not found (encyclopedic_kb_wiki.json of the EVQA release)")

    documents, page_docs, no_pixels = [], {}, 0
    for url, page in _kb_pages(path):
        if wanted is not None and url not in wanted:
            continue
        where = f"{path}: page {url!r}"
        if not isinstance(page, dict) or any(not isinstance(page.get(f, []), list) for f in KB_FIELDS):
            raise DataError(f"{where}: expected an object with lists {list(KB_FIELDS)}")
        title = str(page.get("title") or "")
        titles, texts = page.get("section_titles", []), page.get("section_texts", [])
        if len(titles) != len(texts):
            problems.add("page with unequal section lists", f"{where}: {len(titles)} section_titles but "
                         f"{len(texts)} section_texts; the extra entries are ignored")
        ids = []
        for i, (sec_title, sec_text) in enumerate(zip(titles, texts)):
            if not isinstance(sec_text, str) or not sec_text.strip():
                continue
            head = " - ".join(p for p in (title, str(sec_title or "")) if p)
            text = cut(f"{head}: {sec_text.strip()}" if head else sec_text.strip(), max_chars)
            doc_id = f"{url}#{i}"
            documents.append(Document(doc_id, "text", text=text, title=title,
                                      metadata={"url": url, "section": i, "section_title": sec_title}))
            ids.append(doc_id)
        if kb_images is not None:
            captions = page.get("image_reference_descriptions") or []
            sections = page.get("image_section_indices") or []
            for k, image_url in enumerate(page.get("image_urls") or []):
                key = kb_image_key(image_url)
                if key not in kb_images:
                    no_pixels += 1
                    continue
                caption = captions[k] if k < len(captions) and isinstance(captions[k], str) else ""
                doc_id = f"{url}#image{k}"
                documents.append(Document(doc_id, "image", text=caption.strip() or None, image_ids=[key], title=title,
                                          metadata={"url": url, "image_url": image_url,
                                                    "section": sections[k] if k < len(sections) else None}))
                ids.append(doc_id)
        page_docs[url] = ids
    if no_pixels:
        log.warning("%s: %d knowledge-base images have no file in kb_images/ and are not indexed", path, no_pixels)
    return documents, page_docs


def _kb_pages(path: Path):
    """Stream the (wikipedia_url, page) pairs of the KB's top-level object, one page in memory at a time."""
    import ijson

    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
        if not head.startswith(b"{"):
            found = head[:1].decode("utf-8", "replace") or "an empty file"
            raise DataError(f"{path}: expected one JSON object mapping wikipedia_url -> page, found {found!r} at "
                            "the start")
        fh.seek(0)
        try:
            yield from ijson.kvitems(fh, "", use_float=True)
        except ijson.JSONError as exc:
            where = " ".join(str(exc).split())  # yajl's message with the text around the error
            raise DataError(f"{path}: not valid JSON ({where})") from None


def _queries(split, path, rows, page_docs, images, max_images, problems) -> list:
    from .types import Query

    out = []
    for i, lineno, row in rows:
        where = f"{path}:{lineno}"
        question = (row["question"] or "").strip()
        if not question:
            raise DataError(f"{where}: empty question")
        image_ids = [x.strip() for x in (row["dataset_image_ids"] or "").split("|") if x.strip()][:max_images]
        present = [x for x in image_ids if x in images]
        if not present:
            problems.add("question without images", f"{where}: none of the question's images {image_ids} "
                         "is available; dropped")
            continue
        if len(present) < len(image_ids):
            problems.add("question image missing", f"{where}: image(s) {sorted(set(image_ids) - set(present))} "
                         "are not available; the question keeps the others")
        positives = []
        for url in _urls(row["wikipedia_url"]):
            if url in page_docs:
                positives += page_docs[url]
            else:
                problems.add("page not in knowledge base", f"{where}: wikipedia_url {url!r} is not a knowledge-base page")
        if not positives:
            problems.add("question without positives", f"{where}: no document of its page(s) is in the corpus; dropped")
            continue
        answers = [a.strip() for a in (row["answer"] or "").split("|") if a.strip()]
        out.append(Query(id=f"{split}-{i}", text=question, positives=positives, image_ids=present, answers=answers))
    return out
