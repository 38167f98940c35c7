"""PyTorch backend: the model's own two stages, eager, on CPU or CUDA, in fp32 or fp16.

fp16 runs under `torch.autocast`, not `model.half()`: autocast does the matmuls in fp16 but keeps
softmax, layer/RMS norms and reductions in fp32, which is what T5-style blocks need to avoid
overflow (large FFN activations); the weights stay fp32, so parity with the fp32 path is a
matter of rounding only.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, choice
from ..preprocess import Preprocessor
from .base import Backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", dtype: str = "fp32",
                 model_id: str | None = None, legacy_model_ids: tuple = ()):
        choice("dtype", dtype, tuple(DTYPES))
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r} was asked for but torch sees no CUDA GPU; use device='cpu'")
        self.device = device
        self.dtype = dtype
        self.model = model.to(device).eval()
        config = model.config
        model_id = model_id or f"random:{config.preset or 'custom'}:{config.fusion.fusion}"
        super().__init__(Preprocessor(config, tokenizer), model_id, model.embed_dim, legacy_model_ids)
        self.name = "torch" if dtype == "fp32" else "torch-fp16"

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", dtype: str = "fp32") -> "TorchBackend":
        from ..checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, "cpu")
        return cls(ckpt.model, ckpt.tokenizer, device, dtype, model_id=ckpt.model_id, legacy_model_ids=ckpt.legacy_ids)

    @classmethod
    def from_encoder(cls, encoder, dtype: str = "fp32") -> "TorchBackend":
        """Share a MimicEncoder's model (no copy): tests and in-process tools."""
        return cls(encoder.model, encoder.tokenizer, encoder.device, dtype, model_id=encoder.model_id,
                   legacy_model_ids=encoder.legacy_model_ids)

    # ---- stages ----------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.dtype == "fp16")

    def run_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            return self.model.vision_stage(pixel_values.to(self.device))  # (N, P, H)

    def run_fusion(self, input_ids, attention_mask, visual_tokens, visual_mask) -> torch.Tensor:
        d = self.device
        with torch.inference_mode(), self._autocast():
            out = self.model.fusion_stage(input_ids.to(d), attention_mask.to(d), visual_tokens.to(d), visual_mask.to(d))
        return out.float()  # (B, E) unit vectors

    def capabilities(self) -> dict:
        return {**super().capabilities(), "device": str(self.device), "dtype": self.dtype}
