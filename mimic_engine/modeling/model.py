"""MimicModel: vision stage + fusion stage + logit scale, and the one factory that builds any config."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MimicConfig
from ..errors import ConfigError
from .fusion import FUSION_CLASSES
from .towers import TextBackbone, VisionStage


@dataclass
class EncoderBatch:
    """A collated batch of items (see `mimic_engine.preprocess.Preprocessor.collate`).

    input_ids (B, T) int64, attention_mask (B, T) int64 (an all-zero row = no text),
    pixel_values (N, 3, S, S) float32 for the N images of the batch in item order,
    image_counts (B,) int64 images per item (sums to N).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_counts: torch.Tensor
    truncated: list | None = None  # per item: was its text cut to max_length

    def to(self, device) -> "EncoderBatch":
        return EncoderBatch(self.input_ids.to(device), self.attention_mask.to(device), self.pixel_values.to(device),
                            self.image_counts.to(device), self.truncated)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def gather_visual_tokens(image_tokens: torch.Tensor, image_counts: torch.Tensor, max_images: int | None = None):
    """Place each item's images' tokens side by side.

    image_tokens (N, P, H) in item order, image_counts (B,) -> visual_tokens (B, K*P, H) zero-padded,
    visual_mask (B, K*P) int64, with K = the largest image count (or `max_images` if given).
    """
    b = image_counts.shape[0]
    p, h = image_tokens.shape[1], image_tokens.shape[2]
    k = int(image_counts.max().item()) if b and max_images is None else (max_images or 0)
    slots = torch.arange(k, device=image_counts.device).unsqueeze(0) < image_counts.unsqueeze(1)  # (B, K)
    padded = image_tokens.new_zeros(b, k, p, h)
    padded[slots] = image_tokens
    visual_mask = slots.unsqueeze(-1).expand(b, k, p).reshape(b, k * p).long()
    return padded.view(b, k * p, h), visual_mask


class MimicModel(nn.Module):
    """One model family, three fusions. An item is text-only, image-only or image(s)+text.

    Two stages, usable separately by export and serving:
      vision_stage(pixel_values (N, 3, S, S)) -> (N, P, H)
      fusion_stage(input_ids, attention_mask, visual_tokens (B, V, H), visual_mask) -> (B, E) unit vectors
    """

    def __init__(self, config: MimicConfig, load_weights: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        text = TextBackbone(config, load_weights)
        self.vision_stage = VisionStage(config, text.hidden_size, load_weights)
        self.fusion_stage = FUSION_CLASSES[config.fusion.fusion](config, text)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.fusion.logit_scale_init)))

    @property
    def embed_dim(self) -> int:
        return self.fusion_stage.embed_dim

    @property
    def hidden_size(self) -> int:
        return self.fusion_stage.text.hidden_size

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """(B items) -> (B, E) float32 unit vectors."""
        b = batch.input_ids.shape[0]
        if batch.pixel_values.shape[0]:
            image_tokens = self.vision_stage(batch.pixel_values)  # (N, P, H); no vision compute without images
            visual_tokens, visual_mask = gather_visual_tokens(image_tokens, batch.image_counts)
        else:
            dtype = next(self.fusion_stage.parameters()).dtype
            visual_tokens = torch.zeros(b, 0, self.hidden_size, dtype=dtype, device=batch.input_ids.device)
            visual_mask = torch.zeros(b, 0, dtype=torch.long, device=batch.input_ids.device)
        return self.fusion_stage(batch.input_ids, batch.attention_mask, visual_tokens, visual_mask)

    # Query and document roles are separate calls: today they compute the same function (one shared
    # encoder, as MARVEL and UniVL-DR), but callers must not rely on that.
    def encode_queries(self, batch: EncoderBatch) -> torch.Tensor:
        return self(batch)

    def encode_documents(self, batch: EncoderBatch) -> torch.Tensor:
        return self(batch)

    def scale(self) -> torch.Tensor:
        """The logit scale exp(s), clamped to 100 as CLIP does."""
        return self.logit_scale.exp().clamp(max=100.0)


def build_model(config: MimicConfig, load_weights: bool = True) -> MimicModel:
    """The one factory: any preset, any fusion. `load_weights=False` skips pretrained folders
    (used when a checkpoint supplies every weight)."""
    if load_weights and config.preset == "base" and not config.random_init:
        missing = [name for name, path in (("text", config.text.pretrained), ("vision", config.vision.pretrained))
                   if path is None]
        if missing:
            raise ConfigError(
                f"preset 'base' builds T5-base + CLIP ViT-B/32 from local from_pretrained folders, but no {' or '.join(missing)} "
                "folder is set; pass --text-model DIR --vision-model DIR (config text.pretrained / vision.pretrained), "
                "or --random-init (random_init=True) for random weights, e.g. for benchmarks"
            )
    return MimicModel(config, load_weights=load_weights)
