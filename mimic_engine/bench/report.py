"""One report format for every benchmark, and its three renderings: JSON, terminal tables, a PNG chart.

A report is a dict {"schema": "mimic-engine-bench[-KIND]/N", "created": UTC ISO time, "environment":
environment.environment(...), ...the benchmark's own fields}; `new_report` makes one, `write_json`
writes one (or a list of them). Each benchmark documents its own fields where it builds them.
"""
from __future__ import annotations

import json
import time

import numpy as np

from .environment import describe

PARITY_WARN = 0.99  # a min cosine below this is flagged in the table and the chart


def new_report(schema: str, environment: dict, **body) -> dict:
    return {"schema": schema, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment, **body}


def write_json(report, path: str) -> str:
    """Write a report (or a list of reports) as indented JSON -> path."""
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    return path


# ---- the model benchmark ------------------------------------------------------------------------
def format_model_table(report: dict) -> str:
    """The terminal table: one row per backend and batch size, then skipped backends and memory."""
    m, inp, env = report["model"], report["inputs"], report["environment"]
    lines = [
        f"model: {m['source']}  id {str(m['model_id'])[:16]}  params {m['params'] or '?'}  dim {m['embed_dim']}",
        f"inputs: {inp['text_tokens']} text tokens + {inp['images_per_item']} image(s) x "
        f"{inp['visual_tokens_per_image']} visual tokens per item, text-only share {inp['text_only_fraction']:.2f}",
        describe(env),
        f"{report['settings']['iters']} timed iterations after {report['settings']['warmup']} warm-up, "
        "backends interleaved; latency = encode_batch wall time, preprocessing excluded",
        "",
    ]
    header = ("backend", "batch", "median ms", "p90 ms", "p99 ms", "items/s", "speedup", "min cos", "preproc ms")
    rows = []
    for r in report["results"]:
        lat = r["latency_ms"]
        cos = r["parity"]["min_cosine"]
        rows.append((r["backend"], str(r["batch"]), f"{lat['median']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}",
                     f"{r['items_per_s']:.1f}", f"{r['speedup']:.2f}x",
                     f"{cos:.6f}" + (" !" if cos < PARITY_WARN else ""), _ms(report["preprocess_ms"][str(r["batch"])])))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines += [fmt(header), fmt(["-" * w for w in widths])]
    prev = None
    for row in rows:
        if prev is not None and row[1] != prev:
            lines.append("")
        lines.append(fmt(row))
        prev = row[1]
    if any(r["device_ms"] for r in report["results"]):
        lines += ["", "CUDA-event time (median ms): " + ", ".join(
            f"{r['backend']}@{r['batch']} {r['device_ms']['median']:.2f}" for r in report["results"] if r["device_ms"])]
    mem = [(n, b["memory"]) for n, b in report["backends"].items() if b.get("memory")]
    if mem:
        lines += ["", "peak memory (fresh process per backend, batch %s):" % report["settings"]["batches"][-1]]
        for name, mm in mem:
            if "error" in mm:
                lines.append(f"  {name:<15} {mm['error']}")
                continue
            gpu = f", torch CUDA allocator peak {mm['gpu_peak_torch_allocator_mb']:.0f} MB" \
                if mm.get("gpu_peak_torch_allocator_mb") is not None else ""
            lines.append(f"  {name:<15} peak RSS {mm['peak_rss_mb']:.0f} MB ({mm.get('peak_rss_added_mb', '?')} MB "
                         f"above the {mm['rss_before_load_mb']} MB after imports){gpu}")
    skipped = [(n, b["reason"]) for n, b in report["backends"].items() if b["status"] != "ok"]
    if skipped:
        lines += ["", "not run:"] + [f"  {n}: {why}" for n, why in skipped]
    rc = report.get("recall")
    if rc:
        lines += ["", f"recall cost on {rc['dataset']} {rc['split']} ({rc['n_queries']} queries, "
                      f"{rc['n_documents']} documents), x100:",
                  f"  {'backend':<15} {'overlap@10':>10} {'R@10':>7} {'dR@10':>7} {'MRR@10':>7} {'dMRR@10':>8}"]
        for name, v in rc["per_backend"].items():
            lines.append(f"  {name:<15} {v['overlap_at_10']:>10.2f} {v['recall_at_10']:>7.2f} "
                         f"{v['delta_recall_at_10']:>+7.2f} {v['mrr_at_10']:>7.2f} {v['delta_mrr_at_10']:>+8.2f}")
    if m["random_weights"]:
        lines += ["", "note: random weights; latency and parity are meaningful, retrieval quality is not"]
    return "\n".join(lines)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_model_report(report: dict, path: str) -> str:
    """Two panels grouped by batch size, one colour per backend: throughput with the speedup over
    eager fp32 written on each bar, and latency per batch (bar = median, line up to p99, dot at p90).
    Bars whose parity is below PARITY_WARN are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = report["results"]
    names = list(dict.fromkeys(r["backend"] for r in rows))
    sizes = report["settings"]["batches"]
    by = {(r["backend"], r["batch"]): r for r in rows}
    colors = plt.get_cmap("tab10").colors
    width = min(0.8 / len(names), 0.3)
    x = np.arange(len(sizes))
    fig, (ax_thr, ax_lat) = plt.subplots(1, 2, figsize=(max(11.0, 2.0 + 0.55 * len(sizes) * len(names) * 2), 5.6))
    for i, name in enumerate(names):
        pos = x + width * (i - (len(names) - 1) / 2)
        rs = [by.get((name, bs)) for bs in sizes]
        get = lambda f: np.array([f(r) if r else np.nan for r in rs])
        med, p90, p99 = (get(lambda r, k=k: r["latency_ms"][k]) for k in ("median", "p90", "p99"))
        thr = get(lambda r: r["items_per_s"])
        label = f"{name} eager fp32 (baseline)" if name == report["settings"]["baseline"] else name
        style = dict(color=colors[i % 10], edgecolor="white", linewidth=0.5)
        tbars = ax_thr.bar(pos, thr, width, label=label, **style)
        lbars = ax_lat.bar(pos, med, width, **style)
        # the tail: a line from the median up to p99 (capped), a dot at p90
        ax_lat.errorbar(pos, med, yerr=[np.zeros_like(med), p99 - med], fmt="none", ecolor="black", elinewidth=1,
                        capsize=3)
        ax_lat.plot(pos, p90, "o", color="black", markersize=2.5)
        for r, tb, lb in zip(rs, tbars, lbars):
            if r and r["parity"]["min_cosine"] < PARITY_WARN:
                tb.set_hatch("//")
                lb.set_hatch("//")
            if r:
                cos = r["parity"]["min_cosine"]  # shown when it is not a rounding-level match
                text = f"{r['speedup']:.2f}x" + (f"\ncos {cos:.4f}" if cos < 0.9999 else "")
                ax_thr.annotate(text, (tb.get_x() + tb.get_width() / 2, tb.get_height()),
                                xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                                rotation=90 if len(names) > 3 else 0)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (ax_thr, ax_lat):
        ax.set_xticks(x, [f"batch {bs}" for bs in sizes])
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    for ax, values in ((ax_thr, [r["items_per_s"] for r in rows]), (ax_lat, [r["latency_ms"]["p99"] for r in rows]
                                                                       + [r["latency_ms"]["median"] for r in rows])):
        log_scale = max(values) / max(min(values), 1e-9) > 30  # far apart: a linear axis hides the small ones
        if log_scale:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        # headroom for the labels above the bars (rotated two-line labels need the most)
        labelled = ax is ax_thr
        top = max(values) * (((4.0 if len(names) > 3 else 2.0) if labelled else 1.3) if log_scale
                             else ((1.35 if len(names) > 3 else 1.15) if labelled else 1.05))
        ax.set_ylim(top=top)
    ax_thr.set_ylabel("items per second (at median latency)")
    ax_thr.set_title("Throughput; label = speedup vs eager fp32 (+ min cosine if < 0.9999)", fontsize=10.5)
    ax_lat.set_ylabel("ms per batch")
    ax_lat.set_title("Latency per batch: bar = median, line to p99, dot = p90", fontsize=10.5)
    m, inp, env, st = report["model"], report["inputs"], report["environment"], report["settings"]
    where = env["gpu"] or f"{env['cpu']} ({env['cpus_usable']} cores)"
    images = "text only" if not inp["images_per_item"] else (
        f"{inp['images_per_item']} image x {inp['visual_tokens_per_image']} visual tokens")
    mixed = f", {inp['text_only_fraction']:.0%} text-only items" if inp["text_only_fraction"] else ""
    fig.suptitle(f"mimic-engine bench: {m['source']}\n{inp['text_tokens']} text tokens + {images} per item{mixed}; "
                 f"{where}; {st['iters']} timed runs each", fontsize=10)
    handles, labels = ax_thr.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(names), 4), frameon=False, fontsize=9)
    if any(r["parity"]["min_cosine"] < PARITY_WARN for r in rows):
        fig.text(0.99, 0.01, f"hatched: min cosine vs eager fp32 below {PARITY_WARN}", ha="right", fontsize=8)
    fig.tight_layout(rect=(0, 0.07 + 0.04 * ((len(names) - 1) // 4), 1, 0.99))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---- the serve benchmark ------------------------------------------------------------------------
def format_serve_table(report: dict) -> str:
    header = ("concurrency", "sent", "ok", "errors", "QPS", "median ms", "p90 ms", "p99 ms")
    rows = []
    for lv in report["levels"]:
        lat = lv["latency_ms"] or {}
        errors = ", ".join(f"{s}: {n}" for s, n in lv["errors"].items()) or "-"
        rows.append((str(lv["concurrency"]), str(lv["sent"]), str(lv["ok"]), errors, f"{lv['qps']:.1f}",
                     *(f"{lat[k]:.1f}" if lat else "-" for k in ("median", "p90", "p99"))))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
    title = f"POST {report['url']}{report['path']}  ({report['image_fraction']:.0%} image queries)"
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


# ---- servers side by side -----------------------------------------------------------------------
def _num(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def format_compare_table(report: dict) -> str:
    """Markdown: every run (cell, server, repeat) with its rates, latency and server CPU, then per cell the
    medians over repeats and each server's ratios to the first."""
    env = report["environment"]
    flags = [f for f in env["cpu_flags"] if f.startswith(("avx512", "amx", "avx_vnni"))]
    lines = [f"servers side by side: {', '.join(t['label'] + ' ' + t['url'] for t in report['targets'])}",
             f"cpu: {env['cpu']} ({env['cpus_usable']} usable cores, load {env['load_average_1m']}; "
             f"flags {' '.join(flags) or '-'}); {report['texts']['n']} English queries of "
             f"{report['texts']['min_words']}-{report['texts']['max_words']} words; at most "
             f"{report['requests_per_run']} requests or {report['duration_limit_s']:g} s per run, "
             f"{report['repeats']} interleaved repeats", "",
             "| cell (clients x texts/request) | server | repeat | requests/s | texts/s | p50 ms | p99 ms | "
             "server cores | server CPU ms/request | model ms/request | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lat = r["latency_ms"] or {}
        errors = ", ".join(f"{s}: {n}" for s, n in r["errors"].items()) or "-"
        lines.append(f"| {r['concurrency']}x{r['texts_per_request']} | {r['target']} | {r['repeat'] + 1} | "
                     f"{r['qps']:.1f} | {r['texts_per_s']:.0f} | {_num(lat.get('median'))} | {_num(lat.get('p99'))} | "
                     f"{_num(r['server_cpu_cores'], '.2f')} | {_num(r['server_cpu_ms_per_request'])} | "
                     f"{_num((r['server_stage_ms'] or {}).get('model'))} | {errors} |")
    first = report["targets"][0]["label"]
    lines += ["", f"medians over repeats; ratios to {first}:", "",
              "| cell | server | requests/s | texts/s | p50 ms | p99 ms | server CPU ms/request | "
              f"requests/s vs {first} | p99 vs {first} |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in report["summary"]:
        for label, row in cell["targets"].items():
            lines.append(f"| {cell['concurrency']}x{cell['texts_per_request']} | {label} | {_num(row['qps'])} | "
                         f"{_num(row['texts_per_s'], '.0f')} | {_num(row['p50_ms'])} | {_num(row['p99_ms'])} | "
                         f"{_num(row['server_cpu_ms_per_request'])} | {_num(row['qps_vs_first'], '.2f')}x | "
                         f"{_num(row['p99_vs_first'], '.2f')}x |")
    return "\n".join(lines)


def plot_compare_report(report: dict, path: str) -> str:
    """One column per cell: texts/s on top, p50 (bar) and p99 (line) latency below; bars are the medians over
    repeats, dots the single repeats; one colour per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [t["label"] for t in report["targets"]]
    cells = [tuple(c) for c in report["cells"]]
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(2, len(cells), figsize=(3.6 * len(cells) + 1, 6.4), squeeze=False)
    for ci, (c, k) in enumerate(cells):
        ax_thr, ax_lat = axes[0][ci], axes[1][ci]
        for ti, label in enumerate(labels):
            mine = [r for r in report["runs"] if r["target"] == label and (r["concurrency"], r["texts_per_request"])
                    == (c, k) and r["latency_ms"]]
            if not mine:
                continue
            color = colors[ti % 10]
            thr = [r["texts_per_s"] for r in mine]
            p50 = [r["latency_ms"]["median"] for r in mine]
            p99 = [r["latency_ms"]["p99"] for r in mine]
            ax_thr.bar(ti, np.median(thr), 0.7, color=color, label=label)
            ax_thr.plot([ti] * len(thr), thr, "o", color="black", markersize=3)
            ax_lat.bar(ti, np.median(p50), 0.7, color=color)
            ax_lat.errorbar([ti], [np.median(p50)], yerr=[[0], [np.median(p99) - np.median(p50)]], fmt="none",
                            ecolor="black", capsize=4)
            ax_lat.plot([ti] * len(p99), p99, "_", color="black", markersize=10)
        ax_thr.set_title(f"{c} clients x {k} text{'s' if k > 1 else ''}/request", fontsize=10)
        for ax in (ax_thr, ax_lat):
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            ax.spines[["top", "right"]].set_visible(False)
        if ci == 0:
            ax_thr.set_ylabel("texts per second")
            ax_lat.set_ylabel("ms per request: bar p50, line to p99")
    env = report["environment"]
    fig.suptitle(f"embedding servers side by side: {env['cpu']}, {env['cpus_usable']} cores; "
                 f"{report['repeats']} interleaved repeats (dots / ticks)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---- the GPU benchmark --------------------------------------------------------------------------
def format_gpu_profile(rows: list, total_ms: float, launches: float, title: str) -> str:
    lines = [f"{title}: {launches:g} kernels, {total_ms:.3f} ms of kernel time per call",
             "| kernel | calls per call | ms per call | share |", "|---|---|---|---|"]
    for r in rows:
        name = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
        lines.append(f"| {name} | {r['calls']:g} | {r['ms']:.3f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines)


def format_gpu_table(rows: list, title: str) -> str:
    header = ("variant", "batch", "median ms", "items/s", "TFLOP/s", "min cosine vs fp32")
    lines = [title, "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r['batch']} | failed: {r['error']} | | | |")
        else:
            tflops = f"{r['tflops']:.3g}" if r.get("tflops") is not None else "-"
            lines.append(f"| {r['variant']} | {r['batch']} | {r['ms']:.2f} | {r['items_s']:.0f} | {tflops} | "
                         f"{r['cosine']:.5f} |")
    return "\n".join(lines)
