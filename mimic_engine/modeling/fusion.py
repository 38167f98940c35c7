"""The three fusion stages behind one signature.

    fusion(input_ids (B, T) int64, attention_mask (B, T) int64,
           visual_tokens (B, V, H) float, visual_mask (B, V) int64) -> (B, E) L2-normalised

A row of `attention_mask` that is all zero means "no text" (image-only item); a row of
`visual_mask` that is all zero means "no image" (text-only item). V may be 0 for a batch of
text-only items. Several images per item are simply more visual tokens (V = images x P).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MimicConfig
from .towers import FusionDecoder, TextBackbone


def _encoder_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The text encoder never sees a fully masked row (NaN risk): its first token always attends.

    The returned mask is used only inside the text encoder; fusion uses the caller's mask, so an
    image-only item's text states are still ignored.
    """
    mask = attention_mask.clone()
    mask[:, 0] = 1
    return mask


class _FusionBase(nn.Module):
    def __init__(self, config: MimicConfig, text: TextBackbone):
        super().__init__()
        self.text = text
        h = text.hidden_size
        e = config.fusion.embed_dim
        self.head = nn.Linear(h, e) if e is not None and e != h else nn.Identity()
        self.embed_dim = e if e is not None else h

    def finish(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(pooled).float(), dim=-1)  # (B, E), unit vectors in fp32


class DecoderFusion(_FusionBase):
    """MiMIC: text and visual tokens encoded separately, fused only in the decoder's cross-attention."""

    def __init__(self, config: MimicConfig, text: TextBackbone):
        super().__init__(config, text)
        self.decoder = FusionDecoder(config, text)
        h = text.hidden_size
        self.memory_norm = config.fusion.memory_norm
        if self.memory_norm:
            self.text_memory_norm = nn.LayerNorm(h)
            self.visual_memory_norm = nn.LayerNorm(h)
            self.modality_embed = nn.Parameter(torch.zeros(2, h))  # added to text (0) and visual (1) memory

    def forward(self, input_ids, attention_mask, visual_tokens, visual_mask):
        return self.finish(self.pool(input_ids, attention_mask, visual_tokens, visual_mask))

    def pool(self, input_ids, attention_mask, visual_tokens, visual_mask) -> torch.Tensor:
        """The decoder's first output state, before the head and the normalisation: (B, H)."""
        text_states = self.text(input_ids=input_ids, attention_mask=_encoder_mask(attention_mask))  # (B, T, H)
        visual_tokens = visual_tokens.to(text_states.dtype)  # (B, V, H)
        if self.memory_norm:
            embed = self.modality_embed.to(text_states.dtype)
            text_states = self.text_memory_norm(text_states) + embed[0]
            visual_tokens = self.visual_memory_norm(visual_tokens) + embed[1]
        memory = torch.cat([text_states, visual_tokens], dim=1)  # (B, T+V, H)
        memory_mask = torch.cat([attention_mask, visual_mask.to(attention_mask.dtype)], dim=1)  # (B, T+V)
        return self.decoder(memory, memory_mask)


class EarlyFusion(_FusionBase):
    """MARVEL-style: `<im_start> visual tokens <im_end> text` spliced into the text encoder's input,
    then the same one-step decoder pools the joint encoder output."""

    def __init__(self, config: MimicConfig, text: TextBackbone):
        super().__init__(config, text)
        self.image_markers = nn.Parameter(torch.randn(2, text.hidden_size) * 0.02)  # <im_start>, <im_end>
        self.decoder = FusionDecoder(config, text)

    def forward(self, input_ids, attention_mask, visual_tokens, visual_mask):
        b = input_ids.shape[0]
        text_embeds = self.text.embed(input_ids)  # (B, T, H)
        markers = self.image_markers.to(text_embeds.dtype)
        has_image = visual_mask.amax(dim=1, keepdim=True).to(attention_mask.dtype) if visual_mask.shape[1] else \
            torch.zeros(b, 1, dtype=attention_mask.dtype, device=attention_mask.device)  # (B, 1)
        embeds = torch.cat([
            markers[0].expand(b, 1, -1), visual_tokens.to(text_embeds.dtype), markers[1].expand(b, 1, -1), text_embeds,
        ], dim=1)  # (B, 2+V+T, H)
        mask = torch.cat([has_image, visual_mask.to(attention_mask.dtype), has_image, attention_mask], dim=1)
        # Padding sits between the visual and text tokens; move it to the end of each row so that
        # token positions (BERT's absolute ones, T5's relative bias) do not depend on how much
        # padding the rest of the batch needed.
        embeds, mask = _pack_left(embeds, mask)
        states = self.text(inputs_embeds=embeds, attention_mask=mask)  # (B, 2+V+T, H)
        return self.finish(self.decoder(states, mask))


class LateFusion(_FusionBase):
    """UniVL-DR-style: separate towers, `normalize(image_embedding + text_embedding)`.

    Text embedding: masked mean of text states; image embedding: masked mean of visual tokens;
    each through its own linear head. Missing parts contribute nothing.
    """

    def __init__(self, config: MimicConfig, text: TextBackbone):
        super().__init__(config, text)
        h = text.hidden_size
        self.text_head = nn.Linear(h, h)
        self.image_head = nn.Linear(h, h)

    def forward(self, input_ids, attention_mask, visual_tokens, visual_mask):
        text_states = self.text(input_ids=input_ids, attention_mask=_encoder_mask(attention_mask))  # (B, T, H)
        text_vec = self.text_head(_masked_mean(text_states, attention_mask))  # (B, H)
        image_vec = self.image_head(_masked_mean(visual_tokens.to(text_states.dtype), visual_mask))  # (B, H)
        has_text = attention_mask.amax(dim=1, keepdim=True).to(text_vec.dtype) if attention_mask.shape[1] else 0.0
        has_image = visual_mask.amax(dim=1, keepdim=True).to(text_vec.dtype) if visual_mask.shape[1] else 0.0
        return self.finish(text_vec * has_text + image_vec * has_image)


def _pack_left(embeds: torch.Tensor, mask: torch.Tensor):
    """Stable-move the unmasked tokens of each row to its front.

    embeds (B, L, H), mask (B, L) -> same shapes; a row's kept tokens keep their order. Built from
    cumsum + scatter (no sort) so it exports to ONNX with dynamic shapes.
    """
    valid = mask.long()
    n_valid = valid.sum(dim=1, keepdim=True)  # (B, 1)
    dest = torch.where(valid.bool(), valid.cumsum(1) - 1, n_valid + (1 - valid).cumsum(1) - 1)  # (B, L) permutation
    packed = torch.zeros_like(embeds).scatter(1, dest.unsqueeze(-1).expand_as(embeds), embeds)
    packed_mask = torch.zeros_like(valid).scatter(1, dest, valid)
    return packed, packed_mask.to(mask.dtype)


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H), (B, L) -> (B, H); an all-masked (or empty) row gives zeros."""
    m = mask.to(states.dtype).unsqueeze(-1)  # (B, L, 1)
    return (states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


FUSION_CLASSES = {"decoder": DecoderFusion, "early": EarlyFusion, "late": LateFusion}
