"""The export folder's format: the one place that reads and writes what the runtime relies on.

`mimic-engine export` writes a folder through this module; the runtime (ONNX Runtime, TensorRT,
and the PyTorch backends that follow the folder back to its checkpoint) reads it through this
module. The exporter imports it; nothing here imports the exporter or onnx (torch only inside
`gpu_identity`, transformers only inside `load_export_config`).

    DIR/
      manifest.json       written LAST (`write_manifest`): format, source checkpoint, variants,
                          files with sizes and hashes, what was skipped and why, "complete"
      config.json         MimicConfig.to_dict()                      (`load_export_config`)
      tokenizer/          the tokenizer's own files                  (`load_export_config`)
      <stage>[.<variant>].onnx   graphs named by `graph_file`, listed in manifest["variants"];
                          metadata_props `mimic_engine.<key>`, `model_id` among them (`graph_model_id`)
      tensorrt/<stage>.plan + <stage>.plan.json   engines and their sidecars (`read_sidecar`)

The manifest (format version 2) names the checkpoint the export came from:

    "source": {"checkpoint": absolute path of the ckpt.pt, "relative": that path relative to DIR,
               "model_id": the model's content id, "file_sha256": sha256 of the ckpt.pt's bytes}

Exports written before version 2 have no "source": their top-level "checkpoint" (absolute path)
and "checkpoint_sha256" become `source` when read, and their model id is that checkpoint file's
sha256 (the model id of the time), so indexes built with them keep matching. Their graphs carry
`mimic_engine.checkpoint_sha256` instead of `mimic_engine.model_id` and their TensorRT sidecars
`checkpoint_sha256` instead of `model_id`; both are read as the model id.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from ..errors import MimicError

FORMAT = "mimic-engine-export"
FORMAT_VERSION = 2  # 2: "source" names the checkpoint and the content model id
MANIFEST = "manifest.json"
MODEL_CARD = "model_card.json"
CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
PARITY = "parity.json"
TENSORRT_DIR = "tensorrt"
STAGES = ("vision", "fusion")
VARIANTS = ("fp32", "optimized", "int8", "fp16")
METADATA_PREFIX = "mimic_engine."  # keys of the graphs' metadata_props
SIDECAR_FORMAT = "mimic-engine-tensorrt-sidecar"
TENSORRT_INSTALL = ("TensorRT 10 or 11 for your CUDA version: `pip install tensorrt-cu12` (CUDA 12) or "
                    "`pip install tensorrt-cu13` (CUDA 13); these PyPI packages fetch the libraries from NVIDIA's "
                    "package index, which must be reachable")
# TensorRT DataType names -> numpy/torch dtype names (engine I/O as the sidecar records it)
TRT_TO_NAME = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool",
               "INT8": "int8", "BF16": "bfloat16"}


class ExportError(MimicError):
    """An export cannot be written, or an export directory cannot be used."""


class EngineMismatchError(ExportError):
    """An engine was built for another model, GPU or TensorRT version."""


class ShapeOutOfProfileError(ExportError):
    """A run-time shape lies outside every optimisation profile of an engine."""


def graph_file(stage: str, variant: str = "fp32") -> str:
    """vision.onnx, fusion.int8.onnx, ..."""
    return f"{stage}.onnx" if variant == "fp32" else f"{stage}.{variant}.onnx"


# ---- JSON files -------------------------------------------------------------------------------------
def write_json(path: str, data) -> None:
    """Temp file + rename: a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ExportError(f"{what} {path!r} does not exist") from None
    except ValueError as exc:
        raise ExportError(f"{what} {path!r} is not valid JSON ({exc}); re-run `mimic-engine export`") from exc


# ---- the manifest -----------------------------------------------------------------------------------
def checkpoint_source(checkpoint: str, export_dir: str, model_id: str, file_sha256: str) -> dict:
    """The manifest's "source" entry for an export of `checkpoint` into `export_dir`."""
    path = os.path.abspath(checkpoint)
    return {"checkpoint": path, "relative": os.path.relpath(path, os.path.abspath(export_dir)),
            "model_id": model_id, "file_sha256": file_sha256}


@dataclass
class Manifest:
    source: dict  # see the module doc and `checkpoint_source`
    fusion: str
    opset: int
    ranges: dict
    variants: dict = field(default_factory=dict)  # variant -> {stage: file}
    tensorrt: dict | None = None  # {"engines": {stage: file}, "profiles": {stage: n}, "precision"} when built
    skipped: list = field(default_factory=list)  # [{"step", "reason"}]
    parity: dict = field(default_factory=dict)  # variant -> {"passed", "max_abs_diff", "min_cosine"}
    complete: bool = False
    failure: str | None = None
    files: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    mimic_engine_version: str = ""

    @property
    def model_id(self) -> str:
        """The content id of the exported model (an old export's: its checkpoint file's sha256)."""
        return self.source["model_id"]

    @property
    def checkpoint(self) -> str:
        """Absolute path of the source ckpt.pt as it was at export time."""
        return self.source["checkpoint"]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self.__dict__}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ExportError(f"{where} is not a mimic-engine export manifest (no format={FORMAT!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ExportError(f"{where} has export format version {version!r}; this mimic-engine "
                              f"reads up to {FORMAT_VERSION}: upgrade mimic-engine or re-export")
        if "source" not in data:  # format 1: the checkpoint file's sha256 was the model id
            sha = data.get("checkpoint_sha256")
            data = {**data, "source": {"checkpoint": data.get("checkpoint"), "relative": None, "model_id": sha,
                                       "file_sha256": sha}}
        source = data["source"]
        if not isinstance(source, dict) or not isinstance(source.get("model_id"), str) or not source["model_id"]:
            raise ExportError(f"{where}: 'source' {source!r} names no model_id; the manifest is corrupt or not "
                              "written by mimic-engine: re-export")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def manifest_model_id(path: str) -> str | None:
    """The model id recorded in the manifest (or marker) file `path`, of any format; None if unreadable."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        source = data.get("source")
        return source.get("model_id") if isinstance(source, dict) else data.get("model_id", data.get("checkpoint_sha256"))
    except (OSError, ValueError, AttributeError):
        return None


def write_manifest(export_dir: str, manifest: Manifest) -> str:
    path = os.path.join(export_dir, MANIFEST)
    write_json(path, manifest.to_dict())
    return path


def read_manifest(export_dir: str, require_complete: bool = True) -> Manifest:
    """The manifest of an export directory; refuses incomplete ones with the reason they failed."""
    if not os.path.isdir(export_dir):
        raise ExportError(f"export directory {export_dir!r} does not exist; write one with "
                          "`mimic-engine export ckpt.pt --out DIR`")
    path = os.path.join(export_dir, MANIFEST)
    if not os.path.exists(path):
        raise ExportError(f"{export_dir!r} has no {MANIFEST}: it is not a finished mimic-engine export; "
                          "re-run `mimic-engine export`")
    manifest = Manifest.from_dict(read_json(path, "manifest"), path)
    for variant, files in manifest.variants.items():
        for stage, file in (files.items() if isinstance(files, dict) else []):
            # graph files live in the export folder itself: never follow a path out of it
            if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
                raise ExportError(f"{path}: variant {variant!r} stage {stage!r} names {file!r}, not a file name inside "
                                  "the export folder; the manifest is corrupt or not written by mimic-engine: re-export")
    engines = (manifest.tensorrt or {}).get("engines") if isinstance(manifest.tensorrt, dict) else None
    for stage, file in (engines.items() if isinstance(engines, dict) else []):
        # engines live in the export's tensorrt/ folder: "tensorrt/<file name>", nothing else
        if (not isinstance(file, str) or os.path.dirname(file) != TENSORRT_DIR
                or os.path.basename(file) in ("", ".", "..")):
            raise ExportError(f"{path}: TensorRT stage {stage!r} names {file!r}, not a file name inside the export's "
                              f"{TENSORRT_DIR}/ folder; the manifest is corrupt or not written by mimic-engine: re-export")
    if require_complete and not manifest.complete:
        raise ExportError(f"{export_dir!r} holds an INCOMPLETE export ({manifest.failure or 'reason not recorded'}); "
                          "fix the cause and re-run `mimic-engine export`")
    return manifest


def source_checkpoint(export_dir: str) -> str | None:
    """The ckpt.pt an export came from, if it is still there: first beside the export as it was at
    export time (`relative`, so a run folder can be moved whole), then at its absolute path.

    A file found there is the export's only if its sha256 is the recorded one, or (its meta updated
    since, e.g. final metrics) it holds the recorded model; otherwise ExportError says so."""
    source = read_manifest(export_dir, require_complete=False).source
    candidates = []
    if source.get("relative"):
        candidates.append(os.path.normpath(os.path.join(export_dir, source["relative"])))
    if source.get("checkpoint"):
        candidates.append(source["checkpoint"])
    found = [p for p in candidates if os.path.isfile(p)]
    for path in found:
        if _is_source_checkpoint(path, source):
            return path
    if found:
        raise ExportError(f"{found[0]!r}, the checkpoint the manifest of {export_dir!r} names, is not the one this "
                          f"export was made from (its sha256 and model id differ from the recorded "
                          f"{str(source.get('file_sha256'))[:12]} / {str(source.get('model_id'))[:12]}); pass the right "
                          "ckpt.pt itself, or re-export")
    return None


def _is_source_checkpoint(path: str, source: dict) -> bool:
    from ..checkpoint import file_sha256, payload_model_id, read_checkpoint
    from ..errors import CheckpointError

    if source.get("file_sha256") and file_sha256(path) == source["file_sha256"]:
        return True
    try:
        return payload_model_id(read_checkpoint(path), path) == source["model_id"]
    except CheckpointError:
        return False


def graph_model_id(metadata: dict) -> str | None:
    """The model id in a graph's metadata_props map (`mimic_engine.model_id`; older graphs:
    `mimic_engine.checkpoint_sha256`)."""
    return metadata.get(METADATA_PREFIX + "model_id") or metadata.get(METADATA_PREFIX + "checkpoint_sha256")


def variant_graphs(export_dir: str, manifest: Manifest, variant: str) -> dict:
    """{stage: graph file} of `variant`; an error naming the variants there are (and why this one is not)."""
    if variant not in manifest.variants:
        why = [s["reason"] for s in manifest.skipped if s.get("step") == variant]
        raise ExportError(f"{export_dir!r} has no {variant!r} graphs (it has {sorted(manifest.variants)})"
                          + (f": {why[0]}" if why else "") + "; re-export with that precision or pick another variant")
    return manifest.variants[variant]


def check_graph_model_id(found: str | None, manifest: Manifest, file: str, export_dir: str) -> None:
    """Refuse a graph whose metadata names another model than the manifest (`graph_model_id` -> `found`)."""
    if found != manifest.model_id:
        raise ExportError(f"{file} in {export_dir!r} was exported from model {str(found)[:12]}, but the "
                          f"manifest says {manifest.model_id[:12]}: the folder mixes two exports; re-export")


def embed_dim(config) -> int:
    """Width of the exported embeddings: the fusion head's, or the text tower's hidden size without a head."""
    return config.fusion.embed_dim or (config.text.hf_config.get("hidden_size") or config.text.hf_config["d_model"])


def load_export_config(export_dir: str):
    """MimicConfig and tokenizer stored in an export directory (no checkpoint needed)."""
    from transformers import AutoTokenizer

    from ..config import MimicConfig

    config = MimicConfig.from_dict(read_json(os.path.join(export_dir, CONFIG), "model config"))
    tok_dir = os.path.join(export_dir, TOKENIZER_DIR)
    if not os.path.isdir(tok_dir):
        raise ExportError(f"{export_dir!r} has no {TOKENIZER_DIR}/ folder; re-run `mimic-engine export`")
    return config, AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


# ---- TensorRT optimisation profiles -------------------------------------------------------------------
@dataclass
class Profile:
    """One optimisation profile: input name -> [min shape, opt shape, max shape]."""

    name: str
    shapes: dict

    def validate(self) -> "Profile":
        if not self.shapes:
            raise ExportError(f"profile {self.name!r} has no input shapes")
        for inp, triple in self.shapes.items():
            if len(triple) != 3:
                raise ExportError(f"profile {self.name!r} input {inp!r}: need [min, opt, max] shapes, got {triple}")
            lo, opt, hi = (list(s) for s in triple)
            if not len(lo) == len(opt) == len(hi):
                raise ExportError(f"profile {self.name!r} input {inp!r}: min/opt/max ranks differ: {lo}, {opt}, {hi}")
            for d, (a, b, c) in enumerate(zip(lo, opt, hi)):
                if not (isinstance(a, int) and isinstance(b, int) and isinstance(c, int)) or not 0 < a <= b <= c:
                    raise ExportError(f"profile {self.name!r} input {inp!r} dim {d}: min={a}, opt={b}, max={c} violates "
                                      f"1 <= min <= opt <= max (shapes {lo}, {opt}, {hi})")
        return self

    def contains(self, shapes: dict) -> bool:
        for inp, shape in shapes.items():
            lo, _, hi = self.shapes[inp]
            if len(shape) != len(lo) or any(not a <= s <= c for a, s, c in zip(lo, shape, hi)):
                return False
        return True

    def volume(self) -> int:
        """Sum over inputs of the max shape's element count (smaller = tighter = better tuned)."""
        total = 0
        for _, _, hi in self.shapes.values():
            n = 1
            for d in hi:
                n *= d
            total += n
        return total


def select_profile(profiles: list[Profile], shapes: dict) -> int:
    """Index of the tightest profile containing `shapes` ({input name: shape}); a clear error if none."""
    unknown = sorted(set(shapes) - set(profiles[0].shapes)) if profiles else []
    if unknown or not profiles:
        raise ShapeOutOfProfileError(f"inputs {unknown} are not inputs of this engine (it has "
                                     f"{sorted(profiles[0].shapes) if profiles else 'no profiles'})")
    fitting = [(p.volume(), i) for i, p in enumerate(profiles) if p.contains(shapes)]
    if not fitting:
        ranges = "; ".join(f"{p.name}: " + ", ".join(f"{k} {v[0]}..{v[2]}" for k, v in p.shapes.items())
                           for p in profiles)
        raise ShapeOutOfProfileError(f"input shapes {shapes} are outside every TensorRT profile ({ranges}); split the "
                                     "batch, or re-export with wider --batch/--text-len/--visual-tokens ranges")
    return min(fitting)[1]


# ---- the TensorRT sidecar ---------------------------------------------------------------------------
@dataclass
class EngineSidecar:
    """`<engine>.plan.json`: what an engine was built for (it is valid for nothing else)."""

    stage: str
    precision: str  # "fp16" (strongly typed from the fp16 graph) or "fp32"
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    model_id: str
    onnx_file: str
    onnx_sha256: str
    profiles: list = field(default_factory=list)  # [Profile as dict]
    inputs: list = field(default_factory=list)  # [{"name", "dtype", "shape"}] as the engine reports them
    outputs: list = field(default_factory=list)
    timing_cache: str | None = None
    build_seconds: float | None = None
    built: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format: str = SIDECAR_FORMAT

    def profile_objects(self) -> list[Profile]:
        return [Profile(p["name"], {k: [list(s) for s in v] for k, v in p["shapes"].items()}).validate()
                for p in self.profiles]


def sidecar_path(engine_path: str) -> str:
    return engine_path + ".json"


def write_sidecar(engine_path: str, sidecar: EngineSidecar) -> str:
    path = sidecar_path(engine_path)
    write_json(path, asdict(sidecar))
    return path


def read_sidecar(engine_path: str) -> EngineSidecar:
    path = sidecar_path(engine_path)
    if not os.path.exists(path):
        raise EngineMismatchError(f"engine {engine_path!r} has no sidecar {os.path.basename(path)}: its TensorRT version, "
                                  "GPU and model are unknown, so it is not loaded; rebuild it with `mimic-engine export`")
    try:
        with open(path) as fh:
            data = json.load(fh)
        if data.get("format") != SIDECAR_FORMAT:
            raise ValueError("format key missing")
        if "model_id" not in data and "checkpoint_sha256" in data:  # sidecars of format-1 exports
            data["model_id"] = data.pop("checkpoint_sha256")
        return EngineSidecar(**data)
    except (ValueError, TypeError) as exc:
        raise EngineMismatchError(f"sidecar {path!r} is not readable ({exc}); rebuild the engine with "
                                  "`mimic-engine export`") from exc


def check_compatible(sidecar: EngineSidecar, model_id: str, tensorrt_version: str, gpu_name: str,
                     compute_capability: str, engine_path: str = "engine") -> None:
    """Refuse an engine built for another model, GPU or TensorRT version (names every difference)."""
    problems = []
    if sidecar.model_id != model_id:
        problems.append(f"it holds model {sidecar.model_id[:12]}, this export is {model_id[:12]}")
    if sidecar.tensorrt_version != tensorrt_version:
        problems.append(f"it was built with TensorRT {sidecar.tensorrt_version}, this is TensorRT {tensorrt_version} "
                        "(serialized engines are tied to the exact version)")
    if sidecar.compute_capability != compute_capability or sidecar.gpu_name != gpu_name:
        problems.append(f"it was built on {sidecar.gpu_name} (compute capability {sidecar.compute_capability}), "
                        f"this GPU is {gpu_name} ({compute_capability}); kernels are tuned per GPU")
    if problems:
        raise EngineMismatchError(f"refusing TensorRT engine {engine_path!r}: " + "; ".join(problems) +
                                  ". Rebuild it here with `mimic-engine export <ckpt.pt> --out <dir>`")


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") through torch; what sidecars record and are checked against."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"
