"""`export_checkpoint`: every step of `mimic-engine export`, in order, with progress and a summary.

    1 load the checkpoint                       (CheckpointError for missing / corrupt files)
    2 vision.onnx, fusion.onnx (fp32)           onnx.checker, metadata, external data over 2 GB
    3 config.json + tokenizer/                  so a runtime needs no checkpoint
    4 parity fp32 vs PyTorch                    FAILING PARITY = FAILED EXPORT
    5 optimized / int8 / fp16 variants          each with its own parity; dropped (and said so) if off
    6 TensorRT engines                          where tensorrt imports and a GPU is visible
    7 model_card.json, README.md, manifest.json (last)
    8 Triton repository                         with --triton-repo

Everything is written into a temp folder beside the target and renamed into place at the end,
so the target never holds a half-written export. A failed parity still renames the folder into
place (for inspection) but with `"complete": false` in the manifest, which the runtimes refuse.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

from ..runtime.export_format import (CONFIG, MODEL_CARD, PARITY, STAGES, TENSORRT_DIR, TOKENIZER_DIR, ExportError,
                                     Manifest, checkpoint_source, graph_file, write_json, write_manifest)
from .artifacts import INPUT_RULES, Range, ShapeRanges, StagingDir, check_target, file_table, io_spec
from .onnx_export import DEFAULT_OPSET, EXTERNAL_DATA_BYTES, check_opset, export_graph
from .parity import check_parity, format_table, parity_cases, reference_outputs, summarize

OPTIONAL_VARIANTS = ("optimized", "int8", "fp16")


@dataclass
class ExportOptions:
    out_dir: str | None = None  # default: <checkpoint stem>-export beside the checkpoint
    variants: tuple = OPTIONAL_VARIANTS  # beyond fp32, which is always written
    opset: int = DEFAULT_OPSET
    batch: Range | None = None  # None = ShapeRanges.defaults
    text_len: Range | None = None
    visual_tokens: Range | None = None
    tensorrt: bool = True  # False = ONNX only
    tensorrt_precision: str = "fp16"
    triton_repo: str | None = None
    force: bool = False  # overwrite a folder that holds something else
    external_data_bytes: int = EXTERNAL_DATA_BYTES
    parity_seed: int = 1


@dataclass
class ExportResult:
    out_dir: str
    manifest: Manifest
    parity: dict = field(default_factory=dict)  # variant -> summary
    triton_models: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.manifest.complete


def default_out_dir(checkpoint: str) -> str:
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"{stem}-export")


def export_checkpoint(checkpoint: str, options: ExportOptions | None = None, log=print) -> ExportResult:
    """Run every step; returns the result, raises ExportError when the export failed (after
    writing the incomplete artifacts for a parity failure)."""
    from mimic_engine import __version__ as version
    from mimic_engine.checkpoint import load_checkpoint

    opts = options or ExportOptions()
    unknown = set(opts.variants) - set(OPTIONAL_VARIANTS)
    if unknown:
        raise ExportError(f"unknown variant(s) {sorted(unknown)}; choose from {list(OPTIONAL_VARIANTS)}")
    check_opset(opts.opset)  # before any slow step
    t0 = time.time()

    def step(text: str) -> None:
        log(f"{text}  [{time.time() - t0:.0f} s]")

    step(f"[1/8] loading {checkpoint}")
    ckpt = load_checkpoint(checkpoint)
    config, model = ckpt.config, ckpt.model
    ranges = ShapeRanges.defaults(config, opts.batch, opts.text_len, opts.visual_tokens)
    out_dir = os.path.abspath(opts.out_dir or default_out_dir(checkpoint))
    ids = (ckpt.model_id, *ckpt.legacy_ids)  # an export of format 1 recorded the file's sha256
    check_target(out_dir, ids, opts.force)
    if opts.triton_repo:  # refuse a foreign repository now, not after minutes of work
        from .triton import MARKER

        check_target(opts.triton_repo, ids, opts.force, marker=MARKER)
    log(f"      model id {ckpt.model_id[:16]}..., preset {config.preset}, fusion {config.fusion.fusion}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {out_dir}")
    log("      ranges (min/opt/max): " + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in ranges.to_dict().items()))

    manifest = Manifest(source=checkpoint_source(checkpoint, out_dir, ckpt.model_id, ckpt.sha256),
                        fusion=config.fusion.fusion, opset=opts.opset, ranges=ranges.to_dict(),
                        mimic_engine_version=version)
    metadata = {"model_id": ckpt.model_id, "config": config.to_dict(), "ranges": ranges.to_dict(),
                "opset": str(opts.opset), "format": "mimic-engine-export", "variant": "fp32"}
    result = ExportResult(out_dir, manifest)

    with StagingDir(out_dir) as staging:
        root = staging.path

        step(f"[2/8] exporting ONNX graphs (opset {opts.opset}, TorchScript exporter, dynamo=False)")
        for stage in STAGES:
            start = time.time()
            info = export_graph(model, stage, os.path.join(root, graph_file(stage)), opts.opset, metadata,
                                opts.external_data_bytes)
            log(f"      {graph_file(stage):<24} {info['bytes'] / 1e6:8.1f} MB{' (external data)' if info['external_data'] else ''}"
                f"  onnx.checker ok  {time.time() - start:.1f} s")
        manifest.variants["fp32"] = {stage: graph_file(stage) for stage in STAGES}

        step("[3/8] writing config.json and tokenizer/")
        write_json(os.path.join(root, CONFIG), config.to_dict())
        ckpt.tokenizer.save_pretrained(os.path.join(root, TOKENIZER_DIR))
        write_manifest(root, manifest)  # provisional (complete: false): lets the parity step open the folder

        step("[4/8] parity: ONNX Runtime fp32 vs PyTorch on unseen shapes")
        references = reference_outputs(model, parity_cases(config, ranges, opts.parity_seed))
        summary = _parity(references, root, "fp32", log)
        result.parity["fp32"] = summary
        manifest.parity["fp32"] = _brief(summary)
        if not summary["passed"]:
            manifest.failure = (f"fp32 parity failed: max |diff| {summary['max_abs_diff']:.2e}, min cosine "
                                f"{summary['min_cosine']:.7f} (allowed {summary['tolerance']})")
            _finish(root, manifest, result, config, ranges)
            staging.commit()
            raise ExportError(f"{manifest.failure}; artifacts are in {out_dir} marked incomplete (see {PARITY})")

        step(f"[5/8] variants: {', '.join(opts.variants) or 'none'}")
        _variants(references, root, opts, manifest, result, log)

        step("[6/8] TensorRT engines")
        _tensorrt(references, root, opts, manifest, result, config, ranges, log)

        step("[7/8] model card, README, manifest")
        manifest.complete = True
        _finish(root, manifest, result, config, ranges)
        staging.commit()

    if opts.triton_repo:
        step(f"[8/8] Triton repository -> {opts.triton_repo}")
        from .triton import write_repository

        result.triton_models = write_repository(out_dir, opts.triton_repo, manifest, config, opts.force, log)
    else:
        step("[8/8] Triton repository: skipped (pass --triton-repo DIR)")
    log(f"done in {time.time() - t0:.0f} s")
    return result


# ---- steps ---------------------------------------------------------------------------------------
def _parity(references, root: str, variant: str, log, backend=None) -> dict:
    """Compare `backend` (default: ONNX Runtime on the variant's graphs) with the PyTorch references."""
    if backend is None:
        import onnxruntime as ort

        from mimic_engine.runtime.onnx_backend import OnnxBackend

        # fp16 is meant for GPUs: measure it on ONNX Runtime's CUDA provider where there is one
        gpu = variant == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else None
        backend = OnnxBackend(root, variant=variant, providers=providers, allow_incomplete=True)
    rows = check_parity(references, backend, variant)
    summary = summarize(rows, variant)
    summary["runtime"] = backend.name + (f" {backend.providers[0]}" if hasattr(backend, "providers") else "")
    tol = summary["tolerance"]
    limits = (f"max|d| <= {tol['max_abs_diff']}, " if tol["max_abs_diff"] is not None else "") + \
        f"cosine >= {tol['min_cosine']}"
    log(f"      {variant} on {summary['runtime']}: tolerance {limits}")
    log("\n".join("      " + line for line in format_table(rows).splitlines()))
    return summary


def _brief(summary: dict) -> dict:
    return {k: summary[k] for k in ("passed", "max_abs_diff", "min_cosine", "tolerance", "runtime")}


def _skip(manifest: Manifest, step: str, reason: str, log) -> None:
    manifest.skipped.append({"step": step, "reason": reason})
    log(f"      skipped {step}: {reason}")


def _variants(references, root: str, opts: ExportOptions, manifest: Manifest, result: ExportResult, log) -> None:
    from .optimize import WRITERS

    for variant in opts.variants:
        files = {}
        try:
            for stage in STAGES:
                start = time.time()
                info = WRITERS[variant](os.path.join(root, graph_file(stage)), os.path.join(root, graph_file(stage, variant)),
                                        stage, opts.external_data_bytes)
                files[stage] = graph_file(stage, variant)
                log(f"      {files[stage]:<24} {info['bytes'] / 1e6:8.1f} MB  {time.time() - start:.1f} s")
        except Exception as exc:  # a variant is optional: report why it is missing, keep the export
            _remove(root, [graph_file(stage, variant) for stage in STAGES])  # including a half-written one
            _skip(manifest, variant, f"writing the graph failed ({exc.__class__.__name__}: {str(exc)[:200]})", log)
            continue
        manifest.variants[variant] = files
        write_manifest(root, manifest)
        try:
            summary = _parity(references, root, variant, log)
        except Exception as exc:  # ONNX Runtime cannot load or run the graph here
            why = f"{exc.__class__.__name__}: {str(exc)[:200]}"
            if variant == "fp16":  # e.g. no CPU kernel for an fp16 op: the graph is meant for GPUs anyway
                manifest.parity[variant] = {"passed": None, "reason": f"not measured here ({why}); measure it on a GPU"}
                log(f"      fp16 parity not measured here ({why}); the graph is kept for GPUs")
                continue
            del manifest.variants[variant]
            _remove(root, files.values())
            _skip(manifest, variant, f"ONNX Runtime could not run the graph ({why}); files removed", log)
            continue
        result.parity[variant] = summary
        manifest.parity[variant] = _brief(summary)
        if not summary["passed"]:
            del manifest.variants[variant]
            _remove(root, files.values())
            _skip(manifest, variant, f"parity outside tolerance (max |diff| {summary['max_abs_diff']:.2e}, min cosine "
                                     f"{summary['min_cosine']:.6f}, allowed {summary['tolerance']}); files removed", log)


def _remove(root: str, files) -> None:
    for f in files:
        for path in (os.path.join(root, f), os.path.join(root, f) + ".data"):
            if os.path.exists(path):
                os.remove(path)


def _tensorrt(references, root: str, opts: ExportOptions, manifest: Manifest, result: ExportResult, config,
              ranges: ShapeRanges, log) -> None:
    from .tensorrt_build import availability, build_engine, stage_profiles

    if not opts.tensorrt:
        _skip(manifest, "tensorrt", "turned off (--onnx-only)", log)
        return
    ok, reason = availability()
    if not ok:
        _skip(manifest, "tensorrt", reason, log)
        return
    source = opts.tensorrt_precision if opts.tensorrt_precision in manifest.variants else "fp32"
    if source != opts.tensorrt_precision:
        _skip(manifest, "tensorrt", f"engines are built from the {opts.tensorrt_precision} ONNX graphs, which were "
                                    "not written (not asked for with --precision, or failed above)", log)
        return
    engines, profile_counts = {}, {}
    try:
        for stage in STAGES:
            profiles = stage_profiles(config, ranges, stage)
            engine = f"{TENSORRT_DIR}/{stage}.plan"
            build_engine(os.path.join(root, graph_file(stage, source)), os.path.join(root, engine), profiles,
                         manifest.model_id, stage, source, os.path.join(root, TENSORRT_DIR), log=log)
            engines[stage] = engine
            profile_counts[stage] = len(profiles)
    except Exception as exc:  # the ONNX artifacts are still good; say exactly why there is no engine
        shutil.rmtree(os.path.join(root, TENSORRT_DIR), ignore_errors=True)
        _skip(manifest, "tensorrt", f"building the engines failed ({exc.__class__.__name__}: {str(exc)[:300]})", log)
        return
    manifest.tensorrt = {"engines": engines, "profiles": profile_counts, "precision": source}
    write_manifest(root, manifest)

    from mimic_engine.runtime.tensorrt_backend import TensorRTBackend

    summary = _parity(references, root, source, log, backend=TensorRTBackend(root, allow_incomplete=True))
    result.parity["tensorrt"] = summary
    manifest.parity["tensorrt"] = _brief(summary)
    if not summary["passed"]:
        manifest.tensorrt = None
        shutil.rmtree(os.path.join(root, TENSORRT_DIR), ignore_errors=True)
        _skip(manifest, "tensorrt", f"engine parity outside tolerance (min cosine {summary['min_cosine']:.6f}, "
                                    f"allowed {summary['tolerance']}); engines removed", log)


def _finish(root: str, manifest: Manifest, result: ExportResult, config, ranges: ShapeRanges) -> None:
    """parity.json, model_card.json, README.md, then the manifest with the file table (last)."""
    write_json(os.path.join(root, PARITY), {"model_id": manifest.model_id, **result.parity})
    card = model_card(manifest, config, ranges)
    write_json(os.path.join(root, MODEL_CARD), card)
    with open(os.path.join(root, "README.md"), "w") as fh:
        fh.write(readme(card))
    manifest.files = file_table(root)
    write_manifest(root, manifest)


def model_card(manifest: Manifest, config, ranges: ShapeRanges) -> dict:
    vc = config.vision
    return {
        "model": "MiMIC universal multimodal retrieval encoder (mimic-engine)",
        "model_id": manifest.model_id,
        "fusion": manifest.fusion,
        "embedding_dim": io_spec(config)["fusion"]["outputs"][0]["shape"][1],
        "graphs": {variant: files for variant, files in manifest.variants.items()},
        "io": io_spec(config),
        "rules": INPUT_RULES,
        "ranges_min_opt_max": ranges.to_dict(),
        "preprocessing": {
            "tokenizer": f"{TOKENIZER_DIR}/ (transformers AutoTokenizer); add special tokens, truncate to "
                         f"{config.text.max_length} tokens keeping the last (SEP) token, pad with the pad id",
            "image": {"size": vc.image_size, "resize": vc.resize_mode, "mean": vc.image_mean, "std": vc.image_std,
                      "layout": "RGB, (3, S, S), values (x / 255 - mean) / std, bicubic resize"},
            "max_images_per_item": vc.max_images_per_item,
            "visual_tokens_per_image": config.visual_tokens_per_image,
        },
        "tensorrt": manifest.tensorrt,
        "skipped": manifest.skipped,
        "opset": manifest.opset,
    }


def readme(card: dict) -> str:
    def tensors(items):
        return "\n".join(f"| `{t['name']}` | {t['dtype']} | ({', '.join(map(str, t['shape']))}) |" for t in items)

    io = card["io"]
    graphs = "\n".join(f"- {v}: " + ", ".join(f"`{f}`" for f in files.values()) for v, files in card["graphs"].items())
    rules = "\n".join(f"- {r}" for r in card["rules"])
    pre = card["preprocessing"]
    return f"""# MiMIC encoder, exported (model {card['model_id'][:12]}, {card['fusion']} fusion)

Two ONNX graphs: the vision stage (images -> visual tokens) and the fusion stage (text + visual
tokens -> embedding). Items without images skip the vision graph. Plain `onnxruntime`, numpy and
a tokenizer are enough; mimic-engine is not needed. `model_card.json` holds the same contract.

Graphs:
{graphs}

## vision

| input | dtype | shape |
|---|---|---|
{tensors(io['vision']['inputs'])}

| output | dtype | shape |
|---|---|---|
{tensors(io['vision']['outputs'])}

## fusion

| input | dtype | shape |
|---|---|---|
{tensors(io['fusion']['inputs'])}

| output | dtype | shape |
|---|---|---|
{tensors(io['fusion']['outputs'])}

Rules:
{rules}

Preprocessing: tokenizer in `{TOKENIZER_DIR}/`; images RGB, {pre['image']['size']}x{pre['image']['size']},
{pre['image']['resize']}, normalised with mean {pre['image']['mean']} and std {pre['image']['std']};
{pre['visual_tokens_per_image']} visual tokens per image, at most {pre['max_images_per_item']} images per item.

## With plain onnxruntime

```python
import numpy as np, onnxruntime as ort
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained("tokenizer")
fusion = ort.InferenceSession("fusion.onnx", providers=["CPUExecutionProvider"])
enc = tok(["a red double-decker bus"], padding=True, return_tensors="np")
B, H = enc["input_ids"].shape[0], {io['fusion']['inputs'][2]['shape'][2]}
emb = fusion.run(["embeddings"], {{
    "input_ids": enc["input_ids"].astype(np.int64),
    "attention_mask": enc["attention_mask"].astype(np.int64),
    "visual_tokens": np.zeros((B, 1, H), np.float32),   # no image: one masked token
    "visual_mask": np.zeros((B, 1), np.int64),
}})[0]                                                   # (B, E), L2-normalised
# with images: tokens = vision.run(["visual_tokens"], {{"pixel_values": pixels}})[0]  # (N, P, H)
# then place each item's images side by side in visual_tokens / visual_mask (see Rules).
```

`parity.json` has the ONNX Runtime vs PyTorch comparison; `manifest.json` lists every file with
its sha256, what was skipped and why, and `"complete": true` only for a finished export.
"""
