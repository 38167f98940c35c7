"""The one interface every inference backend implements.

    backend.encode(items, role) -> (N, E) float32 unit vectors, in input order

A backend runs the model's two stages; the shared `encode` here preprocesses, runs the vision
stage only for items that have images, places the visual tokens per item and runs the fusion
stage. Backends differ only in `run_vision` / `run_fusion` (PyTorch, ONNX Runtime, TensorRT, the
CUDA-graph backend), so they all see identical inputs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..modeling import EncoderBatch, gather_visual_tokens
from ..preprocess import Item, Preprocessor


def as_numpy(t: torch.Tensor, dtype) -> np.ndarray:
    """A contiguous host copy of a tensor in `dtype`: the feed of a graph runtime."""
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"expected a torch tensor, got {type(t).__name__}")
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)


def nonempty_visual(visual_tokens: torch.Tensor, visual_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fusion inputs for a graph runtime: a batch without images gets one masked zero token per item.

    ONNX Runtime does not support a zero-size visual axis in the early and late fusion graphs
    (reductions over an empty axis) and TensorRT profiles start at V=1; a masked token changes
    nothing (tested against PyTorch). (B, 0, H), (B, 0) -> (B, 1, H), (B, 1); others unchanged.
    """
    if visual_tokens.shape[1]:
        return visual_tokens, visual_mask
    b, h = visual_tokens.shape[0], visual_tokens.shape[2]
    return torch.zeros(b, 1, h, dtype=torch.float32), torch.zeros(b, 1, dtype=torch.long)


class Backend(ABC):
    name: str = "abstract"

    def __init__(self, preprocessor: Preprocessor, model_id: str, dim: int, legacy_model_ids: tuple = ()):
        self.preprocessor = preprocessor
        self.model_id = model_id  # the model's content id (checkpoint.model_content_id), or "random:<preset>:<fusion>"
        # older ids of the same model that indexes may hold: the checkpoint file's sha256
        self.legacy_model_ids = tuple(i for i in legacy_model_ids if i and i != model_id)
        self.dim = dim

    # ---- stages: torch tensors in, torch tensors out (CPU or the backend's device) ----------------
    @abstractmethod
    def run_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float32 -> (N, P, H) visual tokens."""

    @abstractmethod
    def run_fusion(self, input_ids, attention_mask, visual_tokens, visual_mask) -> torch.Tensor:
        """(B, T) int64, (B, T) int64, (B, V, H) float, (B, V) int64 -> (B, E) float32 unit vectors."""

    # ---- shared -------------------------------------------------------------------------------
    def encode_batch(self, batch: EncoderBatch, role: str = "document") -> np.ndarray:
        b = len(batch)
        if batch.pixel_values.shape[0]:
            tokens = self.run_vision(batch.pixel_values)
            visual_tokens, visual_mask = gather_visual_tokens(tokens, batch.image_counts.to(tokens.device))
        else:
            visual_tokens = torch.zeros(b, 0, self.hidden_size, dtype=torch.float32)
            visual_mask = torch.zeros(b, 0, dtype=torch.long)
        out = self.run_fusion(batch.input_ids, batch.attention_mask, visual_tokens, visual_mask)
        return out.float().cpu().numpy()

    def encode(self, items: Sequence[Item], role: str = "document", batch_size: int = 64) -> np.ndarray:
        order = sorted(range(len(items)), key=lambda i: (len(items[i].images), len(items[i].text or "")))
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.encode_batch(self.preprocessor.collate([items[i] for i in idx]), role)
        return out

    @property
    def hidden_size(self) -> int:
        return self.preprocessor.config.text.hf_config.get("hidden_size") or self.preprocessor.config.text.hf_config["d_model"]

    def warmup(self) -> None:
        """Run a tiny mixed batch once (allocations, kernel selection, graph capture)."""
        from PIL import Image

        img = Image.new("RGB", (8, 8), (128, 64, 32))
        self.encode([Item(text="warm up"), Item(text="warm up", images=[img])])

    def capabilities(self) -> dict:
        return {"name": self.name, "dim": self.dim, "model_id": self.model_id, "legacy_model_ids": list(self.legacy_model_ids)}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
