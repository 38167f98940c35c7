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
# The step budget per run. Early fusion is the slowest per step (its visual tokens go through the
# text tower, so the frozen tower's states cannot be cached): about 0.75 s/step on 2 idle CPU cores
# (1000 steps in 12.7 minutes, dev evaluations included), MiMIC and late fusion about 0.15-0.2 s/step
# (1119 and 900 steps in 3 minutes); so 400 steps are about 5 minutes for early fusion and 1-2 for
# the others, on the `small` preset and the demo corpus.
DEFAULT_STEPS = 400
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
    """The options of one run. Equal steps: `steps`, no time limit, no early stopping. Equal time:
    `minutes` per run (and `steps` as an upper bound if given), no early stopping."""
    if minutes is None and steps is None:
        raise ValueError("give a step budget, a time budget or both")
    budget = {"steps": steps if steps is not None else UNBOUNDED_STEPS,
              "max_minutes": minutes if minutes is not None else 0.0, "patience": 0}
    return dataclasses.replace(base, fusion=variant.fusion, seed=seed, progress=False,
                               out=os.path.join(out, variant.key, f"seed-{seed}"), **variant.overrides, **budget)


def run_comparison(base: TrainOptions, variants: list[Variant], seeds, out: str, steps: int | None = None,
                   minutes: float | None = None, echo: Callable[[str], None] = print) -> dict:
    """Train and evaluate every variant once per seed -> the compare.json document (also written to OUT)."""
    from .run import run_training

    os.makedirs(out, exist_ok=True)
    doc = {"preset": base.preset, "data": base.data, "data_dir": base.data_dir, "seeds": list(seeds),
           "budget": {"steps": steps, "minutes": minutes, "early_stopping": False}, "variants": []}
    for variant in variants:
        runs = []
        for seed in seeds:
            opts = run_options(base, variant, seed, out, steps, minutes)
            echo(f"\n=== {variant.name}, seed {seed} -> {opts.out}")
            outcome = run_training(opts, echo=echo)
            runs.append({"seed": seed, "out": opts.out, "checkpoint": outcome.checkpoint, "steps": outcome.steps,
                         "best_step": outcome.best_step, "minutes": outcome.minutes,
                         "stop_reason": outcome.stop_reason, "options": outcome.run.options.to_dict(),
                         "report": outcome.report})
        strategy = dataclasses.asdict(outcome.run.config.strategy)
        doc["variants"].append({"key": variant.key, "name": variant.name, "fusion": variant.fusion,
                                "strategy": strategy, "runs": runs, "summary": summarise(runs)})
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


def render_markdown(doc: dict, split: str = "test") -> str:
    """compare.md: the training budget per variant, the diagnostics, then one table per caption-keep
    rate with a row per (query group, variant). Groups and metrics are those the evaluation wrote
    (all / image / text today; any further group appears as it is added)."""
    variants = doc["variants"]
    budget = doc["budget"]
    if budget.get("minutes") is not None:
        kind = f"equal time: {budget['minutes']} minutes per run" + (
            f" (at most {budget['steps']} steps)" if budget.get("steps") is not None else "")
    else:
        kind = f"equal steps: {budget['steps']} per run, no time limit"
    seeds = ", ".join(map(str, doc["seeds"]))
    lines = [f"# Fusion comparison: preset {doc['preset']}, data {doc['data']}, {split} split", "",
             f"Budget: {kind}, no early stopping (the checkpoint is selected on dev, the same rule for every "
             f"variant). Seeds {seeds}: every number is the mean ± sample sd over the seeds; retrieval metrics x100.", "", "## Training", ""]
    rows = []
    for v in variants:
        s, strat = v["summary"], v["strategy"]
        rows.append([v["name"], v["fusion"], str(strat.get("caption_dropout")), str(strat.get("mixin")),
                     _cell(s["steps"], 0), _cell(s["best_step"], 0), _cell(s["minutes"], 2)])
    lines += _table(["variant", "fusion", "caption dropout", "mix-in", "steps", "best step", "minutes"], rows)

    diag = {v["key"]: _leaves(v["summary"].get("diagnostics")) for v in variants}
    columns = [c for c in dict.fromkeys(c for d in diag.values() for c in d)
               if not c.endswith(("n_items", "seed", "_pairs"))]  # counts and the draw's seed are no results
    if columns:
        short = [c.rsplit(".", 1)[-1] for c in columns]
        labels = [s if short.count(s) == 1 else c for s, c in zip(short, columns)]
        lines += ["", f"## Diagnostics ({split} split)", ""]
        lines += _table(["variant"] + [lab.replace("_", " ") for lab in labels],
                        [[v["name"]] + [_cell(diag[v["key"]].get(c), 4) for c in columns] for v in variants])

    results = {v["key"]: v["summary"].get(split) or {} for v in variants}
    rates = list(dict.fromkeys(r for res in results.values() for r in res))
    for rate in rates:
        groups = list(dict.fromkeys(g for res in results.values() for g in (res.get(rate) or {})))
        metrics = list(dict.fromkeys(m for res in results.values() for g in (res.get(rate) or {}).values()
                                     for m in (g or {})))
        rows = []
        for group in groups:
            for v in variants:
                stats = ((results[v["key"]].get(rate) or {}).get(group)) or {}
                rows.append([group, v["name"]] + [_cell(stats.get(m)) for m in metrics])
        lines += ["", f"## caption-keep {rate}", ""]
        lines += _table(["queries", "variant"] + metrics, rows)
    return "\n".join(lines)
