"""The in-memory form every reader produces and every consumer (training, evaluation, index
building) reads: documents, queries with their positives, and an image store.

Readers: `webqa.py` (the released WebQA retrieval format), `evqa.py` (Encyclopedic-VQA),
`jsonl.py` (users' own corpora), `demo.py` (the bundled handwritten-digit corpus, written in the
WebQA format and read back with the WebQA reader).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from ..errors import DataError
from ..preprocess import Item


class ImageStore(Protocol):
    """Image bytes by image id (never the whole image set in memory for large corpora)."""

    def get(self, image_id: str) -> bytes: ...

    def __contains__(self, image_id: str) -> bool: ...


class DictImageStore:
    """Image bytes held in memory (tests, small corpora)."""

    def __init__(self, images: dict[str, bytes] | None = None):
        self.images = dict(images or {})

    def get(self, image_id: str) -> bytes:
        try:
            return self.images[image_id]
        except KeyError:
            raise DataError(f"image id {image_id!r} is not in the image store ({len(self.images)} images)") from None

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.images


class FileImageStore:
    """Image bytes read from files on demand: image id -> path (folders of JPEG/PNG files)."""

    def __init__(self, paths: dict[str, str] | None = None):
        self.paths = {k: str(v) for k, v in (paths or {}).items()}

    def get(self, image_id: str) -> bytes:
        path = self.paths.get(image_id)
        if path is None:
            raise DataError(f"image id {image_id!r} is not in the image store ({len(self.paths)} image files)")
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise DataError(f"image {image_id!r}: cannot read {path} ({exc.strerror or exc})") from exc

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.paths

    def __len__(self) -> int:
        return len(self.paths)


class ChainImageStore:
    """Several stores behind one: `get` asks each in order (query images + knowledge-base images)."""

    def __init__(self, *stores: ImageStore):
        self.stores = stores

    def get(self, image_id: str) -> bytes:
        for store in self.stores:
            if image_id in store:
                return store.get(image_id)
        raise DataError(f"image id {image_id!r} is in none of the {len(self.stores)} image stores of this dataset")

    def __contains__(self, image_id: str) -> bool:
        return any(image_id in s for s in self.stores)


class DataProblems:
    """Non-fatal data problems (an id that points nowhere, a query left without positives) collected
    while reading: `report()` logs one warning per kind with its count and first example. With
    `strict=True` the first problem raises DataError instead."""

    def __init__(self, source: str, strict: bool = False):
        self.source = source
        self.strict = strict
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, kind: str, message: str) -> None:
        if self.strict:
            raise DataError(f"{message} (strict mode; pass strict=False to drop such entries with a warning)")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, message)

    def report(self, logger) -> None:
        for kind, n in self.counts.items():
            logger.warning("%s: %d x %s; first: %s", self.source, n, kind, self.first[kind])


def caption_kept(doc_id: str, keep_rate: float, seed: int = 0) -> bool:
    """Deterministic per-document coin: keep this image document's caption at `keep_rate`?

    The same (doc_id, rate, seed) always gives the same answer, on every machine, so evaluations
    at caption-keep 0.5 compare models on the same caption-less documents.
    """
    if keep_rate >= 1.0:
        return True
    if keep_rate <= 0.0:
        return False
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < keep_rate


@dataclass
class Document:
    id: str
    modality: str  # "text" or "image"
    text: str | None = None  # a text document's passage, or an image document's caption
    image_ids: list[str] = field(default_factory=list)  # keys into the dataset's ImageStore
    title: str | None = None
    metadata: dict = field(default_factory=dict)

    def to_item(self, images: ImageStore, keep_caption: bool = True) -> Item:
        """The item to encode; `keep_caption=False` drops an image document's caption (never a text document's text)."""
        text = self.text if (self.modality == "text" or keep_caption) else None
        return Item(text=text, images=[images.get(i) for i in self.image_ids], name=self.id)


@dataclass
class Query:
    id: str
    text: str | None
    positives: list[str]  # relevant document ids
    image_ids: list[str] = field(default_factory=list)  # image(s) asked about (EVQA); empty for WebQA
    negatives: list[str] = field(default_factory=list)  # negatives given by the data (img_negFacts + txt_negFacts)
    hard_negatives: list[str] = field(default_factory=list)  # mined (all_negFacts)
    answers: list[str] = field(default_factory=list)
    kind: str | None = None  # what the query needs, if the data says (demo: "conjunctive", "pixel-only", ...)

    def to_item(self, images: ImageStore) -> Item:
        return Item(text=self.text, images=[images.get(i) for i in self.image_ids], name=self.id)


@dataclass
class RetrievalDataset:
    name: str
    documents: list[Document]
    queries: dict[str, list[Query]]  # split ("train", "dev", "test") -> queries
    images: ImageStore

    def __post_init__(self):
        self._by_id = {}
        for d in self.documents:
            if d.id in self._by_id:
                raise DataError(f"{self.name}: document id {d.id!r} appears twice")
            self._by_id[d.id] = d

    def doc(self, doc_id: str) -> Document:
        try:
            return self._by_id[doc_id]
        except KeyError:
            raise DataError(f"{self.name}: unknown document id {doc_id!r}") from None

    def has_doc(self, doc_id: str) -> bool:
        return doc_id in self._by_id

    def split(self, name: str) -> list[Query]:
        if name not in self.queries:
            raise DataError(f"{self.name}: no {name!r} split; available: {sorted(self.queries)}")
        return self.queries[name]

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        """{query id: {relevant doc id: 1}} (binary relevance, as the seed repos)."""
        return {q.id: {d: 1 for d in q.positives} for q in self.split(split)}

    def positive_modality(self, query: Query) -> str:
        """"image" or "text": the modality of the query's positives (one modality per WebQA query)."""
        mods = {self.doc(d).modality for d in query.positives if self.has_doc(d)}
        return mods.pop() if len(mods) == 1 else "mixed"

    def documents_of(self, modality: str) -> Iterable[Document]:
        return (d for d in self.documents if d.modality == modality)
