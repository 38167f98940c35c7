"""`mimic-engine export ckpt.pt [--out DIR]`: ONNX graphs, variants, parity, TensorRT, Triton."""
from __future__ import annotations

import click

from .artifacts import DEFAULT_BATCH
from .onnx_export import DEFAULT_OPSET

PRECISIONS = ("fp32", "fp16", "int8")


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: <checkpoint name>-export beside the checkpoint].")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS + ("all",)), default=("all",),
              show_default=True, help="Graphs to write beyond the fp32 reference (repeatable): fp16 (GPU ONNX and the "
              "TensorRT engine), int8 (CPU, dynamic quantisation); fp32 alone: only the reference graphs (and the optimized CPU graphs unless --no-optimize).")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Also write ONNX Runtime-fused graphs for the CPU.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--batch", "batch", default=None, metavar="MIN,OPT,MAX",
              show_default=",".join(map(str, DEFAULT_BATCH.as_list())), help="Items per batch.")
@click.option("--text-len", "text_len", default=None, metavar="MIN,OPT,MAX",
              show_default="1,max_length/2,max_length of the checkpoint", help="Text tokens.")
@click.option("--visual-tokens", "visual_tokens", default=None, metavar="MIN,OPT,MAX",
              show_default="1,P,max_images_per_item*P for P tokens per image",
              help="Visual tokens per item (images x tokens per image).")
@click.option("--onnx-only", is_flag=True, help="Skip TensorRT even where it is installed.")
@click.option("--triton-repo", type=click.Path(file_okay=False), default=None,
              help="Also write a Triton Inference Server model repository here.")
@click.option("--force", is_flag=True, help="Overwrite an output folder that holds another model's files.")
def export_command(checkpoint, out_dir, precisions, optimize, opset, batch, text_len, visual_tokens, onnx_only,
                   triton_repo, force):
    """Export CHECKPOINT (a ckpt.pt) to ONNX (vision + fusion graphs), check parity with PyTorch,
    and write the optional CPU/GPU variants, TensorRT engines and a Triton repository."""
    from .artifacts import Range
    from .pipeline import ExportOptions, export_checkpoint

    wanted = set(PRECISIONS) if "all" in precisions else set(precisions)
    variants = tuple(v for v in ("optimized", "int8", "fp16")
                     if (v == "optimized" and optimize) or v in wanted)
    options = ExportOptions(
        out_dir=out_dir, variants=variants, opset=opset,
        batch=Range.parse("batch", batch) if batch else None,
        text_len=Range.parse("text_len", text_len) if text_len else None,
        visual_tokens=Range.parse("visual_tokens", visual_tokens) if visual_tokens else None,
        tensorrt=not onnx_only, triton_repo=triton_repo, force=force,
    )
    result = export_checkpoint(checkpoint, options, log=click.echo)
    click.echo(summary(result))


def summary(result) -> str:
    """What was written (sizes), what was skipped and why, parity per variant."""
    m = result.manifest
    lines = ["", f"export summary ({'complete' if m.complete else 'INCOMPLETE'}): {result.out_dir}"]
    lines.append("  written:")
    for rel, info in m.files.items():
        lines.append(f"    {rel:<40} {info['bytes'] / 1e6:9.2f} MB")
    for model in result.triton_models:
        lines.append(f"    triton model {model}")
    lines.append("  parity vs PyTorch:")
    for variant, p in m.parity.items():
        if p.get("passed") is None:
            lines.append(f"    {variant:<10} {p.get('reason', 'not measured')}")
        else:
            lines.append(f"    {variant:<10} max|diff| {p['max_abs_diff']:.2e}  min cosine {p['min_cosine']:.7f}  "
                         f"{'ok' if p['passed'] else 'OUTSIDE TOLERANCE'}")
    lines.append("  skipped:" if m.skipped else "  skipped: nothing")
    for s in m.skipped:
        lines.append(f"    {s['step']}: {s['reason']}")
    return "\n".join(lines)
