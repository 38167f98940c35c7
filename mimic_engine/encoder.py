"""MimicEncoder: model + preprocessing in one object; items in, unit vectors out.

Training evaluation, index building and the PyTorch runtime backend all encode through this.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import MimicConfig, preset
from .device import resolve_device
from .preprocess import Item, Preprocessor, load_tokenizer


class MimicEncoder:
    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", model_id: str | None = None,
                 legacy_model_ids: tuple = ()):
        self.device = torch.device(resolve_device(device))  # "auto" = CUDA when available
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.preprocessor = Preprocessor(model.config, tokenizer)
        self.model_id = model_id or f"random:{model.config.preset or 'custom'}:{model.config.fusion.fusion}"
        self.legacy_model_ids = tuple(legacy_model_ids)  # older ids indexes may hold (the checkpoint file's sha256)

    @property
    def config(self) -> MimicConfig:
        return self.model.config

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu") -> "MimicEncoder":
        from .checkpoint import load_checkpoint

        device = resolve_device(device)
        ckpt = load_checkpoint(path, device)
        return cls(ckpt.model, ckpt.tokenizer, device, model_id=ckpt.model_id, legacy_model_ids=ckpt.legacy_ids)

    @classmethod
    def from_config(cls, config: MimicConfig, device: str | torch.device = "cpu", seed: int = 0) -> "MimicEncoder":
        from .modeling import build_model

        torch.manual_seed(seed)
        return cls(build_model(config), load_tokenizer(config), device)

    @classmethod
    def from_preset(cls, name: str, fusion: str = "decoder", device="cpu", seed: int = 0, **overrides):
        return cls.from_config(preset(name, fusion, **overrides), device, seed)

    @torch.no_grad()
    def encode(self, items: Sequence[Item], role: str = "document", batch_size: int = 64) -> np.ndarray:
        """-> (N, E) float32 unit vectors, in input order. Items are length-sorted into batches to limit padding."""
        order = sorted(range(len(items)), key=lambda i: (len(items[i].images), len(items[i].text or "")))
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        fn = self.model.encode_queries if role == "query" else self.model.encode_documents
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.preprocessor.collate([items[i] for i in idx]).to(self.device)
            out[idx] = fn(batch).float().cpu().numpy()
        return out
