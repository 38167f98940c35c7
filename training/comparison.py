"""MiMIC against the early- and late-fusion baselines: same data, same budget, several seeds, one table.

Each variant is trained by `run_training` once per seed with the same preset, data and budget:
by default an equal number of optimisation steps (no time limit, no early stopping, so every run
takes exactly those steps), or, with `minutes`, an equal wall-clock budget. Each run's best
checkpoint (dev selection, the same rule for every variant) is evaluated on the test split at
caption-keep 1.0 / 0.5 / 0.0 with the diagnostics; `summarise` gives mean and sd over the seeds of
every number, and `render_markdown` writes the tables. Output: OUT/<variant>/seed-<s>/ per run,
OUT/compare.json, OUT/compare.md and the chart OUT/compare.png (training/plots.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

from .options import TrainOptions


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    fusion: str
    overrides: dict = field(default_factory=dict)  # TrainOptions fields (None values: the defaults)


# The baselines train as their papers do: no caption dropout, no mix-in. The ablations separate the
# architecture from the training strategies.
VARIANTS = {v.key: v for v in (
    Variant("mimic", "MiMIC (decoder + dropout + mix-in)", "decoder"),
    Variant("early", "MARVEL-style (early)", "early", {"caption_dropout": 0.0, "mixin": 0.0}),
    Variant("late", "UniVL-DR-style (late)", "late", {"caption_dropout": 0.0, "mixin": 0.0}),
)}
ABLATIONS = {v.key: v for v in (
    Variant("decoder-plain", "decoder, no dropout, no mix-in", "decoder", {"caption_dropout": 0.0, "mixin": 0.0}),
    Variant("decoder-dropout", "decoder + dropout, no mix-in", "decoder", {"mixin": 0.0}),
    Variant("early-strategies", "early + dropout + mix-in", "early"),
    # the decoder's memory as a raw concatenation of text states and visual tokens (no per-modality
    # LayerNorm, no modality embedding): the architecture before `fusion.memory_norm`
    Variant("decoder-raw-memory", "decoder + dropout + mix-in, raw memory", "decoder",
            {"overrides": {"fusion.memory_norm": False}}),
)}
ALL_VARIANTS = {**VARIANTS, **ABLATIONS}
DEFAULT_SEEDS = (0, 1, 2)
# The step budget per run: the budget of the published comparison (docs/results.md). On the
# `small` preset and the demo corpus, one thread per run, MiMIC and late fusion take about 2-4
# minutes per run, dev evaluations and the final report included; early fusion (its visual tokens go
# through the text tower, so the frozen tower's states cannot be cached) about 10; `small-effnet`
# adds the EfficientNet tower at 224 px (a one-time feature cache per run, then the final report).
DEFAULT_STEPS = 300
UNBOUNDED_STEPS = 10**9  # the step bound of an equal-time comparison: the clock ends every run


def select_variants(names: list[str] | None, ablations: bool) -> list[Variant]:
    from mimic_engine.errors import ConfigError

    keys = names if names else list(VARIANTS) + (list(ABLATIONS) if ablations else [])
    unknown = [k for k in keys if k not in ALL_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; known: {', '.join(ALL_VARIANTS)}")
    return [ALL_VARIANTS[k] for k in keys]


def run_options(base: TrainOptions, variant: Variant, seed: int, out: str, steps: int | None,
                minutes: float | None) -> TrainOptions:
    """The options of one run, written to OUT/<variant>/seed-<seed>. Equal steps: `steps`, no time
    limit, no early stopping. Equal time: `minutes` per run (and `steps` as an upper bound if
    given), no early stopping."""
    if minutes is None and steps is None:
        raise ValueError("give a step budget, a time budget or both")
    budget = {"steps": steps if steps is not None else UNBOUNDED_STEPS,
              "max_minutes": minutes if minutes is not None else 0.0, "patience": 0}
    return dataclasses.replace(base, fusion=variant.fusion, seed=seed, progress=False,
                               out=os.path.join(out, variant.key, f"seed-{seed}"), **variant.overrides, **budget)


# Options that say where or how visibly a run goes, not what it trains: a finished run is reused
# whatever they are.
_NOT_COMPARED = ("out", "progress", "resume")


def finished_run(options: TrainOptions) -> tuple[dict | None, str]:
    """(record, why) for the run `options` describe: its record when OUT already holds a finished
    run (ckpt.pt, results.json, a "stopped" event in metrics.jsonl) trained with the same resolved
    options, else None and the reason it must be trained."""
    import torch

    from .options import resolve_options

    paths = {name: os.path.join(options.out, name) for name in ("ckpt.pt", "results.json", "metrics.jsonl")}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if missing:
        return None, f"no finished run there ({', '.join(missing)} missing)"
    with open(paths["metrics.jsonl"], encoding="utf-8") as fh:
        stops = [rec for rec in map(json.loads, fh) if rec.get("event") == "stopped"]
    if not stops:
        return None, "its metrics.jsonl has no 'stopped' event: the run was interrupted"
    try:  # mmap: only the small meta dict is read, not the weights
        meta = torch.load(paths["ckpt.pt"], map_location="cpu", weights_only=True, mmap=True).get("meta", {})
    except Exception as exc:  # a truncated or foreign file: train again
        return None, f"its ckpt.pt cannot be read ({exc.__class__.__name__})"
    # an option the run's version did not have yet took its default then
    defaults = TrainOptions().to_dict()
    stored = {**defaults, **(meta.get("train_options") or {})}
    wanted = resolve_options(options).options.to_dict()
    differ = sorted(k for k in set(stored) | set(wanted) if k not in _NOT_COMPARED and stored.get(k) != wanted.get(k))
    if differ:
        return None, "it was trained with other options: " + ", ".join(
            f"{k}={stored.get(k)!r} (now {wanted.get(k)!r})" for k in differ[:4])
    with open(paths["results.json"], encoding="utf-8") as fh:
        report = json.load(fh)
    stop = stops[-1]
    minutes = next((rec["elapsed_s"] / 60 for rec in reversed(stops) if rec.get("elapsed_s") is not None), None)
    return {"seed": options.seed, "out": options.out, "checkpoint": paths["ckpt.pt"], "steps": stop.get("step"),
            "best_step": stop.get("best_step"), "minutes": None if minutes is None else round(minutes, 3),
            "stop_reason": stop.get("reason"), "options": stored, "commit": meta.get("commit"),
            "reused": True, "report": report}, "reused"


def tower_label(resolved) -> str:
    """The image tower of a resolved run, for tables: 'ViT, from scratch' / 'EfficientNet-Lite0, pretrained, frozen'."""
    vision, frozen = resolved.config.vision, "vision" in (resolved.options.freeze or ())
    name = {"clip": "ViT", "efficientnet_lite": "EfficientNet-Lite0"}.get(vision.kind, vision.kind)
    if not (vision.pretrained and not resolved.config.random_init):
        return f"{name}, from scratch"
    return f"{name}, pretrained, " + ("frozen" if frozen else "fine-tuned")


def run_comparison(base: TrainOptions, variants: list[Variant], seeds, out: str, steps: int | None = None,
                   minutes: float | None = None, presets: tuple[str, ...] | None = None, reuse: bool = True,
                   train: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Train and evaluate every variant once per seed and preset -> the compare.json document (also
    written to OUT). Runs go to OUT/<preset>/<variant>/seed-<s>/; with `reuse`, a run already
    finished there with the same options is read back instead of trained again (so an interrupted
    comparison resumes, and more seeds or variants add to one table). With `train=False` nothing is
    trained: the tables hold the finished runs only (a variant with none is left out)."""
    from .options import resolve_options
    from .run import run_training

    presets = tuple(presets or (base.preset,))
    os.makedirs(out, exist_ok=True)
    doc = {"presets": list(presets), "data": base.data, "data_dir": base.data_dir, "seeds": list(seeds),
           "budget": {"steps": steps, "minutes": minutes, "early_stopping": False}, "variants": []}
    for name in presets:
        for variant in variants:
            runs = []
            for seed in seeds:
                opts = run_options(dataclasses.replace(base, preset=name), variant, seed,
                                   os.path.join(out, name), steps, minutes)
                record, why = finished_run(opts) if reuse else (None, "--no-reuse")
                echo(f"\n=== {name} / {variant.name}, seed {seed} -> {opts.out}: "
                     + ("reusing the finished run" if record else f"{'training' if train else 'left out'} ({why})"))
                if record is None and not train:
                    continue
                if record is None:
                    outcome = run_training(opts, echo=echo)
                    record = {"seed": seed, "out": opts.out, "checkpoint": outcome.checkpoint, "steps": outcome.steps,
                              "best_step": outcome.best_step, "minutes": outcome.minutes,
                              "stop_reason": outcome.stop_reason, "options": outcome.run.options.to_dict(),
                              "reused": False, "report": outcome.report}
                runs.append(record)
            if not runs:
                continue
            resolved = resolve_options(opts)
            doc["variants"].append({"key": variant.key, "name": variant.name, "preset": name,
                                    "tower": tower_label(resolved), "fusion": variant.fusion,
                                    "strategy": dataclasses.asdict(resolved.config.strategy), "runs": runs,
                                    "summary": summarise(runs)})
            write_outputs(doc, out)  # after every variant, so an interrupted comparison keeps what it measured
    return doc


def write_outputs(doc: dict, out: str) -> None:
    with open(os.path.join(out, "compare.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as fh:
        fh.write(render_markdown(doc) + "\n")
    from .plots import plot_comparison

    plot_comparison(doc, os.path.join(out, "compare.png"))


# ---- mean +- sd over seeds ------------------------------------------------------------------------
def mean_sd(values: list) -> dict:
    """{"mean", "sd", "n"} of the numbers in `values` (None skipped); sd is the sample sd (None for n < 2)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": mean, "sd": sd, "n": len(xs)}


def aggregate(trees: list) -> dict | None:
    """Nested dicts of numbers (one per seed, same layout) -> the same layout with mean_sd leaves.
    Keys keep their first-seen order; a key missing from some seeds averages over those that have it."""
    trees = [t for t in trees if t is not None]
    if not trees:
        return None
    if not all(isinstance(t, dict) for t in trees):
        return mean_sd(trees)
    keys = list(dict.fromkeys(k for t in trees for k in t))
    return {k: aggregate([t.get(k) for t in trees]) for k in keys}


def summarise(runs: list[dict]) -> dict:
    out = {name: mean_sd([r[name] for r in runs]) for name in ("steps", "best_step", "minutes")}
    for split in ("dev", "test"):
        if any(split in r["report"] for r in runs):
            out[split] = aggregate([r["report"].get(split, {}).get("results") for r in runs])
    out["diagnostics"] = aggregate([r["report"].get("diagnostics") for r in runs])
    return out


# ---- tables ---------------------------------------------------------------------------------------
def _cell(stat: dict | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text if stat.get("sd") is None else f"{text} ± {stat['sd']:.{digits}f}"


def _leaves(tree: dict | None, prefix: str = "") -> dict:
    """{"a.b": {"mean", "sd", "n"}} for every statistic in a summary tree."""
    out = {}
    for key, value in (tree or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and "mean" in value and "n" in value:
            out[path] = value
        elif isinstance(value, dict):
            out.update(_leaves(value, path + "."))
    return out


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _presets(doc: dict) -> list[str]:
    return doc.get("presets") or [doc["preset"]]  # compare.json before presets were a list: one preset


def _label(v: dict, doc: dict) -> str:
    """A variant's row label: its name, and its preset when the comparison has several."""
    return v["name"] if len(_presets(doc)) == 1 else f"{v['name']} ({v.get('preset')})"


# The diagnostics that sum a variant up in the kind table: does the image count when a caption is there?
SUMMARY_DIAGNOSTICS = (("same-caption shift", "same_caption_image_swap_shift"), ("collapse ratio", "collapse_ratio"))


def kind_table(doc: dict, metric: str, split: str = "test") -> list[str]:
    """One row per variant (and preset): `metric` for every query kind ("kind:<k>" groups) at every
    caption-keep rate, the modality-collapse diagnostics and the number of seeds. [] when the
    evaluation recorded no kinds."""
    variants = doc["variants"]
    results = {id(v): v["summary"].get(split) or {} for v in variants}
    rates = list(dict.fromkeys(r for res in results.values() for r in res))
    kinds = list(dict.fromkeys(g for res in results.values() for r in rates for g in (res.get(r) or {})
                               if g.startswith("kind:")))
    if not kinds:
        return []
    head = ["tower", "variant"] + [f"{k.removeprefix('kind:')} {r}" for k in kinds for r in rates]
    head += [label for label, _ in SUMMARY_DIAGNOSTICS] + ["seeds"]
    rows = []
    for v in variants:
        collapse = ((v["summary"].get("diagnostics") or {}).get("modality_collapse")) or {}
        cells = [_cell(((results[id(v)].get(r) or {}).get(k) or {}).get(metric), 1) for k in kinds for r in rates]
        diagnostics = [_cell(collapse.get(key), 4 if "shift" in key else 2) for _, key in SUMMARY_DIAGNOSTICS]
        rows.append([v.get("tower") or v.get("preset") or "-", _label(v, doc)] + cells + diagnostics
                    + [str(len(v.get("runs", [])))])
    return _table(head, rows)


def render_markdown(doc: dict, split: str = "test") -> str:
    """compare.md: the per-kind summary tables (NDCG@10 and MRR@10, when the data has query kinds),
    the training budget per variant, the diagnostics, then one table per caption-keep rate with a
    row per (query group, variant). Groups and metrics are those the evaluation wrote."""
    variants = doc["variants"]
    budget = doc["budget"]
    if budget.get("minutes") is not None:
        kind = f"equal time: {budget['minutes']} minutes per run" + (
            f" (at most {budget['steps']} steps)" if budget.get("steps") is not None else "")
    else:
        kind = f"equal steps: {budget['steps']} per run, no time limit"
    seeds = ", ".join(map(str, doc["seeds"]))
    presets = ", ".join(_presets(doc))
    lines = [f"# Fusion comparison: preset {presets}, data {doc['data']}, {split} split", "",
             f"Budget: {kind}, no early stopping (the checkpoint is selected on dev, the same rule for every "
             f"variant). Seeds {seeds}: every number is the mean ± sample sd over the seeds; retrieval metrics x100."]
    for metric in ("NDCG@10", "MRR@10"):
        table = kind_table(doc, metric, split)
        if table:
            lines += ["", f"## {metric} per query kind and caption-keep rate", ""] + table
    lines += ["", "## Training", ""]
    rows = []
    for v in variants:
        s, strat = v["summary"], v["strategy"]
        reused = sum(bool(r.get("reused")) for r in v.get("runs", []))
        rows.append([_label(v, doc), v["fusion"], str(strat.get("caption_dropout")), str(strat.get("mixin")),
                     _cell(s["steps"], 0), _cell(s["best_step"], 0), _cell(s["minutes"], 2), str(reused)])
    lines += _table(["variant", "fusion", "caption dropout", "mix-in", "steps", "best step", "minutes",
                     "runs reused"], rows)

    diag = {id(v): _leaves(v["summary"].get("diagnostics")) for v in variants}
    columns = [c for c in dict.fromkeys(c for d in diag.values() for c in d)
               if not c.endswith(("n_items", "seed", "_pairs"))]  # counts and the draw's seed are no results
    if columns:
        short = [c.rsplit(".", 1)[-1] for c in columns]
        labels = [s if short.count(s) == 1 else c for s, c in zip(short, columns)]
        lines += ["", f"## Diagnostics ({split} split)", ""]
        lines += _table(["variant"] + [lab.replace("_", " ") for lab in labels],
                        [[_label(v, doc)] + [_cell(diag[id(v)].get(c), 4) for c in columns] for v in variants])

    results = {id(v): v["summary"].get(split) or {} for v in variants}
    rates = list(dict.fromkeys(r for res in results.values() for r in res))
    for rate in rates:
        groups = list(dict.fromkeys(g for res in results.values() for g in (res.get(rate) or {})))
        metrics = list(dict.fromkeys(m for res in results.values() for g in (res.get(rate) or {}).values()
                                     for m in (g or {})))
        rows = []
        for group in groups:
            for v in variants:
                stats = ((results[id(v)].get(rate) or {}).get(group)) or {}
                rows.append([group, _label(v, doc)] + [_cell(stats.get(m)) for m in metrics])
        lines += ["", f"## caption-keep {rate}", ""]
        lines += _table(["queries", "variant"] + metrics, rows)
    return "\n".join(lines)
