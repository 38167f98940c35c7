"""Self-contained checkpoints (`ckpt.pt`).

A checkpoint is one `torch.save` file of plain data, loadable with `torch.load(weights_only=True)`
(no code runs on load):

    {"format": "mimic-engine-checkpoint", "format_version": 1,
     "config": MimicConfig.to_dict(),          # full backbone configs: no pretrained folder needed
     "state_dict": {name: tensor},
     "tokenizer": {file name: bytes},          # the tokenizer's own files
     "model_id": model_content_id(...),        # the id of what is above, not of "meta"
     "meta": {"step", "metrics", "seed", "commit", "created", ...}}

The model id is a hash of the model's content (config, weights, tokenizer), so bookkeeping in
`meta` (`update_checkpoint_meta`) and re-saving the same model leave it unchanged. Indexes and
exports compare it to refuse vectors of another model. Checkpoints written before it existed
have no "model_id": it is computed on load. Before it, the id of a model was the sha256 of its
checkpoint file; a loaded checkpoint still answers to that id (`Checkpoint.legacy_ids`), so
indexes and exports that recorded it keep opening with the same file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
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
    sha256: str | None = None  # of the file's bytes, metadata included
    model_id: str | None = None  # model_content_id: config, weights, tokenizer

    @property
    def legacy_ids(self) -> tuple[str, ...]:
        """Older ids of this model that indexes and exports may have recorded: the file's sha256."""
        return (self.sha256,) if self.sha256 else ()


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


def model_content_id(config: dict, state_dict: dict, tokenizer: dict) -> str:
    """sha256 of a model's content: its config as canonical JSON, its weights (sorted by name, each
    with dtype, shape and raw bytes) and its tokenizer files (sorted by name, with their bytes).

    Every part is length- or separator-delimited, so no two different models hash the same input.
    """
    h = hashlib.sha256(b"mimic-engine model id v1\0")
    # ensure_ascii: lone UTF-16 surrogates in a config string still encode
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\0")
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode() + b"\0")
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy
    for name in sorted(tokenizer):
        data = _tokenizer_file_content(name, tokenizer[name])
        h.update(json.dumps([name, len(data)]).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def _tokenizer_file_content(name: str, data: bytes) -> bytes:
    """The bytes of a tokenizer file that define the tokenizer. A fast tokenizer writes the
    truncation and padding of its last call into tokenizer.json: call state, not the model (the
    preprocessor passes its own on every call), so they are left out."""
    if name != "tokenizer.json":
        return data
    try:
        spec = json.loads(data)
    except ValueError:
        return data
    if not isinstance(spec, dict):
        return data
    spec = {**spec, "truncation": None, "padding": None}
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def payload_model_id(payload: dict, path: str = "checkpoint") -> str:
    """The model id of a checkpoint payload, recomputed and checked against the stored one."""
    computed = model_content_id(payload["config"], payload["state_dict"], payload["tokenizer"])
    stored = payload.get("model_id")
    if stored is not None and stored != computed:
        raise CheckpointError(f"{path!r} records model id {str(stored)[:12]} but its config, weights and tokenizer hash "
                              f"to {computed[:12]}: the file was changed without mimic-engine's checkpoint functions; "
                              "re-save the model with save_checkpoint")
    return computed


def _write_payload(path: str, payload: dict) -> str:
    """Write atomically (temp file + rename): a crash never leaves a half-written ckpt.pt."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def save_checkpoint(path: str, model, tokenizer, meta: dict | None = None) -> str:
    """Write model, tokenizer, meta and the model's content id atomically."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "tokenizer": tokenizer_files(tokenizer),
        "meta": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(meta or {})},
    }
    payload["model_id"] = model_content_id(payload["config"], payload["state_dict"], payload["tokenizer"])
    return _write_payload(path, payload)


def update_checkpoint_meta(path: str, updates: dict) -> str:
    """Merge `updates` into the checkpoint's meta (e.g. final metrics), atomically; the model id
    stays what it was (and is recorded, for a checkpoint written before ids were stored)."""
    payload = read_checkpoint(path)
    payload["model_id"] = payload_model_id(payload, path)
    payload["meta"] = {**payload.get("meta", {}), **updates}
    return _write_payload(path, payload)


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
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:  # torch's message goes on to advise weights_only=False: unsafe for a file of unknown origin
            raise CheckpointError(
                f"cannot read {path!r} as a mimic-engine checkpoint: it holds a Python object ({refused.group(1)}) "
                "that the safe, weights-only load refuses. A mimic-engine checkpoint holds only tensors and plain "
                "values, so this file is not one or was altered. Do not load it unsafely (weights_only=False runs the code inside "
                "it); use a checkpoint written by mimic-engine (`mimic-engine train`)") from exc
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
    return Checkpoint(model, tokenizer, config, payload.get("meta", {}), path, file_sha256(path),
                      payload_model_id(payload, path))
