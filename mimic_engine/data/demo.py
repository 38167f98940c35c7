"""The bundled demo corpus: real handwritten-digit scans plus facts about numbers, written in the
WebQA retrieval format (so the demo runs through the WebQA reader) in a few seconds, offline.

Source: the 1797 8x8 grayscale digit scans bundled with scikit-learn (`load_digits`, no download).

Design (the corpus must show whether a model uses the pixels):
- Image documents: every scan, dark ink on white, upscaled bicubic to 32x32 PNG; id = 10000 + its
  index in load_digits. Its class is (digit, stroke weight): "light" = the lighter half of that
  digit's scans by total ink, "bold" = the heavier half (ties broken by index) -> 20 classes of
  about 90 images. Captions state digit and weight with 6 templates, word or numeral form and 5
  adjectives per weight ("a bold handwritten seven", "scan of the digit 7 written with thin
  strokes"), chosen by the seed.
- The images of each class are split 60/20/20 into train/dev/test pools (stratified, seeded).
- Image-seeking text queries: 12 phrasing templates ("show me a heavily inked 7", ...); 8 are used
  for train, 2 for dev and 2 for test, so test phrasings are unseen. Train: every class x train
  template x {word, numeral} form (320 queries); dev/test: every class x that split's templates,
  the form picked by the seed (40 each). Positives: for train queries the class's train-pool
  images only; for dev/test queries all images of the class (about 90, relevance is the class);
  so the pixels of dev/test-pool images are never a training positive or negative.
- Text documents: 5 facts about each integer 0..199 (the English words always, plus 4 of square,
  parity, binary, successor, predecessor, Roman numerals, primality, double, digit sum, picked by
  the seed) -> 1000 facts, snippet ids `num-013-square`.
- Text queries: one question per fact ("What is the square of 13?"), two phrasings per kind,
  exactly one positive. Split by the integer: n % 5 == 3 -> dev, n % 5 == 4 -> test, else train
  (600 / 200 / 200), so no dev/test number's facts are trained on.
- Negatives: 4 per query of the positives' modality (img_negFacts: 2 images of the same digit with
  the other weight + 2 of other digits; txt_negFacts: 2 other facts of the same number + 2 facts of
  the same kind about other numbers of the same split); a train query's negatives come from the
  train pool only.
- Every query has positives in exactly one modality, as in WebQA.

Sizes (seed 0): 1797 image + 1000 text documents; train 320 image + 600 text queries, dev and test
40 image + 200 text queries each. Files are byte-for-byte identical for the same seed.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..errors import DataError

FORMAT_VERSION = 1
INFO_FILE = "demo_info.json"
IMAGE_SIZE = 32
IMAGE_ID_BASE = 10000
N_NUMBERS = 200
FACTS_PER_NUMBER = 5
N_NEGATIVES = 4
SPLITS = ("train", "dev", "test")
POOL_FRACTIONS = (0.6, 0.2)  # train, dev; test gets the rest

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WEIGHTS = ("light", "bold")

CAPTION_ADJECTIVES = {"light": ["light", "thin", "faint", "fine", "pale"],
                      "bold": ["bold", "thick", "heavy", "dark", "broad"]}
CAPTION_TEMPLATES = [
    "a {adj} handwritten {d}",
    "scan of the digit {d} written with {adj} strokes",
    "handwritten {d} in {adj} pen strokes",
    "the number {d} drawn with a {adj} line",
    "{adj} scan of a handwritten {d}",
    "a digit {d} written in {adj} ink on white paper",
]
QUERY_ADJECTIVES = {"light": ["faint", "lightly inked", "thin", "light", "weakly drawn"],
                    "bold": ["heavily inked", "bold", "thick", "heavy", "strongly drawn"]}
QUERY_TEMPLATES = {
    "train": [
        "show me a {adj} {d}",
        "find a {adj} handwritten {d}",
        "a picture of the digit {d} written in {adj} strokes",
        "which scan shows a {adj} {d}?",
        "image of a handwritten {d} with {adj} ink",
        "I am looking for a {adj} written number {d}",
        "retrieve handwriting of a {d} that looks {adj}",
        "{adj} {d}, handwritten",
    ],
    "dev": [
        "can you find a scanned {d} drawn with {adj} lines",
        "get me an example of a {adj} handwritten digit {d}",
    ],
    "test": [
        "search for a {d} someone wrote with a {adj} hand",
        "what does a {adj} {d} look like when handwritten?",
    ],
}

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
def _digit_images():
    """-> (PNG bytes per scan, digit per scan, total ink per scan) from scikit-learn's bundled scans."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pngs = []
    for scan in digits.images:  # (8, 8) float, 0 (paper) .. 16 (ink)
        gray = np.round(255 - scan * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        img = Image.fromarray(gray, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, digits.target.astype(int), digits.images.reshape(len(pngs), -1).sum(axis=1)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _sample(rng, pool: list, k: int) -> list:
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False))]


def _digit_form(d: int, form: str) -> str:
    return DIGIT_WORDS[d] if form == "word" else str(d)


def _image_part(rng):
    """-> (all_imgs records, tsv payloads [(image_id, png)], image queries per split)."""
    pngs, target, ink = _digit_images()
    ids = [str(IMAGE_ID_BASE + i) for i in range(len(pngs))]

    # class = (digit, weight): the lighter half of each digit's scans by ink is "light"
    cls = {}
    for d in range(10):
        members = sorted(np.flatnonzero(target == d), key=lambda i: (ink[i], i))
        for rank, i in enumerate(members):
            cls[int(i)] = (d, WEIGHTS[rank >= len(members) // 2])
    classes = [(d, w) for d in range(10) for w in WEIGHTS]

    meta = []
    for i, image_id in enumerate(ids):
        d, w = cls[i]
        caption = _pick(rng, CAPTION_TEMPLATES).format(adj=_pick(rng, CAPTION_ADJECTIVES[w]),
                                                      d=_digit_form(d, _pick(rng, ("word", "numeral"))))
        meta.append({"title": f"Handwritten digit scan {i}", "caption": caption, "image_id": int(image_id)})

    # stratified 60/20/20 pools
    pool = {s: {c: [] for c in classes} for s in SPLITS}
    for c in classes:
        members = [i for i in range(len(ids)) if cls[i] == c]
        order = [members[j] for j in rng.permutation(len(members))]
        n_train, n_dev = round(POOL_FRACTIONS[0] * len(order)), round(POOL_FRACTIONS[1] * len(order))
        for s, part in zip(SPLITS, (order[:n_train], order[n_train:n_train + n_dev], order[n_train + n_dev:])):
            pool[s][c] = sorted(ids[i] for i in part)
    every = {c: sorted(ids[i] for i in range(len(ids)) if cls[i] == c) for c in classes}

    queries = {s: [] for s in SPLITS}
    for split in SPLITS:
        # train queries see train-pool images only; dev/test relevance is the whole class
        source = pool["train"] if split == "train" else every
        for template in QUERY_TEMPLATES[split]:
            for d, w in classes:
                forms = ("word", "numeral") if split == "train" else (_pick(rng, ("word", "numeral")),)
                for form in forms:
                    text = template.format(adj=_pick(rng, QUERY_ADJECTIVES[w]), d=_digit_form(d, form))
                    other_weight = (d, WEIGHTS[1 - WEIGHTS.index(w)])
                    other_digits = [x for c in classes if c[0] != d for x in source[c]]
                    negatives = _sample(rng, source[other_weight], N_NEGATIVES // 2) + _sample(rng, other_digits, N_NEGATIVES // 2)
                    queries[split].append({"Q": text, "A": [f"a {w} handwritten {d}"], "img_posFacts": list(source[(d, w)]),
                                           "img_negFacts": negatives, "txt_posFacts": [], "txt_negFacts": []})
    return meta, list(zip(ids, pngs)), queries


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
                               "img_posFacts": [], "img_negFacts": [], "txt_posFacts": [sid], "txt_negFacts": negatives})
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
        counts[f"{split}_image_queries"] = len(image_queries[split])
        counts[f"{split}_text_queries"] = len(text_queries[split])
    info = {"format": "mimic-engine demo corpus (WebQA layout)", "version": FORMAT_VERSION, "seed": seed,
            "counts": counts}
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


def ensure_demo_corpus(out_dir: str | Path, seed: int = 0) -> dict:
    """The demo corpus in `out_dir`, built first if missing -> its info record."""
    out = Path(out_dir)
    info = demo_info(out)
    if info is None:
        try:
            return build_demo_corpus(out, seed)
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
    lines = [f"demo corpus {'built' if built else 'already present'} in {folder} ({seconds:.1f} s; seed {info['seed']})",
             f"documents: {mods['image']} images (32x32 digit scans, captioned), {mods['text']} text facts",
             f"{'split':<6} {'image queries':>14} {'text queries':>13} {'positives/image query':>22}"]
    for split in SPLITS:
        qs = dataset.queries.get(split, [])
        img = [q for q in qs if dataset.positive_modality(q) == "image"]
        mean = sum(len(q.positives) for q in img) / max(1, len(img))
        lines.append(f"{split:<6} {len(img):>14} {len(qs) - len(img):>13} {mean:>22.1f}")
    return "\n".join(lines)


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder to build in (default: $MIMIC_HOME/demo, or ~/.cache/mimic-engine/demo).")
@click.option("--force", is_flag=True, help="Rebuild even if the folder already holds the demo corpus.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for captions, splits and phrasings.")
def demo_command(out, force, seed):
    """Build the demo corpus (handwritten-digit scans + number facts, WebQA format) and print a summary."""
    from . import default_demo_dir
    from .webqa import read_webqa

    folder = Path(out) if out else default_demo_dir()
    t0 = time.perf_counter()
    built = force or demo_info(folder) is None
    info = build_demo_corpus(folder, seed, force=force) if built else ensure_demo_corpus(folder, seed)
    dataset = read_webqa(folder, strict=True, name="demo")  # the demo exercises the WebQA reader
    click.echo(_summary(dataset, info, folder, time.perf_counter() - t0, built))
    if not built:
        click.echo("(pass --force to rebuild)")
