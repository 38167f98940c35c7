"""Training options and their one resolution step.

    options = TrainOptions(preset="small", fusion="late")     # what was asked (defaults < config file < flags)
    run = resolve_options(options)                            # -> ResolvedTraining (immutable)
    run.options.eval_every, run.config.strategy.mixin         # every value decided, nothing left None

A `TrainOptions` field that is None means "the preset decides": the preset's training defaults are
`PRESET_DEFAULTS` below, MiMIC's strategies (caption dropout, mix-in, query caption dropout) are
the defaults of `mimic_engine.config.TrainingStrategy`. `resolve_options` fills them in once, into a
new object: the caller's options are never changed. The model and the sampler read the strategies
from `config.strategy`; the resolved options carry the same values so that the checkpoint's
`meta["train_options"]` records what was run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from mimic_engine.config import DEFAULT_PRESET, FUSIONS, PRESETS, MimicConfig, TrainingStrategy, preset
from mimic_engine.data import KINDS as DATA_KINDS
from mimic_engine.device import check_device
from mimic_engine.errors import ConfigError, choice
from mimic_engine.evaluate import DEFAULT_KEEP_RATES

FREEZABLE = ("vision", "text")

# What each preset sets for the options left None. `small` and `small-effnet` are sized so that a
# default run (demo corpus, 2 CPU cores) ends within 5 minutes. Their pretrained MiniLM text tower is
# frozen: fine-tuning it costs ~5x per step on a CPU while the image tower (`small`: from scratch),
# the projector and the fusion decoder are what must learn.
_COMMON_DEFAULTS = {"max_minutes": None, "eval_every": 100, "patience": 5, "freeze": ()}
PRESET_DEFAULTS = {
    "tiny": dict(_COMMON_DEFAULTS),
    "small": {**_COMMON_DEFAULTS, "max_minutes": 3.0, "eval_every": 60, "patience": 8, "freeze": ("text",)},
    # the pretrained image tower stays frozen too: its tokens are then cached once per image
    "small-effnet": {**_COMMON_DEFAULTS, "max_minutes": 3.0, "eval_every": 60, "patience": 8,
                     "freeze": ("text", "vision")},
    "base": dict(_COMMON_DEFAULTS),
}
STRATEGY_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingStrategy))  # caption_dropout, ...
_TUPLE_FIELDS = ("freeze", "select_keep", "final_caption_keep")


@dataclass(frozen=True)
class TrainOptions:
    preset: str = DEFAULT_PRESET  # small-effnet
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
    # dotted model-config overrides of the preset, e.g. {"fusion.memory_norm": false} (--set KEY=VALUE)
    overrides: dict = field(default_factory=dict)
    # MiMIC's strategies; None = mimic_engine.config.TrainingStrategy's default
    caption_dropout: float | None = None  # P(drop an image item's caption); 0 disables
    mixin: float | None = None  # unimodal views per multimodal positive; 0 disables
    caption_dropout_queries: bool | None = None  # image+text queries lose their text with the same P
    # optimisation
    batch_size: int = 32  # queries per step; candidates = their positives + mix-in views + hard negatives
    grad_accum: int = 1
    steps: int = 2000  # upper bound; `max_minutes` usually ends a CPU run first
    max_minutes: float | None = None  # wall-clock budget of the loop (dev evaluations included); 0 = none
    lr: float = 5e-5  # pretrained weights
    lr_new: float = 5e-4  # weights trained from scratch (vision tower of `small`, projector, decoder, heads)
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of steps
    grad_clip: float = 1.0
    freeze: tuple | None = None  # subset of FREEZABLE; () = none
    amp: bool = True  # autocast on CUDA (bf16 where supported, else fp16 with a grad scaler)
    # hard negatives: a mined file (WebQA query lines with "all_negFacts"), 1 image + 1 text per query
    hard_negatives: str | None = None
    # evaluation / selection
    eval_every: int | None = None
    eval_max_queries: int | None = None
    patience: int | None = None  # evaluations without improvement of the selection metric before stopping; 0 = never
    # Model selection and early stopping: dev MRR@10 averaged over these caption-keep rates. The
    # default includes 0.0 so that a model is not selected for ignoring its images (same rule for
    # every fusion); pass 1.0 alone for selection with captions only.
    select_keep: tuple = (1.0, 0.0)
    final_caption_keep: tuple = DEFAULT_KEEP_RATES
    eval_batch_size: int = 128
    resume: str | None = None  # a last.pt written by an earlier run
    progress: bool = True

    def __post_init__(self):
        for name in _TUPLE_FIELDS:  # lists from JSON/TOML become tuples: the options stay immutable
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                if isinstance(value, str) or not hasattr(value, "__iter__"):
                    raise ConfigError(f"{name}={value!r} must be a list of values")
                object.__setattr__(self, name, tuple(value))

    def validate(self) -> "TrainOptions":
        choice("preset", self.preset, PRESETS)
        choice("fusion", self.fusion, FUSIONS)
        choice("data", self.data, DATA_KINDS)
        check_device(self.device)
        for f in self.freeze or ():
            choice("freeze", f, FREEZABLE)
        if not isinstance(self.overrides, dict) or not all(isinstance(k, str) for k in self.overrides):
            raise ConfigError(f"overrides={self.overrides!r} must map dotted config keys to values, "
                              'e.g. {"fusion.memory_norm": false}')
        for name in ("batch_size", "grad_accum", "steps", "eval_every", "eval_batch_size", "eval_max_queries"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2: in-batch negatives need other queries")
        if self.patience is not None and self.patience < 0:
            raise ConfigError(f"patience={self.patience} must be >= 0 (0 = no early stopping)")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ConfigError(f"max_minutes={self.max_minutes} must be >= 0 (0 = no time budget)")
        if self.caption_dropout is not None and not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout={self.caption_dropout} must be in [0, 1]")
        if self.mixin is not None and not 0.0 <= self.mixin <= 10.0:
            raise ConfigError(f"mixin={self.mixin} must be in [0, 10] (expected unimodal views per multimodal positive)")
        for r in list(self.final_caption_keep) + list(self.select_keep):
            if not 0.0 <= float(r) <= 1.0:
                raise ConfigError(f"caption-keep rate {r} must be in [0, 1]")
        return self

    def to_dict(self) -> dict:
        """Plain data (lists, not tuples), as saved in checkpoints and read back by `from_dict`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, where: str = "options") -> "TrainOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} in {where}; known: {sorted(known)}")
        return cls(**data).validate()


@dataclass(frozen=True)
class ResolvedTraining:
    """The outcome of `resolve_options`: every option decided, and the model to build."""

    options: TrainOptions  # no None left where the preset or TrainingStrategy decides
    config: MimicConfig  # config.strategy: caption dropout, mix-in, query caption dropout


def resolve_options(options: TrainOptions) -> ResolvedTraining:
    """Options + the preset's defaults -> ResolvedTraining. Returns new objects; `options` is unchanged."""
    options.validate()
    preset_defaults = {k: v for k, v in PRESET_DEFAULTS[options.preset].items() if getattr(options, k) is None}
    overrides = {f"strategy.{name}": getattr(options, name) for name in STRATEGY_FIELDS
                 if getattr(options, name) is not None}
    if options.text_model:
        overrides["text.pretrained"] = options.text_model
    if options.tokenizer or options.text_model:
        overrides["text.tokenizer"] = options.tokenizer or options.text_model
    if options.vision_model:
        overrides["vision.pretrained"] = options.vision_model
    if options.random_init:
        overrides["random_init"] = True
    overrides.update(options.overrides)
    config = preset(options.preset, options.fusion, **overrides)
    strategy = {name: getattr(config.strategy, name) for name in STRATEGY_FIELDS}
    return ResolvedTraining(dataclasses.replace(options, **preset_defaults, **strategy), config)


def load_config_file(path: str) -> dict:
    """A JSON or TOML file of option names (underscores) -> dict; unknown names are an error."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, "rb") as fh:
        raw = fh.read()
    if path.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(raw.decode())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML ({exc})") from exc
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid JSON ({exc}); use .json or .toml") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold an object of option names, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} in {path!r}; known: {sorted(known)}")
    return data
