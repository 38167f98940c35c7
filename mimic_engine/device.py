"""Device names: one spelling for every command (`--device`) and one resolution for the library.

    resolve_device("auto")  # -> "cuda" when torch sees a GPU, else "cpu"

Names: "auto", "cpu", "cuda" and "cuda:N". This module imports torch only to resolve a name.
"""
from __future__ import annotations

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")  # plus "cuda:N" for a particular GPU
DEFAULT_DEVICE = "auto"


def check_device(name) -> str:
    """`name` unchanged if it is a device name this project accepts, else a ConfigError naming the choices."""
    text = str(name)
    if text in DEVICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise ConfigError(f"device {text!r} is not supported; use 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")


def resolve_device(name) -> str:
    """"auto" -> "cuda" or "cpu"; a CUDA name fails with the fix when torch sees no GPU. A
    torch.device is accepted too (its name is checked the same way)."""
    import torch

    text = check_device(name)
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={text!r} but torch sees no CUDA GPU here; use --device cpu (or auto)")
    return text
