"""Reader for users' own corpora in a simple JSON-lines format, plus the JSON-lines helpers the other
readers share (every error names the file and line).

Layout of a folder:

    corpus.jsonl           one document per line (required)
    queries_train.jsonl    one query per line (each split file optional)
    queries_dev.jsonl
    queries_test.jsonl

Document line: `{"id": "d1", "text": "...", "caption": "...", "image": "img/d1.png",
"images": [...], "title": "...", "metadata": {...}}`. Only `id` is required, plus a text or an image.
A document with any image is an image document; its caption is `caption` (or `text` when no
`caption` is given). A document without images is a text document and needs `text`.

Query line: `{"id": "q1", "text": "...", "image": ..., "images": [...], "positives": ["d1"],
"negatives": [...], "hard_negatives": [...], "answers": [...], "kind": "..."}`. `positives` (ids in
corpus.jsonl) is required; a query needs a text, an image or both. `kind` (optional) names what the
query needs, e.g. "conjunctive"; evaluation reports every metric per kind as well.

Images are a path relative to the folder (absolute paths also work), or base64 image bytes (a
`data:image/...;base64,` URL or plain base64). Paths are checked when the folder is read and
the files are read when an item is encoded; base64 images are kept in memory.

Ids are strings (integers are accepted and converted). Positives or negatives that are not in
the corpus are dropped with one summary warning (an error with `strict=True`); a query left
with no positive is dropped.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Iterator

from ..errors import DataError

log = logging.getLogger("mimic_engine.data")

SPLITS = ("train", "dev", "test")
DOC_KEYS = {"id", "text", "caption", "image", "images", "title", "metadata"}
QUERY_KEYS = {"id", "text", "image", "images", "positives", "negatives", "hard_negatives", "answers", "kind"}


# ---- helpers shared by the readers ---------------------------------------------------------------
def read_json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; malformed input raises DataError naming file:line."""
    path = Path(path)
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot open {path}: {exc.strerror or exc}") from exc
    with fh:
        first = True
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                s = line.strip()
                if not s:
                    continue
                if first and s.startswith("["):
                    raise DataError(
                        f"{path}:{lineno}: this file is a JSON array; expected JSON lines (one object per line). "
                        f"Convert it with: python -c \"import json,sys; [print(json.dumps(r)) for r in "
                        f"json.load(open(sys.argv[1]))]\" {path.name} > {path.stem}.lines && mv {path.stem}.lines {path.name}")
                first = False
                try:
                    rec = json.loads(s)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                    "expected one JSON object per line") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield lineno, rec
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def as_id(value, where: str, field: str) -> str:
    """An id given as a string or integer -> str; anything else raises DataError."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: {field} must be a non-empty string or integer id, got {value!r}")


def claim_id(seen: dict, value, where: str, field: str, label: str, at: str) -> str:
    """as_id, then uniqueness: `seen` maps each id to where it first appeared (`at`); a repeat is a
    DataError naming both places."""
    new_id = as_id(value, where, field)
    if new_id in seen:
        raise DataError(f"{where}: {label} {new_id!r} already used at {seen[new_id]}; ids must be unique")
    seen[new_id] = at
    return new_id


def id_list(rec: dict, field: str, where: str, required: bool = False) -> list[str]:
    """rec[field] as a list of string ids, duplicates removed (order kept)."""
    if field not in rec or rec[field] is None:
        if required:
            raise DataError(f"{where}: missing field {field!r} (a list of document ids)")
        return []
    value = rec[field]
    if not isinstance(value, list):
        raise DataError(f"{where}: {field} must be a list of ids, got {type(value).__name__}")
    return list(dict.fromkeys(as_id(v, where, f"{field}[{i}]") for i, v in enumerate(value)))


def optional_str(rec: dict, field: str, where: str) -> str | None:
    value = rec.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {field} must be a string, got {type(value).__name__}")
    return value


def query_kind(rec: dict, where: str) -> str | None:
    """The optional `kind` of a query line: a non-blank string, or None when absent."""
    kind = optional_str(rec, "kind", where)
    if kind is not None and not kind.strip():
        raise DataError(f"{where}: kind must be a non-blank string such as \"conjunctive\", got {kind!r}; "
                        "leave the field out for a query without a kind")
    return kind


def keep_known(ids: list[str], known, what: str, where: str, owner: str, problems) -> list[str]:
    """The ids that are documents of the corpus; each other one is a problem of kind `what`."""
    kept = []
    for d in ids:
        if d in known:
            kept.append(d)
        else:
            problems.add(f"{what} not in corpus", f"{where}: {owner}: {what} {d!r} is not a document of the corpus; dropped")
    return kept


# ---- the JSONL corpus reader --------------------------------------------------------------------
class _Images:
    """Collects the images of a folder's documents and queries into one store."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[str, str] = {}  # image id (the path as written) -> file
        self.blobs: dict[str, bytes] = {}  # image id ("inline:<owner>:<k>") -> decoded bytes

    def refs(self, rec: dict, where: str, owner: str) -> list[str]:
        """Image ids of a line's `image` / `images` fields."""
        if "image" in rec and "images" in rec:
            raise DataError(f"{where}: give either 'image' or 'images', not both")
        values = rec.get("images", rec.get("image"))
        if values is None:
            return []
        if not isinstance(values, list):
            values = [values]
        return [self._add(v, f"{where}: image {k}", f"{owner}:{k}") for k, v in enumerate(values)]

    def _add(self, value, where: str, inline_key: str) -> str:
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: an image must be a path or base64 string, got {value!r}")
        if value.startswith("data:"):
            return self._blob(value.split(",", 1)[-1], where, inline_key)
        path = Path(value) if Path(value).is_absolute() else self.root / value
        try:
            is_file = path.is_file()
        except OSError:  # e.g. a base64 string too long to be a file name
            is_file = False
        if is_file:
            self.paths[value] = str(path)  # the id is the path as written in the file
            return value
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) < 16:  # no image file is shorter; a short string is a mistyped path
            raise DataError(f"{where}: {value[:80]!r} is not a file (looked for {path}) nor base64 image data; "
                            "give a path relative to the folder or the image bytes base64-encoded")
        return self._keep(raw, inline_key)

    def _blob(self, data: str, where: str, key: str) -> str:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"{where}: the data: URL is not valid base64 ({exc})") from None
        return self._keep(raw, key)

    def _keep(self, raw: bytes, key: str) -> str:
        key = f"inline:{key}"
        self.blobs[key] = raw
        return key

    def store(self):
        from .types import ChainImageStore, DictImageStore, FileImageStore

        return ChainImageStore(FileImageStore(self.paths), DictImageStore(self.blobs))


def read_jsonl(data_dir: str | Path, *, strict: bool = False, name: str = "jsonl"):
    """Read `corpus.jsonl` and `queries_{train,dev,test}.jsonl` of a folder -> RetrievalDataset."""
    from .types import DataProblems, Document, Query, RetrievalDataset

    root = Path(data_dir)
    corpus = root / "corpus.jsonl"
    if not corpus.is_file():
        raise DataError(f"{corpus} not found: a JSONL dataset folder needs corpus.jsonl (one document per line) "
                        "and optionally queries_train.jsonl / queries_dev.jsonl / queries_test.jsonl")
    problems = DataProblems(name, strict)
    images = _Images(root)

    documents, first_line = [], {}
    for lineno, rec in read_json_lines(corpus):
        where = f"{corpus}:{lineno}"
        _check_keys(rec, DOC_KEYS, where)
        doc_id = claim_id(first_line, rec.get("id"), where, "id", "document id", f"line {lineno}")
        text, caption = optional_str(rec, "text", where), optional_str(rec, "caption", where)
        image_ids = images.refs(rec, where, doc_id)
        metadata = rec.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise DataError(f"{where}: metadata must be an object, got {type(metadata).__name__}")
        if image_ids:
            documents.append(Document(doc_id, "image", text=caption if caption is not None else text,
                                      image_ids=image_ids, title=optional_str(rec, "title", where), metadata=metadata))
        else:
            if caption is not None:
                raise DataError(f"{where}: 'caption' describes an image but this document has no 'image'/'images'; "
                                "use 'text' for a text document")
            if not text or not text.strip():
                raise DataError(f"{where}: document {doc_id!r} has neither text nor an image")
            documents.append(Document(doc_id, "text", text=text, title=optional_str(rec, "title", where),
                                      metadata=metadata))

    queries = {}
    for split in SPLITS:
        path = root / f"queries_{split}.jsonl"
        if path.is_file():
            queries[split] = _read_queries(path, first_line, images, problems, Query)
    problems.report(log)
    return RetrievalDataset(name, documents, queries, images.store())


def _read_queries(path: Path, known, images: _Images, problems, Query) -> list:
    out, seen = [], {}
    for lineno, rec in read_json_lines(path):
        where = f"{path}:{lineno}"
        _check_keys(rec, QUERY_KEYS, where)
        qid = claim_id(seen, rec.get("id"), where, "id", "query id", f"line {lineno}")
        text = optional_str(rec, "text", where)
        image_ids = images.refs(rec, where, f"query:{path.stem}:{qid}")
        if not (text and text.strip()) and not image_ids:
            raise DataError(f"{where}: query {qid!r} has neither text nor an image")
        positives = keep_known(id_list(rec, "positives", where, required=True), known, "positive", where,
                               f"query {qid!r}", problems)
        if not positives:
            problems.add("query without positives", f"{where}: query {qid!r} has no positive in the corpus; query dropped")
            continue
        answers = rec.get("answers") or []
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: answers must be a list of strings")
        out.append(Query(
            id=qid, text=text, positives=positives, image_ids=image_ids,
            negatives=keep_known(id_list(rec, "negatives", where), known, "negative", where, f"query {qid!r}", problems),
            hard_negatives=keep_known(id_list(rec, "hard_negatives", where), known, "hard negative", where,
                                      f"query {qid!r}", problems),
            answers=answers, kind=query_kind(rec, where),
        ))
    return out


def _check_keys(rec: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(rec) - allowed)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
