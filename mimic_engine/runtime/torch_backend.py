"""PyTorch backend: the model's own two stages, eager, on CPU or CUDA, in fp32, fp16 or bf16.

fp16 runs under `torch.autocast`, not `model.half()`: autocast does the matmuls in fp16 but keeps
softmax, layer/RMS norms and reductions in fp32, which is what T5-style blocks need to avoid
overflow (large FFN activations); the weights stay fp32, so parity with the fp32 path is a
matter of rounding only.

bf16 (`torch-bf16`) is CPU autocast to bf16, for CPUs that compute bf16 in hardware (AMX or
AVX-512 BF16; `cpu_features.CpuInfo.native_bf16`): linear layers, convolutions and attention
(scaled_dot_product_attention, whose CPU kernel accumulates its softmax in fp32) run in bf16 on
oneDNN's AMX kernels. CPU autocast, unlike CUDA's, would run layer norms on bf16 inputs in bf16,
so a pre-hook on every norm module hands it fp32 input while autocast is on: norms (and the
residual stream after them) stay fp32, and the final L2 normalisation is fp32 in the model
itself. The backend holds a copy of the model with bf16 linear/conv weights (`bf16_matmul_copy`). A CPU without native bf16 would emulate it through fp32, slower than fp32: refused.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, choice
from ..preprocess import Preprocessor
from .base import Backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = {"fp32": "torch", "fp16": "torch-fp16", "bf16": "torch-bf16"}
NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)


def check_bf16(device: torch.device) -> None:
    """Refuse bf16 where the hardware lacks it (it would run emulated, slower than fp32)."""
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"dtype 'bf16' was asked for on {device}, which has no native bf16; use 'fp16' or 'fp32'")
        return
    from .cpu_features import require_native_bf16

    require_native_bf16(NAMES["bf16"])


def bf16_matmul_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose linear and convolution weights are bf16 (norms, embeddings stay fp32).

    CPU autocast would otherwise cast every fp32 weight to bf16 on every call (its cast cache is
    for training only): at batch 1 that conversion costs more than the bf16 matmuls save. A copy,
    so that a model shared with an fp32 backend keeps its fp32 weights.
    """
    import copy

    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            m.to(torch.bfloat16)
    return model


def is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, NORM_TYPES) or name.endswith(("LayerNorm", "RMSNorm"))


def _fp32_input(module, args):
    """Forward pre-hook: floating inputs as fp32 while autocast is on (see the module doc)."""
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    if not torch.is_autocast_enabled(device_type):
        return None
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", dtype: str = "fp32",
                 model_id: str | None = None, legacy_model_ids: tuple = ()):
        choice("dtype", dtype, tuple(DTYPES))
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r} was asked for but torch sees no CUDA GPU; use device='cpu'")
        if dtype == "bf16":
            check_bf16(device)
        self.device = device
        self.dtype = dtype
        cpu_bf16 = dtype == "bf16" and device.type == "cpu"
        self.model = (bf16_matmul_copy(model) if cpu_bf16 else model).to(device).eval()
        # norms in fp32 (module doc); the hooks act only under autocast
        self._hooks = [m.register_forward_pre_hook(_fp32_input) for m in self.model.modules() if is_norm(m)] \
            if cpu_bf16 else []
        config = model.config
        model_id = model_id or f"random:{config.preset or 'custom'}:{config.fusion.fusion}"
        super().__init__(Preprocessor(config, tokenizer), model_id, model.embed_dim, legacy_model_ids)
        self.name = NAMES[dtype]

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
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype], enabled=self.dtype != "fp32")

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

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
