"""The bundled demo corpus: real handwritten-digit scans plus facts about numbers, written in the
WebQA retrieval format (so the demo runs through the WebQA reader) in a few seconds, offline.

Source: the 1797 8x8 grayscale digit scans bundled with scikit-learn (`load_digits`, no download).

Design (version 2; captions and pixels say different things, so fusion matters, as in WebQA):
- Image documents: every scan, drawn in one of 4 ink colours (red, green, blue, black) on white,
  upscaled bicubic to 32x32 RGB PNG; id = 10000 + its index in load_digits. Each scan is also
  given a writer, whose notebook it is from (Anna, Ben, Chloe, David). Each digit's scans, in
  seeded random order, take the 16 (colour, writer) pairs in turn, so every (digit, colour, writer)
  cell holds 10-12 scans and colour and writer are independent of each other and of the shape.
  Captions name the digit and the writer, never the colour, with 6 templates in word or numeral
  form ("a handwritten seven from Anna's notebook", "David wrote this 4"). So the colour is a
  fact only the pixels show and the writer a fact only the caption states.
- The train pool: 60% of each cell's images (seeded). Train queries' positives and negatives are
  train-pool images only; dev/test queries are judged on every image of their class, so the
  pixels of the other 40% are never a training positive or negative.
- Image-seeking queries, of three kinds (each query line's "kind"):
  conjunctive  ("the red 7 from Anna's notebook"): positives = images of that digit, colour AND
               writer (160 classes of 10-12): needs the pixels and the caption;
  pixel-only   ("show me a red 7"): digit and colour (40 classes of about 45): the caption
               cannot tell the colour, the pixels answer alone;
  caption-only ("a 7 from Anna's notebook"): digit and writer (40 classes of about 45): no pixel
               shows the writer, the caption answers alone.
  Per kind 12 phrasing templates: 8 for train, 2 for dev, 2 for test (test phrasings are unseen).
  Pixel-only and caption-only: every class x every template of the split (train 320, dev/test 80);
  conjunctive: every class x 2 sampled train templates (320), x 1 dev/test template (160); the
  digit in word or numeral form, picked by the seed.
  Negatives: 4 images from the class's pool that differ in one named fact only, 2 for each of
  the last two facts the kind names (conjunctive: other colour / other writer, so rejecting them
  needs the pixels / the caption; pixel-only: other digit / other colour; caption-only: other
  digit / other writer).
- Text documents: 5 facts about each integer 0..199 (the English words always, plus 4 of square,
  parity, binary, successor, predecessor, Roman numerals, primality, double, digit sum, picked by
  the seed) -> 1000 facts, snippet ids `num-013-square`.
- Text queries (kind "text"): one question per fact ("What is the square of 13?"), two phrasings
  per kind, exactly one positive. Split by the integer: n % 5 == 3 -> dev, n % 5 == 4 -> test,
  else train (600 / 200 / 200), so no dev/test number's facts are trained on. Negatives: 2 other
  facts of the same number + 2 facts of the same kind about other numbers of the same split.
- Every query has positives in exactly one modality, as in WebQA.

At caption-keep 0.0 (evaluation without captions) caption-only queries and the writer half of
conjunctive queries become unanswerable by design; pixel-only queries do not change.

Sizes (seed 0): 1797 image + 1000 text documents; queries per kind (conjunctive / pixel-only /
caption-only / text): train 320 / 320 / 320 / 600, dev and test 160 / 80 / 80 / 200 each. Files
are byte-for-byte identical for the same seed. A folder holding an earlier version's corpus is
rebuilt by `ensure_demo_corpus` (so `load_dataset("demo")` never reuses an old cache).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..errors import DataError

log = logging.getLogger("mimic_engine.data")

FORMAT_VERSION = 2  # 2: ink colours, writers and query kinds; an earlier version's cache is rebuilt
INFO_FILE = "demo_info.json"
IMAGE_SIZE = 32
IMAGE_ID_BASE = 10000
N_NUMBERS = 200
FACTS_PER_NUMBER = 5
N_NEGATIVES = 4
SPLITS = ("train", "dev", "test")
TRAIN_POOL_FRACTION = 0.6  # of each cell's images; the rest are held out for dev and test

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# ink colour -> RGB; only the pixels show it (never a caption)
INK_COLOURS = {"red": (215, 25, 25), "green": (20, 145, 40), "blue": (25, 60, 220), "black": (20, 20, 20)}
# whose notebook a scan is from; only the caption states it (assigned at random, so no pixel shows it)
WRITERS = ("Anna", "Ben", "Chloe", "David")
# query kinds, recorded in each query line's "kind"
KINDS = ("conjunctive", "pixel-only", "caption-only", "text")

CAPTION_TEMPLATES = [
    "a handwritten {d} from {w}'s notebook",
    "scan of the digit {d}, written by {w}",
    "{w} wrote this {d}",
    "the number {d} from the notebook of {w}",
    "page of {w}'s notebook showing a {d}",
    "a digit {d} copied out by {w}",
]
# kind -> split -> phrasings; {d} digit, {c} ink colour, {w} writer. Dev and test phrasings are unseen in train.
QUERY_TEMPLATES = {
    "pixel-only": {
        "train": [
            "show me a {c} {d}",
            "find a {d} written in {c} ink",
            "a handwritten {d} in {c}",
            "which scan shows a {c} {d}?",
            "image of a {c} handwritten {d}",
            "I am looking for the digit {d} drawn in {c}",
            "retrieve a {d} with {c} strokes",
            "{c} {d}, handwritten",
        ],
        "dev": ["can you find a scanned {d} drawn with a {c} pen", "get me an example of a {c} handwritten digit {d}"],
        "test": ["search for a {d} someone wrote in {c}", "what does a {c} {d} look like when handwritten?"],
    },
    "caption-only": {
        "train": [
            "a {d} from {w}'s notebook",
            "show me a {d} written by {w}",
            "find {w}'s handwritten {d}",
            "which scan is a {d} by {w}?",
            "the digit {d} as {w} wrote it",
            "{w} wrote a {d}: find it",
            "retrieve a {d} from the notebook of {w}",
            "handwritten {d} by {w}",
        ],
        "dev": ["can you find a {d} that {w} wrote down", "get me {w}'s version of the digit {d}"],
        "test": ["search for a {d} penned by {w}", "what does {w}'s handwritten {d} look like?"],
    },
    "conjunctive": {
        "train": [
            "the {c} {d} from {w}'s notebook",
            "show me a {d} written by {w} in {c} ink",
            "find {w}'s {c} {d}",
            "a {c} handwritten {d} by {w}",
            "which scan is a {c} {d} written by {w}?",
            "{w} wrote a {d} in {c}: find it",
            "retrieve the {c} {d} from the notebook of {w}",
            "{c} {d}, handwritten by {w}",
        ],
        "dev": ["can you find a {d} that {w} wrote down in {c}", "get me {w}'s {c} version of the digit {d}"],
        "test": ["search for a {c} {d} penned by {w}", "what does the {c} {d} in {w}'s notebook look like?"],
    },
}
CONJUNCTIVE_TRAIN_PHRASINGS = 2  # per (digit, colour, writer) class: 160 classes x 2 = 320 train queries

# kind -> (fact template, two question phrasings); {n} the number, {v} the answer
FACT_KINDS = {
    "word": ("{n} is written {v} in English words.", ["How do you spell {n} in words?", "How is {n} written in English words?"]),
    "square": ("The square of {n} is {v}.", ["What is the square of {n}?", "What is {n} squared?"]),
    "parity": ("{n} is an {v} number.", ["Is {n} even or odd?", "Is the number {n} odd or even?"]),
    "binary": ("{n} written in binary is {v}.", ["How is {n} written in binary?", "What is the binary form of {n}?"]),
    "successor": ("The number after {n} is {v}.", ["Which number comes after {n}?", "What number follows {n}?"]),
    "predecessor": ("The number before {n} is {v}.", ["Which number comes before {n}?", "What number precedes {n}?"]),
    "roman": ("In Roman numerals {n} is {v}.", ["How is {n} written in Roman numerals?", "What is {n} as a Roman numeral?"]),
    "prime": ("{n} {v}.", ["Is {n} a prime number?", "Is {n} prime?"]),
    "double": ("Twice {n} is {v}.", ["What is twice {n}?", "What is double {n}?"]),
    "digit_sum": ("The digits of {n} add up to {v}.", ["What is the sum of the digits of {n}?", "What do the digits of {n} sum to?"]),
}


# ---- number facts --------------------------------------------------------------------------------
def number_words(n: int) -> str:
    """0..999 in English words ("one hundred twenty-three")."""
    teens = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
    tens = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
    if n < 10:
        return DIGIT_WORDS[n]
    if n < 20:
        return teens[n - 10]
    if n < 100:
        return tens[n // 10] + ("" if n % 10 == 0 else "-" + DIGIT_WORDS[n % 10])
    rest = n % 100
    return DIGIT_WORDS[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def roman(n: int) -> str:
    out = []
    for value, sym in ((100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)


def _smallest_factor(n: int) -> int:
    return next((p for p in range(2, int(n ** 0.5) + 1) if n % p == 0), n)


def fact_answer(kind: str, n: int) -> tuple[str, str] | None:
    """(value put in the fact, short answer) or None when the kind does not apply to n."""
    if kind == "word":
        return number_words(n), number_words(n)
    if kind == "square":
        return str(n * n), str(n * n)
    if kind == "parity":
        v = "even" if n % 2 == 0 else "odd"
        return v, v
    if kind == "binary":
        return format(n, "b"), format(n, "b")
    if kind == "successor":
        return str(n + 1), str(n + 1)
    if kind == "predecessor":
        return (str(n - 1), str(n - 1)) if n >= 1 else None
    if kind == "roman":
        return (roman(n), roman(n)) if n >= 1 else None
    if kind == "prime":
        if n < 2:
            return None
        p = _smallest_factor(n)
        return ("is a prime number", "yes") if p == n else (f"is not a prime number; its smallest prime factor is {p}", "no")
    if kind == "double":
        return str(2 * n), str(2 * n)
    if kind == "digit_sum":
        s = str(sum(int(c) for c in str(n)))
        return s, s
    raise ValueError(kind)


def number_split(n: int) -> str:
    return {3: "dev", 4: "test"}.get(n % 5, "train")


# ---- building ------------------------------------------------------------------------------------
CELL_FIELDS = ("digit", "colour", "writer")  # an image's cell; each scan has exactly one
# kind -> the cell fields its queries name (indices into CELL_FIELDS); text queries name none
KIND_FIELDS = {"conjunctive": (0, 1, 2), "pixel-only": (0, 1), "caption-only": (0, 2)}


def _render(scan: np.ndarray, rgb: tuple[int, int, int]) -> bytes:
    """(8, 8) scan, 0 (paper) .. 16 (ink) -> PNG bytes: ink of colour `rgb` on white, upscaled bicubic."""
    from PIL import Image

    ink = (scan / 16.0)[..., None]  # (8, 8, 1)
    arr = np.round(255.0 - ink * (255.0 - np.asarray(rgb, dtype=float))).astype(np.uint8)  # (8, 8, 3)
    img = Image.fromarray(arr).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _sample(rng, pool: list, k: int) -> list:
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False))]


def _digit_form(d: int, form: str) -> str:
    return DIGIT_WORDS[d] if form == "word" else str(d)


def _matching(columns: list[np.ndarray], source: np.ndarray, named: dict, differ: int | None = None) -> list[int]:
    """Indices of the images in `source` ((N,) bool) whose cell `columns` (one (N,) array per
    CELL_FIELDS entry) equal `named` ({field index: value}) on every named field except `differ`,
    where they must differ; ascending."""
    mask = source.copy()
    for f, v in named.items():
        mask &= (columns[f] != v) if f == differ else (columns[f] == v)
    return np.flatnonzero(mask).tolist()


def _describe(named: dict) -> str:
    """{field index: value} -> "a red handwritten 7 written by Anna" (the query's answer line)."""
    colour = f"{named[1]} " if 1 in named else ""
    writer = f" written by {named[2]}" if 2 in named else ""
    return f"a {colour}handwritten {named[0]}{writer}"


def _image_part(rng):
    """-> (all_imgs records, tsv payloads [(image_id, png)], image queries per split, each with its "kind")."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans, target = digits.images, digits.target.astype(int)  # (1797, 8, 8), (1797,)
    ids = [str(IMAGE_ID_BASE + i) for i in range(len(target))]

    # Each digit's scans, in random order, take the 16 (colour, writer) pairs in turn: every
    # (digit, colour, writer) cell holds 10-12 scans, and colour and writer are independent.
    combos = [(c, w) for w in WRITERS for c in INK_COLOURS]
    cell = {}
    for d in range(10):
        members = np.flatnonzero(target == d)
        for k, i in enumerate(members[rng.permutation(len(members))]):
            cell[int(i)] = (d, *combos[k % len(combos)])

    meta, images = [], []
    for i, image_id in enumerate(ids):
        d, colour, writer = cell[i]
        caption = _pick(rng, CAPTION_TEMPLATES).format(d=_digit_form(d, _pick(rng, ("word", "numeral"))), w=writer)
        meta.append({"title": f"Handwritten digit scan {i}", "caption": caption, "image_id": int(image_id)})
        images.append((image_id, _render(scans[i], INK_COLOURS[colour])))

    # The train pool: 60% of each cell (seeded). Train queries see only its images; dev and test
    # queries are judged on every image, so the other 40% of the pixels are never trained on.
    cells = sorted(set(cell.values()))
    columns = [np.array([cell[i][f] for i in range(len(ids))]) for f in range(len(CELL_FIELDS))]
    everything = np.ones(len(ids), dtype=bool)
    in_train_pool = np.zeros(len(ids), dtype=bool)
    for c in cells:
        members = _matching(columns, everything, dict(enumerate(c)))
        n_train = round(TRAIN_POOL_FRACTION * len(members))
        in_train_pool[[members[j] for j in rng.permutation(len(members))[:n_train]]] = True

    queries = {s: [] for s in SPLITS}
    for kind, fields in KIND_FIELDS.items():
        classes = sorted({tuple(c[f] for f in fields) for c in cells})
        for split in SPLITS:
            # train queries see train-pool images only; dev/test relevance is the whole class
            source = in_train_pool if split == "train" else everything
            templates = QUERY_TEMPLATES[kind][split]
            for values in classes:
                named = dict(zip(fields, values))
                if kind == "conjunctive":  # 160 classes: a sample of the phrasings keeps the kinds' sizes alike
                    templates_used = _sample(rng, templates, CONJUNCTIVE_TRAIN_PHRASINGS if split == "train" else 1)
                else:
                    templates_used = templates
                positives = [ids[i] for i in _matching(columns, source, named)]
                # negatives: 2 images differing from the class in each of the last two named fields
                # only (conjunctive: colour, writer; pixel-only: digit, colour; caption-only: digit, writer)
                near_misses = [[ids[i] for i in _matching(columns, source, named, differ=f)] for f in fields[-2:]]
                for template in templates_used:
                    text = template.format(d=_digit_form(named[0], _pick(rng, ("word", "numeral"))),
                                           c=named.get(1), w=named.get(2))
                    negatives = [x for miss in near_misses for x in _sample(rng, miss, N_NEGATIVES // 2)]
                    queries[split].append({"Q": text, "A": [_describe(named)], "img_posFacts": positives,
                                           "img_negFacts": negatives, "txt_posFacts": [], "txt_negFacts": [],
                                           "kind": kind})
    return meta, images, queries


def _text_part(rng):
    """-> (all_docs records, text queries per split)."""
    docs, facts = [], []  # facts: (n, kind, snippet id)
    others = [k for k in FACT_KINDS if k != "word"]
    for n in range(N_NUMBERS):
        applicable = [k for k in others if fact_answer(k, n) is not None]
        chosen = set(_sample(rng, applicable, FACTS_PER_NUMBER - 1)) | {"word"}
        for kind in (k for k in FACT_KINDS if k in chosen):  # canonical order
            value, _ = fact_answer(kind, n)
            sid = f"num-{n:03d}-{kind}"
            docs.append({"title": f"The number {n}", "fact": FACT_KINDS[kind][0].format(n=n, v=value),
                         "url": f"demo://numbers/{n}", "snippet_id": sid})
            facts.append((n, kind, sid))

    by_number, by_kind_split = {}, {}
    for n, kind, sid in facts:
        by_number.setdefault(n, []).append(sid)
        by_kind_split.setdefault((kind, number_split(n)), []).append(sid)
    queries = {s: [] for s in SPLITS}
    for n, kind, sid in facts:
        split = number_split(n)
        same_number = [x for x in by_number[n] if x != sid]
        same_kind = [x for x in by_kind_split[(kind, split)] if x != sid]
        negatives = _sample(rng, same_number, N_NEGATIVES // 2) + _sample(rng, same_kind, N_NEGATIVES // 2)
        queries[split].append({"Q": _pick(rng, FACT_KINDS[kind][1]).format(n=n), "A": [fact_answer(kind, n)[1]],
                               "img_posFacts": [], "img_negFacts": [], "txt_posFacts": [sid], "txt_negFacts": negatives,
                               "kind": "text"})
    return docs, queries


def _write_lines(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def _write_files(folder: Path, seed: int) -> dict:
    """Write every file of the corpus into `folder` -> the info record."""
    rng = np.random.default_rng(seed)
    meta, images, image_queries = _image_part(rng)
    docs, text_queries = _text_part(rng)

    with open(folder / "imgs.tsv", "wb") as tsv, open(folder / "imgs.lineidx.new", "w", newline="\n") as idx:
        for image_id, png in images:
            idx.write(f"{image_id}\t{tsv.tell()}\n")
            tsv.write(image_id.encode() + b"\t" + base64.b64encode(png) + b"\n")
    _write_lines(folder / "all_imgs.json", meta)
    _write_lines(folder / "all_docs.json", docs)

    counts = {"image_documents": len(meta), "text_documents": len(docs)}
    for split in SPLITS:
        mixed = image_queries[split] + text_queries[split]
        order = rng.permutation(len(mixed))  # images and texts interleaved, as in WebQA
        records = [{"qid": f"demo-{split}-{k:04d}", **mixed[j]} for k, j in enumerate(order)]
        _write_lines(folder / f"{split}.json", records)
        if split != "train":
            with open(folder / f"{split}_qrels.txt", "w", newline="\n") as fh:
                for r in records:
                    for d in r["img_posFacts"] + r["txt_posFacts"]:
                        fh.write(f"{r['qid']}\t{d}\t1\n")
        for kind in KINDS:
            counts[f"{split}_{kind}_queries"] = sum(1 for r in records if r["kind"] == kind)
    info = {"format": "mimic-engine demo corpus (WebQA layout)", "version": FORMAT_VERSION, "seed": seed,
            "kinds": list(KINDS), "counts": counts}
    # written last: its presence marks a complete corpus
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def demo_info(folder: str | Path) -> dict | None:
    """The info record of a complete demo corpus in `folder`, else None."""
    try:
        return json.loads((Path(folder) / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_demo_corpus(out_dir: str | Path, seed: int = 0, force: bool = False) -> dict:
    """Build the demo corpus in `out_dir` -> its info record. Takes a few seconds.

    Built in a temporary sibling folder and renamed into place, so a reader never sees half a
    corpus. An existing non-empty `out_dir` is replaced only with `force=True`, and only if it holds
    a demo corpus (never a folder of other files).
    """
    out = Path(out_dir)
    existing = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if existing:
        if demo_info(out) is None:
            raise DataError(f"{out} exists and is not a demo corpus; choose another folder (--out)")
        if not force:
            raise DataError(f"{out} already holds the demo corpus; pass force=True (--force) to rebuild it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-building-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is an ordinary folder
        info = _write_files(tmp, seed)
        if existing:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, old / "corpus")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.is_dir():
                out.rmdir()  # an empty folder: renaming onto it is not portable
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _older_version(info: dict) -> bool:
    """Was this corpus built by an earlier mimic-engine (a cache to rebuild, never to reuse)?"""
    version = info.get("version")
    return isinstance(version, int) and version < FORMAT_VERSION


def ensure_demo_corpus(out_dir: str | Path, seed: int = 0) -> dict:
    """The demo corpus in `out_dir`, built first if missing or of an earlier version -> its info record."""
    out = Path(out_dir)
    info = demo_info(out)
    stale = info is not None and _older_version(info)
    if info is None or stale:
        if stale:
            log.warning("%s holds demo corpus version %s; rebuilding it as version %d with seed %d",
                        out, info.get("version"), FORMAT_VERSION, seed)
        try:
            return build_demo_corpus(out, seed, force=stale)
        except OSError:  # another process renamed its build into place first
            info = demo_info(out)
            if info is None:
                raise
    if info.get("version") != FORMAT_VERSION or info.get("seed") != seed:
        raise DataError(f"{out} holds a demo corpus of version {info.get('version')} with seed {info.get('seed')}, "
                        f"but version {FORMAT_VERSION} with seed {seed} was asked for; rebuild it with "
                        f"`mimic-engine demo --out {out} --force --seed {seed}`")
    return info


def _summary(dataset, info: dict, folder: Path, seconds: float, built: bool) -> str:
    from collections import Counter

    mods = Counter(d.modality for d in dataset.documents)
    lines = [f"demo corpus {'built' if built else 'already present'} in {folder} ({seconds:.1f} s; "
             f"version {info['version']}, seed {info['seed']})",
             f"documents: {mods['image']} images (32x32 digit scans in {len(INK_COLOURS)} ink colours, captions "
             f"naming digit and writer), {mods['text']} text facts",
             f"{'split':<6}" + "".join(f"{kind:>13}" for kind in KINDS) + f"{'positives/image query':>23}"]
    for split in SPLITS:
        qs = dataset.queries.get(split, [])
        per_kind = Counter(q.kind for q in qs)
        img = [q for q in qs if dataset.positive_modality(q) == "image"]
        mean = sum(len(q.positives) for q in img) / max(1, len(img))
        lines.append(f"{split:<6}" + "".join(f"{per_kind[kind]:>13}" for kind in KINDS) + f"{mean:>23.1f}")
    return "\n".join(lines)


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder to build in (default: $MIMIC_HOME/demo, or ~/.cache/mimic-engine/demo).")
@click.option("--force", is_flag=True, help="Rebuild even if the folder already holds the demo corpus.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for captions, splits and phrasings.")
def demo_command(out, force, seed):
    """Build the demo corpus (coloured handwritten-digit scans + number facts, WebQA format) and print a summary."""
    from . import default_demo_dir
    from .webqa import read_webqa

    folder = Path(out) if out else default_demo_dir()
    t0 = time.perf_counter()
    info = demo_info(folder)
    built = force or info is None or _older_version(info)  # an earlier version's corpus is rebuilt
    info = build_demo_corpus(folder, seed, force=info is not None) if built else ensure_demo_corpus(folder, seed)
    dataset = read_webqa(folder, strict=True, name="demo")  # the demo exercises the WebQA reader
    click.echo(_summary(dataset, info, folder, time.perf_counter() - t0, built))
    if not built:
        click.echo("(pass --force to rebuild)")
