"""A Triton Inference Server model repository from an export directory (`--triton-repo DIR`).

    DIR/
      mimic_vision/config.pbtxt   1/model.onnx       ONNX Runtime backend, pixel_values -> visual_tokens
      mimic_fusion/config.pbtxt   1/model.onnx       ONNX Runtime backend, ids/masks/tokens -> embeddings
      mimic_vision_trt/, mimic_fusion_trt/           TensorRT plans, where they were built
      README.md                   the client flow
      .mimic-engine-triton.json   which export/checkpoint this repository serves

There is deliberately no ensemble. Between the two stages each item's images must be gathered
into one row of visual tokens (item i gets the tokens of its k_i images side by side, padded to the
batch's K*P with a mask): a per-request, data-dependent regrouping of the vision output by
`image_counts`. An ensemble only wires tensors from step to step by name; it cannot regroup rows.
That needs code, either a Python-backend (BLS) model on the server or the client; the client
already tokenises and decodes images, so it does the gather too (about ten lines of numpy, in
README.md), and each stage keeps Triton's dynamic batching across requests.

Dynamic batching merges requests whose non-batch dimensions are equal: clients pad text to fixed
lengths (for instance text.max_length) and visual tokens to whole images so requests batch together.
"""
from __future__ import annotations

import os
import shutil

from ..runtime.export_format import ExportError, Manifest, graph_file, write_json
from .artifacts import ShapeRanges, StagingDir, check_target, io_spec

MARKER = ".mimic-engine-triton.json"
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
MODEL_NAMES = {("vision", "onnx"): "mimic_vision", ("fusion", "onnx"): "mimic_fusion",
               ("vision", "tensorrt"): "mimic_vision_trt", ("fusion", "tensorrt"): "mimic_fusion_trt"}


def _dims(shape: list) -> list[int]:
    """Model dims without the batch dim (Triton adds it when max_batch_size > 0); symbolic -> -1."""
    return [-1 if isinstance(d, str) else int(d) for d in shape[1:]]


def model_config(name: str, stage: str, kind: str, config, ranges: ShapeRanges, profiles: int = 0) -> dict:
    """The model configuration as a dict with the field names of Triton's ModelConfig protobuf."""
    spec = io_spec(config)[stage]
    max_batch = ranges.images.max if stage == "vision" else ranges.batch.max
    cfg = {
        "name": name,
        "platform": "onnxruntime_onnx" if kind == "onnx" else "tensorrt_plan",
        "max_batch_size": max_batch,
        "input": [{"name": t["name"], "data_type": TRITON_DTYPES[t["dtype"]], "dims": _dims(t["shape"])}
                  for t in spec["inputs"]],
        "output": [{"name": t["name"], "data_type": TRITON_DTYPES[t["dtype"]], "dims": _dims(t["shape"])}
                   for t in spec["outputs"]],
        "dynamic_batching": {"preferred_batch_size": sorted({min(8, max_batch), min(32, max_batch)}),
                             "max_queue_delay_microseconds": 2000},
        "instance_group": [{"kind": "KIND_CPU" if kind == "onnx" else "KIND_GPU", "count": 1}],
    }
    if kind == "tensorrt" and profiles:
        cfg["instance_group"][0]["profile"] = [str(i) for i in range(profiles)]
    return cfg


def to_pbtxt(value, indent: int = 0) -> str:
    """dict -> protobuf text format (the format of config.pbtxt). Enum names (TYPE_FP32, KIND_GPU) unquoted."""
    pad = "  " * indent
    lines = []
    for key, v in value.items():
        if isinstance(v, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(v, indent + 1)}{pad}}}")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines.append(f"{pad}{key} {{\n{to_pbtxt(item, indent + 1)}{pad}}}")
        elif isinstance(v, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(x, key) for x in v)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(v, key)}")
    return "\n".join(lines) + "\n"


def _scalar(v, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if key in ("data_type", "kind"):
        return v  # enum value
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_repository(export_dir: str, repo_dir: str, manifest: Manifest, config, force: bool = False,
                     log=print) -> list[str]:
    """Write the repository (staged, then renamed into place). -> model names written."""
    check_target(repo_dir, [manifest.model_id, manifest.source["file_sha256"]], force, marker=MARKER)
    ranges = ShapeRanges.from_dict(manifest.ranges)
    written = []
    with StagingDir(repo_dir) as staging:
        for stage in ("vision", "fusion"):
            _add_model(staging.path, MODEL_NAMES[stage, "onnx"], stage, "onnx", config, ranges,
                       os.path.join(export_dir, graph_file(stage, "fp32")), "model.onnx")
            written.append(MODEL_NAMES[stage, "onnx"])
            if manifest.tensorrt:
                engine = os.path.join(export_dir, manifest.tensorrt["engines"][stage])
                profiles = manifest.tensorrt.get("profiles", {}).get(stage, 0)
                _add_model(staging.path, MODEL_NAMES[stage, "tensorrt"], stage, "tensorrt", config, ranges, engine,
                           "model.plan", profiles)
                written.append(MODEL_NAMES[stage, "tensorrt"])
        with open(os.path.join(staging.path, "README.md"), "w") as fh:
            fh.write(client_readme(config, ranges, bool(manifest.tensorrt)))
        write_json(os.path.join(staging.path, MARKER), {
            "model_id": manifest.model_id, "export_dir": os.path.abspath(export_dir),
            "models": written,
        })
        staging.commit()
    log(f"    Triton repository {repo_dir}: {', '.join(written)}")
    return written


def _add_model(root: str, name: str, stage: str, kind: str, config, ranges, src: str, dst_name: str,
               profiles: int = 0) -> None:
    if not os.path.exists(src):
        raise ExportError(f"cannot build the Triton model {name}: {src!r} is missing")
    version_dir = os.path.join(root, name, "1")
    os.makedirs(version_dir)
    shutil.copyfile(src, os.path.join(version_dir, dst_name))
    if os.path.exists(src + ".data"):  # external weights keep the file name the graph refers to
        shutil.copyfile(src + ".data", os.path.join(version_dir, os.path.basename(src) + ".data"))
    with open(os.path.join(root, name, "config.pbtxt"), "w") as fh:
        fh.write(to_pbtxt(model_config(name, stage, kind, config, ranges, profiles)))


def client_readme(config, ranges: ShapeRanges, has_trt: bool) -> str:
    p = config.visual_tokens_per_image
    suffix = "_trt" if has_trt else ""
    return f"""# mimic-engine on Triton Inference Server

    tritonserver --model-repository $PWD

Models: `mimic_vision`, `mimic_fusion` (ONNX Runtime){", `mimic_vision_trt`, `mimic_fusion_trt` (TensorRT)" if has_trt else ""}.
Preprocessing (tokenizer, image resize/normalise) is done by the client with the files of the
export directory (`tokenizer/`, `config.json`), e.g. `mimic_engine.preprocess.Preprocessor`.

## Client flow (why no ensemble)

Between the stages each item's images are gathered into one row of visual tokens. That regrouping
depends on how many images each item has, which a Triton ensemble (static tensor wiring) cannot
express; it would need a Python-backend model. The client already has the per-item image counts,
so it does the gather:

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("127.0.0.1:8000")

def infer(model, inputs, output):
    reqs = []
    for name, arr in inputs.items():
        r = httpclient.InferInput(name, arr.shape, {{"float32": "FP32", "int64": "INT64"}}[str(arr.dtype)])
        r.set_data_from_numpy(arr)
        reqs.append(r)
    return client.infer(model, reqs, outputs=[httpclient.InferRequestedOutput(output)]).as_numpy(output)

# input_ids, attention_mask: (B, T) int64; pixel_values: (N, 3, {config.vision.image_size}, {config.vision.image_size}) float32
# for the N images of the batch in item order; image_counts: (B,) images per item
B, P = input_ids.shape[0], {p}
K = max(int(image_counts.max()), 1)
visual_tokens = np.zeros((B, K * P, H), np.float32)            # H = hidden size, from model_card.json
visual_mask = np.zeros((B, K * P), np.int64)
if len(pixel_values):
    tokens = infer("mimic_vision{suffix}", {{"pixel_values": pixel_values}}, "visual_tokens")   # (N, P, H)
    start = 0
    for i, k in enumerate(image_counts):
        if k:
            visual_tokens[i, : k * P] = tokens[start : start + k].reshape(k * P, -1)
            visual_mask[i, : k * P] = 1
        start += k
emb = infer("mimic_fusion{suffix}", {{"input_ids": input_ids, "attention_mask": attention_mask,
            "visual_tokens": visual_tokens, "visual_mask": visual_mask}}, "embeddings")   # (B, E), unit vectors
```

A batch without images still sends one zero visual token per item with `visual_mask` 0 (as above:
K is at least 1). Dynamic batching merges only requests with equal non-batch dimensions: pad text
to a fixed length (up to {ranges.text_len.max}) and visual tokens to whole images to let requests batch.
Ranges: batch {ranges.batch.min}..{ranges.batch.max} items, text {ranges.text_len.min}..{ranges.text_len.max} tokens, visual tokens
{ranges.visual_tokens.min}..{ranges.visual_tokens.max}, vision batch {ranges.images.min}..{ranges.images.max} images.
"""
