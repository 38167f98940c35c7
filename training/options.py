"""Training options: defaults < config file (JSON or TOML) < command line.

Every option is plain data and is saved in the checkpoint's `meta["train_options"]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

from mimic_engine.config import FUSIONS, PRESETS
from mimic_engine.errors import ConfigError, choice

DATA_KINDS = ("demo", "webqa", "evqa", "jsonl")
FREEZABLE = ("vision", "text")


@dataclass
class TrainOptions:
    preset: str = "small"
    fusion: str = "decoder"
    data: str = "demo"
    data_dir: str | None = None
    out: str = "runs/mimic"
    device: str = "auto"  # auto = cuda when available
    seed: int = 0
    # backbones (the `base` preset needs folders written by save_pretrained, or random_init)
    text_model: str | None = None  # local T5 / BERT folder
    vision_model: str | None = None  # local CLIP vision folder
    tokenizer: str | None = None  # local tokenizer folder (default: text_model)
    random_init: bool = False
    # dotted model-config overrides applied to the preset, e.g. {"vision.image_size": 128} (--set KEY=VALUE)
    overrides: dict = field(default_factory=dict)
    # MiMIC's strategies (None = the preset's default, see mimic_engine.config.TrainingStrategy)
    caption_dropout: float | None = None
    mixin: float | None = None
    caption_dropout_queries: bool | None = None
    # optimisation
    batch_size: int = 32  # queries per step; candidates = their positives + mix-in views + hard negatives
    grad_accum: int = 1
    steps: int = 2000  # upper bound; `max_minutes` usually ends a CPU run first
    max_minutes: float | None = None  # wall-clock budget of the loop (dev evaluations included, final report not)
    lr: float = 5e-5  # pretrained weights
    lr_new: float = 5e-4  # weights trained from scratch (vision tower of `small`, projector, decoder, heads)
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of steps
    grad_clip: float = 1.0
    freeze: list | None = None  # subset of FREEZABLE; None = the preset's default (training/loop.py); [] = none
    amp: bool = True  # autocast on CUDA (bf16 where supported, else fp16 with a grad scaler)
    # hard negatives: a mined file (WebQA query lines with "all_negFacts"), 1 image + 1 text per query
    hard_negatives: str | None = None
    # evaluation / selection
    eval_every: int | None = None  # None = the preset's default (training/loop.py)
    eval_max_queries: int | None = None
    patience: int | None = None  # evaluations without improvement of the selection metric before stopping
    # Model selection and early stopping: dev MRR@10 averaged over these caption-keep rates. The
    # default includes 0.0 so that a model is not selected for ignoring its images (same rule for
    # every fusion); pass 1.0 alone for selection with captions only.
    select_keep: list = field(default_factory=lambda: [1.0, 0.0])
    final_caption_keep: list = field(default_factory=lambda: [1.0, 0.5, 0.0])
    eval_batch_size: int = 128
    resume: str | None = None  # a last.pt written by an earlier run
    progress: bool = True

    def validate(self) -> "TrainOptions":
        choice("preset", self.preset, PRESETS)
        choice("fusion", self.fusion, FUSIONS)
        choice("data", self.data, DATA_KINDS)
        for f in self.freeze or []:
            choice("freeze", f, FREEZABLE)
        for name in ("batch_size", "grad_accum", "steps", "eval_every"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2: in-batch negatives need other queries")
        for name in ("caption_dropout",):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name}={v} must be in [0, 1]")
        if self.mixin is not None and not 0.0 <= self.mixin <= 10.0:
            raise ConfigError(f"mixin={self.mixin} must be in [0, 10] (expected unimodal views per multimodal positive)")
        for r in list(self.final_caption_keep) + list(self.select_keep):
            if not 0.0 <= float(r) <= 1.0:
                raise ConfigError(f"caption-keep rate {r} must be in [0, 1]")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, "rb") as fh:
        raw = fh.read()
    if path.endswith(".toml"):
        import tomllib

        data = tomllib.loads(raw.decode())
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid JSON ({exc}); use .json or .toml") from exc
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} in {path!r}; known: {sorted(known)}")
    return data


def _floats(text: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1.0,0.5,0.0, got {text!r}")


def _override(text: str) -> tuple:
    """KEY=VALUE with a dotted config key and a JSON value (a bare word is a string): vision.image_size=128."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a dotted config key, e.g. vision.image_size=128, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python training/train.py",
        description="Train MiMIC (fusion-in-decoder) or the early/late fusion baselines; writes OUT/ckpt.pt (best dev MRR@10).",
    )
    p.add_argument("--config", help="JSON or TOML file of options; command-line flags override it")
    p.add_argument("--preset", choices=PRESETS)
    p.add_argument("--fusion", choices=FUSIONS)
    p.add_argument("--data", choices=DATA_KINDS)
    p.add_argument("--data-dir")
    p.add_argument("--out")
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--text-model", help="local from_pretrained folder of the text backbone (T5 / BERT)")
    p.add_argument("--vision-model", help="local from_pretrained folder of the CLIP vision backbone")
    p.add_argument("--tokenizer", help="local tokenizer folder (default: --text-model)")
    p.add_argument("--random-init", action="store_const", const=True, help="random backbone weights (benchmarks)")
    p.add_argument("--set", dest="overrides", type=_override, action="append", metavar="KEY=VALUE",
                   help="override a model config field of the preset (repeatable), e.g. --set vision.image_size=128")
    p.add_argument("--caption-dropout", type=float, help="P(drop an image item's caption); 0 disables")
    p.add_argument("--mixin", type=float, help="unimodal views per multimodal positive; 0 disables")
    p.add_argument("--no-query-caption-dropout", dest="caption_dropout_queries", action="store_const", const=False)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-new", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--freeze", action="append", choices=FREEZABLE + ("none",),
                   help="freeze a tower (repeatable); 'none' trains everything (default: the preset's choice)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False)
    p.add_argument("--hard-negatives", help="mined file from `python training/mine.py`")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-max-queries", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--select-keep", type=_floats, help="caption-keep rates whose mean dev MRR@10 selects the checkpoint")
    p.add_argument("--caption-keep", dest="final_caption_keep", type=_floats)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--resume", help="continue from OUT/last.pt of an earlier run")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    return p


def parse_options(argv: list[str] | None) -> TrainOptions:
    args = vars(build_parser().parse_args(argv))
    merged = load_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    if args.get("freeze"):
        args["freeze"] = [f for f in args["freeze"] if f != "none"]
    if args.get("overrides"):
        args["overrides"] = {**merged.get("overrides", {}), **dict(args["overrides"])}
    merged.update({k: v for k, v in args.items() if v is not None})
    return TrainOptions(**merged).validate()
