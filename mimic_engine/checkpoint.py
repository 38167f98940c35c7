"""Self-contained checkpoints (`ckpt.pt`).

A checkpoint is one `torch.save` file of plain data, loadable with `torch.load(weights_only=True)`
(no code runs on load):

    {"format": "mimic-engine-checkpoint", "format_version": 1,
     "config": MimicConfig.to_dict(),          # full backbone configs: no pretrained folder needed
     "state_dict": {name: tensor},
     "tokenizer": {file name: bytes},          # the tokenizer's own files
     "meta": {"step", "metrics", "seed", "commit", "created", ...}}
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from .config import MimicConfig
from .errors import CheckpointError, ConfigError

FORMAT = "mimic-engine-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: "torch.nn.Module"
    tokenizer: object
    config: MimicConfig
    meta: dict
    path: str | None = None
    sha256: str | None = None


def tokenizer_files(tokenizer) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {name: open(os.path.join(tmp, name), "rb").read() for name in sorted(os.listdir(tmp))
                if os.path.isfile(os.path.join(tmp, name))}


def tokenizer_from_files(files: dict):
    from transformers import AutoTokenizer

    if not isinstance(files, dict):
        raise CheckpointError(f"the checkpoint's tokenizer entry is a {type(files).__name__}, not a dict of files")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name \
                    or "\\" in name or "\0" in name:
                raise CheckpointError(f"checkpoint tokenizer file name {name!r} is not a plain file name")
            if not isinstance(data, bytes):
                raise CheckpointError(f"checkpoint tokenizer file {name!r} holds a {type(data).__name__}, not bytes")
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def save_checkpoint(path: str, model, tokenizer, meta: dict | None = None) -> str:
    """Write atomically (temp file + rename): a crash never leaves a half-written ckpt.pt."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "tokenizer": tokenizer_files(tokenizer),
        "meta": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(meta or {})},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str) -> dict:
    """The raw payload, validated. Errors say what the file is and what to do."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; train one with `mimic-engine train` "
                              "or pass the path of a ckpt.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        raise CheckpointError(
            f"cannot read {path!r} as a mimic-engine checkpoint: it is truncated, corrupt, or not a weights-only "
            f"torch file ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is a torch file but not a mimic-engine checkpoint (no format={FORMAT!r} key)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format version {version!r}; this mimic-engine reads up to "
                              f"{FORMAT_VERSION}: upgrade mimic-engine")
    missing = [k for k in ("config", "state_dict", "tokenizer") if k not in payload]
    if missing:
        raise CheckpointError(f"{path!r} lacks {missing}; the file is incomplete")
    return payload


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the exact model, tokenizer and config; needs neither backbone folders nor training data."""
    from .modeling import build_model

    payload = read_checkpoint(path)
    try:
        config = MimicConfig.from_dict(payload["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path!r}: its config is not valid for this mimic-engine: {exc}") from exc
    model = build_model(config, load_weights=False)
    result = model.load_state_dict(payload["state_dict"], strict=False)
    # T5's tied embeddings may be stored once; anything else missing is an error.
    missing = [k for k in result.missing_keys if not k.endswith("embed_tokens.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path!r}: weights do not match the config (missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
    model.to(device).eval()
    tokenizer = tokenizer_from_files(payload["tokenizer"])
    return Checkpoint(model, tokenizer, config, payload.get("meta", {}), path, file_sha256(path))
