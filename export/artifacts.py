"""Writing the export directory: its layout, the input/output contract of the two graphs, and
writing it so that nothing half-written ever looks complete. The part of the format the runtime
reads (manifest, variants, config and tokenizer, graph metadata keys, TensorRT sidecars) is
owned by `mimic_engine.runtime.export_format`, which this package writes through.

Layout (`mimic-engine export ckpt.pt --out DIR`):

    DIR/
      manifest.json            written LAST: format, source checkpoint and model id, files with sizes
                               and hashes, variants, what was skipped and why, "complete": true|false
      model_card.json          the contract below, machine-readable (no mimic-engine needed to read it)
      README.md                the same for people: inputs, outputs, a plain-onnxruntime example
      config.json              MimicConfig.to_dict()
      tokenizer/               the tokenizer's own files (AutoTokenizer.from_pretrained(DIR/tokenizer))
      vision.onnx, fusion.onnx                   fp32, the reference graphs
      vision.optimized.onnx, fusion.optimized.onnx   ONNX Runtime-fused (CPU)
      vision.int8.onnx, fusion.int8.onnx             dynamic int8 weights (CPU)
      vision.fp16.onnx, fusion.fp16.onnx             fp16 with fp32 norms/softmax/FFN output (GPU)
      <graph>.onnx.data        external weights, only for graphs over 2 GB
      parity.json              ONNX Runtime vs PyTorch on unseen shapes
      tensorrt/                engines + JSON sidecars + timing cache, where TensorRT was available

Only `manifest.json`, `config.json` and `tokenizer/` are read by the runtime besides the graphs;
everything else is documentation. This module imports neither torch nor onnx.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

from ..checkpoint import file_sha256
from ..errors import ConfigError
from ..runtime.export_format import MANIFEST, ExportError, manifest_model_id


# ---- the input/output contract ------------------------------------------------------------------
@dataclass
class Range:
    """min <= opt <= max of one dynamic dimension (TensorRT profiles; parity shapes stay inside)."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self):
        values = (self.min, self.opt, self.max)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{self.name} range {values} must be three integers min,opt,max")
        if not 0 < self.min <= self.opt <= self.max:
            raise ConfigError(f"{self.name} range min={self.min}, opt={self.opt}, max={self.max} violates "
                              "1 <= min <= opt <= max; give e.g. 1,16,64")

    @classmethod
    def parse(cls, name: str, text: str) -> "Range":
        """"1,16,64" -> Range(name, 1, 16, 64)."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{name} range {text!r} is not three integers; write MIN,OPT,MAX such as 1,16,64") from None
        if len(values) != 3:
            raise ConfigError(f"{name} range {text!r} has {len(values)} values; write MIN,OPT,MAX such as 1,16,64")
        return cls(name, *values)

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


DEFAULT_BATCH = Range("batch", 1, 16, 64)  # items per batch of the exported graphs (TensorRT profile)


@dataclass
class ShapeRanges:
    """The dynamic dimensions of both graphs. `images` (vision batch) is derived, not an option."""

    batch: Range
    text_len: Range
    visual_tokens: Range
    images: Range

    @classmethod
    def defaults(cls, config, batch: Range | None = None, text_len: Range | None = None,
                 visual_tokens: Range | None = None) -> "ShapeRanges":
        """Ranges that suit `config`: up to 64 items, text up to max_length, up to
        max_images_per_item images per item (V counts visual tokens, P per image)."""
        p = config.visual_tokens_per_image
        max_len = config.text.max_length
        batch = batch or DEFAULT_BATCH
        text_len = text_len or Range("text_len", 1, max(1, max_len // 2), max_len)
        visual_tokens = visual_tokens or Range("visual_tokens", 1, p, config.vision.max_images_per_item * p)
        return cls.build(config, batch, text_len, visual_tokens)

    @classmethod
    def build(cls, config, batch: Range, text_len: Range, visual_tokens: Range) -> "ShapeRanges":
        p = config.visual_tokens_per_image
        if visual_tokens.max < p:
            raise ConfigError(f"visual_tokens max={visual_tokens.max} is below one image's {p} tokens; "
                              f"use a max of at least {p} (images x {p})")
        if text_len.max > config.text.max_length:
            raise ConfigError(f"text_len max={text_len.max} exceeds the model's text.max_length="
                              f"{config.text.max_length}; longer texts are truncated, so use at most that")
        images = Range("images", 1, batch.opt, batch.max * max(1, visual_tokens.max // p))
        return cls(batch, text_len, visual_tokens, images)

    def to_dict(self) -> dict:
        return {r.name: r.as_list() for r in (self.batch, self.text_len, self.visual_tokens, self.images)}

    @classmethod
    def from_dict(cls, data: dict) -> "ShapeRanges":
        return cls(*(Range(name, *data[name]) for name in ("batch", "text_len", "visual_tokens", "images")))


def io_spec(config) -> dict:
    """stage -> {"inputs": [...], "outputs": [...]}, each tensor {name, dtype, shape}; str dims are dynamic."""
    s = config.vision.image_size
    p = config.visual_tokens_per_image
    h = config.text.hf_config.get("hidden_size") or config.text.hf_config["d_model"]
    e = config.fusion.embed_dim or h
    return {
        "vision": {
            "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["num_images", 3, s, s]}],
            "outputs": [{"name": "visual_tokens", "dtype": "float32", "shape": ["num_images", p, h]}],
        },
        "fusion": {
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "text_len"]},
                {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "text_len"]},
                {"name": "visual_tokens", "dtype": "float32", "shape": ["batch", "visual_len", h]},
                {"name": "visual_mask", "dtype": "int64", "shape": ["batch", "visual_len"]},
            ],
            "outputs": [{"name": "embeddings", "dtype": "float32", "shape": ["batch", e]}],
        },
    }


# Rules a caller must follow; written into model_card.json and README.md.
INPUT_RULES = [
    "attention_mask: 1 for real tokens, 0 for padding; an all-zero row means the item has no text (image-only).",
    "visual_mask: 1 for real visual tokens, 0 for padding; an all-zero row means the item has no image.",
    "visual_len must be >= 1: for a batch without any image pass ONE zero visual token per item with "
    "visual_mask 0 (a zero-size visual dimension is not supported by the early and late fusion graphs "
    "in ONNX Runtime: reductions over an empty axis give the wrong identity).",
    "Several images per item: run the vision graph on all N images of the batch, then place item i's "
    "images side by side: visual_tokens[i] = concat(tokens of its k_i images) padded with zeros to "
    "K*P rows (K = most images of any item in the batch), visual_mask 1 on the first k_i*P rows.",
    "Every item needs text or at least one image (a row masked everywhere is undefined).",
    "embeddings are L2-normalised float32; rank by dot product.",
]


# ---- files ----------------------------------------------------------------------------------------
def file_table(root: str) -> dict:
    """relative path -> {"bytes", "sha256"} for every file under root except the manifest."""
    table = {}
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != MANIFEST:
                table[rel] = {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
    return dict(sorted(table.items()))


# ---- writing safely -------------------------------------------------------------------------------
def check_target(out_dir: str, model_ids, force: bool, marker: str = MANIFEST) -> None:
    """Refuse to overwrite a folder that holds something else; a re-export of the same model is fine.

    `model_ids`: the ids the model answers to (its content id, then legacy ids such as its
    checkpoint file's sha256, which exports of format 1 recorded). `marker` is the file that
    identifies our own output (the manifest, or the Triton repo's marker).
    """
    model_ids = [model_ids] if isinstance(model_ids, str) else list(model_ids)
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ExportError(f"output path {out_dir!r} is a file; pass a directory path to --out")
    entries = os.listdir(out_dir)
    if not entries or force:
        return
    marker_path = os.path.join(out_dir, marker)
    if not os.path.exists(marker_path):
        raise ExportError(f"output folder {out_dir!r} is not empty and holds no {marker} (files such as "
                          f"{sorted(entries)[:3]}): it is not a mimic-engine export; choose another --out or pass --force")
    other = manifest_model_id(marker_path)
    if other not in model_ids:
        raise ExportError(f"output folder {out_dir!r} holds the artifacts of another model (model "
                          f"{str(other)[:12]}, this one is {model_ids[0][:12]}); choose another --out or pass --force")


class StagingDir:
    """Write into a sibling temp folder, then swap it into place in one rename.

    A crash or an error leaves the target untouched and removes the temp folder; only `commit()`
    makes the new files visible, and it replaces an older export of the same target.
    """

    def __init__(self, target: str):
        self.target = os.path.abspath(target)
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.path = os.path.join(parent, f".{os.path.basename(self.target)}.tmp-{os.getpid()}-{int(time.time())}")
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.makedirs(self.path)
        self.committed = False

    def commit(self) -> str:
        old = None
        if os.path.exists(self.target):
            old = f"{self.path}.old"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.target

    def discard(self) -> None:
        if not self.committed and os.path.exists(self.path):
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
