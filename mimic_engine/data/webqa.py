"""Reader for the WebQA retrieval format as released with UniVL-DR (and reused by MARVEL).

Files of a data folder (JSON lines unless noted; ids are strings, integers are converted):

    train.json, dev.json, test.json   queries: {"qid", "Q", "A", "img_posFacts", "img_negFacts",
                                      "txt_posFacts", "txt_negFacts"}; mined files such as
                                      train_all.json add "all_negFacts" (-> Query.hard_negatives);
                                      an optional "kind" (-> Query.kind) names what the query needs
    all_docs.json                     text documents {"title", "fact", "url", "snippet_id"}; text = fact
    all_imgs.json                     image metadata {"title", "caption", "image_id": int}; id = str(image_id)
    imgs.tsv                          image_id<TAB>base64 image bytes, one per line (read by offset)
    imgs.lineidx.new                  image_id<TAB>byte offset of its line in imgs.tsv
    dev_qrels.txt, test_qrels.txt     qid<TAB>doc_id<TAB>1 (3 columns)

The corpus is every text document plus every image listed in imgs.lineidx.new (an image without
all_imgs.json metadata has no caption). When a qrels file is present it gives the positives of
its split's queries; a disagreement with the json's posFacts is reported.

What is fatal (DataError naming file and line): malformed lines, missing fields, a duplicate id,
a lineidx offset past the end of imgs.tsv, a JSON array where JSON lines are expected. What is a
warning (one line per kind with a count; DataError when `strict=True`): a positive, negative or
metadata entry whose id is not in the corpus (dropped), a query left without positives (dropped),
qrels that disagree with the json.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from pathlib import Path

from ..errors import DataError
from .jsonl import as_id, claim_id, id_list, keep_known, optional_str, query_kind, read_json_lines

log = logging.getLogger("mimic_engine.data")

QUERY_FILES = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
QRELS_FILES = {"dev": "dev_qrels.txt", "test": "test_qrels.txt"}
DOCS_FILE, IMGS_META_FILE, TSV_FILE, LINEIDX_FILE = "all_docs.json", "all_imgs.json", "imgs.tsv", "imgs.lineidx.new"


class TsvImageStore:
    """Images of a `imgs.tsv` read by byte offset through `imgs.lineidx.new`; the TSV is never loaded whole.

    Thread- and fork-safe: reads use `os.pread` (positional, so threads and forked workers sharing
    the descriptor never race on a file position), or a lock where `pread` does not exist. Only the index (id -> byte span) is in
    memory: about 100 bytes per image.
    """

    def __init__(self, tsv_path: str | Path, lineidx_path: str | Path):
        self.tsv_path, self.lineidx_path = str(tsv_path), str(lineidx_path)
        try:
            size = os.path.getsize(self.tsv_path)
        except OSError as exc:
            raise DataError(f"cannot open the image file {self.tsv_path}: {exc.strerror or exc}") from exc
        offsets: dict[str, int] = {}
        try:
            fh = open(self.lineidx_path, encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot open the image index {self.lineidx_path}: {exc.strerror or exc}") from exc
        with fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("\t")
                where = f"{self.lineidx_path}:{lineno}"
                if len(parts) != 2 or not parts[0]:
                    raise DataError(f"{where}: expected 'image_id<TAB>byte offset', got {line[:80]!r}")
                image_id, off = parts
                try:
                    offset = int(off)
                except ValueError:
                    raise DataError(f"{where}: byte offset {off!r} of image {image_id!r} is not an integer") from None
                if not 0 <= offset < size:
                    raise DataError(f"{where}: byte offset {offset} of image {image_id!r} is outside {self.tsv_path} "
                                    f"({size} bytes); the index does not belong to this file, rebuild it")
                if image_id in offsets:
                    raise DataError(f"{where}: image id {image_id!r} is listed twice")
                offsets[image_id] = offset
        # A line ends at the next indexed offset (or the end of the file): one read per image.
        starts = sorted(set(offsets.values()))
        end_of = dict(zip(starts, starts[1:] + [size]))
        self._spans = {k: (v, end_of[v]) for k, v in offsets.items()}  # id -> (start, end), lineidx order
        self._lock = threading.Lock()
        self._fd, self._fh = None, None

    def __len__(self) -> int:
        return len(self._spans)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._spans

    def ids(self) -> list[str]:
        """Image ids in lineidx order."""
        return list(self._spans)

    def get(self, image_id: str) -> bytes:
        span = self._spans.get(image_id)
        if span is None:
            raise DataError(f"image id {image_id!r} is not in {self.lineidx_path} ({len(self._spans)} images)")
        start, end = span
        line = self._read(start, end - start).split(b"\n", 1)[0].rstrip(b"\r")
        key, sep, payload = line.partition(b"\t")
        if not sep or key.decode("utf-8", "replace") != image_id:
            raise DataError(f"{self.tsv_path}: the line at byte offset {start} holds image id "
                            f"{key[:40].decode('utf-8', 'replace')!r}, but {self.lineidx_path} maps {image_id!r} there; "
                            "the index does not match the file, rebuild it")
        try:
            return base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"{self.tsv_path}: image {image_id!r} at byte offset {start} is not valid base64 ({exc})") from None

    def _read(self, start: int, length: int) -> bytes:
        if hasattr(os, "pread"):
            if self._fd is None:
                with self._lock:
                    if self._fd is None:
                        self._fd = os.open(self.tsv_path, os.O_RDONLY)
            chunks, got = [], 0
            while got < length:
                chunk = os.pread(self._fd, length - got, start + got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)
        with self._lock:
            if self._fh is None:
                self._fh = open(self.tsv_path, "rb")
            self._fh.seek(start)
            return self._fh.read(length)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            if self._fh is not None:
                self._fh.close()
            self._fd, self._fh = None, None

    def __getstate__(self):  # picklable for data-loader workers: descriptors are reopened there
        state = self.__dict__.copy()
        state.update(_lock=None, _fd=None, _fh=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def read_qrels(path: str | Path) -> dict[str, tuple[int, list[str]]]:
    """`qid<TAB>doc_id<TAB>relevance` lines -> {qid: (first line number, [doc ids with relevance > 0])}."""
    out: dict[str, tuple[int, list[str]]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{path}:{lineno}"
            if len(parts) != 3:
                hint = " (the 4-column TREC form 'qid 0 doc_id rel' is not this format: drop the second column)" \
                    if len(parts) == 4 else ""
                raise DataError(f"{where}: expected 3 columns 'qid<TAB>doc_id<TAB>relevance', got {len(parts)}{hint}")
            qid, doc_id, rel = parts
            try:
                relevant = int(rel) > 0
            except ValueError:
                raise DataError(f"{where}: relevance {rel!r} is not an integer") from None
            entry = out.setdefault(qid, (lineno, []))
            if relevant and doc_id not in entry[1]:
                entry[1].append(doc_id)
    return out


def read_webqa(data_dir: str | Path, *, strict: bool = False, train_file: str = "train.json",
               name: str = "webqa"):
    """Read a WebQA-format folder -> RetrievalDataset (splits present among train/dev/test).

    `train_file`: the training queries, e.g. "train_all.json" for a file with mined `all_negFacts`.
    `strict`: turn every reported data problem into a DataError.
    """
    from .types import DataProblems, Document, DictImageStore, RetrievalDataset

    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"WebQA data folder {root} does not exist")
    docs_path, meta_path = root / DOCS_FILE, root / IMGS_META_FILE
    tsv_path, lineidx_path = root / TSV_FILE, root / LINEIDX_FILE
    if not docs_path.is_file() and not lineidx_path.is_file():
        raise DataError(f"{root}: no corpus found; expected {DOCS_FILE} (text documents) and/or "
                        f"{TSV_FILE} + {LINEIDX_FILE} (images)")
    problems = DataProblems(name, strict)

    documents, first_line = [], {}
    if docs_path.is_file():
        for lineno, rec in read_json_lines(docs_path):
            where = f"{docs_path}:{lineno}"
            doc_id = claim_id(first_line, rec.get("snippet_id"), where, "snippet_id", "snippet_id", where)
            fact = optional_str(rec, "fact", where)
            if not fact or not fact.strip():
                raise DataError(f"{where}: text document {doc_id!r} has no 'fact' (its text)")
            documents.append(Document(doc_id, "text", text=fact, title=optional_str(rec, "title", where),
                                      metadata={"url": rec["url"]} if rec.get("url") else {}))

    if lineidx_path.is_file():
        if not tsv_path.is_file():
            raise DataError(f"{lineidx_path} indexes {tsv_path}, which is missing")
        images = TsvImageStore(tsv_path, lineidx_path)
        meta = _read_image_meta(meta_path, images, problems) if meta_path.is_file() else {}
        for image_id in images.ids():
            if image_id in first_line:
                raise DataError(f"{lineidx_path}: image id {image_id!r} is also a snippet_id ({first_line[image_id]}); "
                                "document ids must be unique across text and images")
            first_line[image_id] = str(lineidx_path)
            title, caption = meta.get(image_id, (None, None))
            documents.append(Document(image_id, "image", text=caption, image_ids=[image_id], title=title))
    else:
        if meta_path.is_file():
            raise DataError(f"{meta_path} describes images but {LINEIDX_FILE} and {TSV_FILE} are missing; "
                            "add them (the image bytes) or remove the metadata file")
        images = DictImageStore()

    queries = {}
    for split, default_file in QUERY_FILES.items():
        path = root / (train_file if split == "train" else default_file)
        if not path.is_file():
            if split == "train" and train_file != default_file:
                raise DataError(f"training query file {path} not found")
            continue
        qrels_path = root / QRELS_FILES[split] if split in QRELS_FILES else None
        qrels = read_qrels(qrels_path) if qrels_path is not None and qrels_path.is_file() else None
        queries[split] = _read_queries(path, qrels, qrels_path, first_line, problems)
    problems.report(log)
    return RetrievalDataset(name, documents, queries, images)


def _read_image_meta(path: Path, images: TsvImageStore, problems) -> dict[str, tuple[str | None, str | None]]:
    """all_imgs.json -> {image id: (title, caption)} for the images that have bytes."""
    meta: dict[str, tuple[str | None, str | None]] = {}
    seen: dict[str, int] = {}
    for lineno, rec in read_json_lines(path):
        where = f"{path}:{lineno}"
        image_id = as_id(rec.get("image_id"), where, "image_id")
        if image_id in seen:
            raise DataError(f"{where}: image_id {image_id} already described at line {seen[image_id]}")
        seen[image_id] = lineno
        if image_id not in images:
            problems.add("image metadata without bytes",
                         f"{where}: image_id {image_id} is not in {LINEIDX_FILE}; its metadata is ignored")
            continue
        caption = optional_str(rec, "caption", where)
        meta[image_id] = (optional_str(rec, "title", where), caption if caption and caption.strip() else None)
    return meta


def _read_queries(path: Path, qrels, qrels_path, known, problems) -> list:
    from .types import Query

    out, seen = [], {}
    for lineno, rec in read_json_lines(path):
        where = f"{path}:{lineno}"
        qid = claim_id(seen, rec.get("qid"), where, "qid", "qid", f"line {lineno}")
        text = optional_str(rec, "Q", where)
        if not text or not text.strip():
            raise DataError(f"{where}: query {qid!r} has no question text 'Q'")
        answers = rec.get("A") or []
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'A' must be a string or a list of strings")

        positives = id_list(rec, "img_posFacts", where) + id_list(rec, "txt_posFacts", where)
        if qrels is not None:
            entry = qrels.pop(qid, None)
            if entry is None:
                problems.add("query missing from qrels", f"{where}: query {qid!r} is not in {qrels_path}; "
                                                         "its json posFacts are used")
            else:
                if set(entry[1]) != set(positives):
                    problems.add("qrels disagreeing with json", f"{qrels_path}:{entry[0]}: query {qid!r} has "
                                 f"{len(entry[1])} positives there but {len(positives)} posFacts in {where}; "
                                 "the qrels are used")
                positives = entry[1]
        positives = keep_known(positives, known, "positive", where, f"query {qid!r}", problems)
        if not positives:
            problems.add("query without positives", f"{where}: query {qid!r} has no positive in the corpus; query dropped")
            continue
        negatives = id_list(rec, "img_negFacts", where) + id_list(rec, "txt_negFacts", where)
        out.append(Query(
            id=qid, text=text, positives=positives, answers=answers, kind=query_kind(rec, where),
            negatives=keep_known(negatives, known, "negative", where, f"query {qid!r}", problems),
            hard_negatives=keep_known(id_list(rec, "all_negFacts", where), known, "mined negative", where,
                                      f"query {qid!r}", problems),
        ))
    for qid, (lineno, _) in (qrels or {}).items():
        problems.add("qrels of unknown query", f"{qrels_path}:{lineno}: query {qid!r} is not in {path}; ignored")
    return out
