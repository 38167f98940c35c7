"""`mimic-engine train | compare | mine` (also `python training/{train,compare,mine}.py`).

    mimic-engine train --preset small                       # demo corpus, 3-minute budget on 2 CPU cores
    mimic-engine train --preset small --fusion early        # MARVEL-style baseline
    mimic-engine train --config run.toml --lr 1e-4          # a config file; flags override it
    mimic-engine compare --ablations                        # MiMIC vs baselines, equal steps, 3 seeds
    mimic-engine mine --model runs/mimic/ckpt.pt --out runs/mimic/train_mined.json

Only command-line parsing lives here; the work is done by training/run.py, comparison.py and
mining.py. Every default shown by --help is read from the code that owns it.
"""
from __future__ import annotations

import dataclasses

import click
from click.core import ParameterSource

from mimic_engine.cli_options import (caption_keep_option, data_options, device_option, fusion_option,
                                      preset_option, presets_option, seed_option, seeds_option)
from mimic_engine.config import PRESETS, TrainingStrategy

from .comparison import ABLATIONS, ALL_VARIANTS, DEFAULT_SEEDS, DEFAULT_STEPS
from .mining import DEFAULT_TOP
from .options import FREEZABLE, PRESET_DEFAULTS, TrainOptions, load_config_file

SETTINGS = {"help_option_names": ["-h", "--help"]}
DEFAULTS = TrainOptions()
STRATEGY = TrainingStrategy()


def by_preset(name: str) -> str:
    """How --help shows a default that the preset decides, e.g. "tiny: 100, small: 60, base: 100"."""
    def shown(value):
        if value is None:
            return "none"
        if isinstance(value, tuple):
            return ",".join(value) or "nothing"
        return str(value)

    return ", ".join(f"{p}: {shown(PRESET_DEFAULTS[p][name])}" for p in PRESETS)


def strategy_default(name: str) -> str:
    """A strategy's default (mimic_engine.config.TrainingStrategy), as --help shows it."""
    value = getattr(STRATEGY, name)
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def parse_overrides(ctx, param, values) -> dict:
    """--set KEY=VALUE (repeatable) -> {dotted key: value}; VALUE is JSON, a bare word a string."""
    import json

    out = {}
    for text in values:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{text!r}: expected KEY=VALUE with a dotted config key, "
                                     "e.g. fusion.memory_norm=false or vision.image_size=128")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def options_from_context(ctx: click.Context) -> TrainOptions:
    """TrainOptions from `train`'s parameters: the defaults < the --config file < flags given."""
    params = dict(ctx.params)
    config_path = params.pop("config_path")
    merged = load_config_file(config_path) if config_path else {}
    given = {name: value for name, value in params.items()
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    if "freeze" in given:
        given["freeze"] = tuple(f for f in given["freeze"] if f != "none")
    if "overrides" in given:  # flags refine the file's overrides key by key
        given["overrides"] = {**merged.get("overrides", {}), **given["overrides"]}
    merged.update(given)
    return TrainOptions.from_dict(merged, where=config_path or "the options")


def parse_options(argv: list[str]) -> TrainOptions:
    """The TrainOptions that `mimic-engine train ARGV` would run with (for scripts and tests)."""
    with train_command.make_context("train", list(argv)) as ctx:
        return options_from_context(ctx)


@click.command("train", context_settings=SETTINGS)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="JSON or TOML file of options (names with underscores); flags given here override it.")
@preset_option(default=DEFAULTS.preset)
@fusion_option(default=DEFAULTS.fusion)
@data_options(default=DEFAULTS.data, kind_param="data")
@click.option("--out", type=click.Path(file_okay=False), default=DEFAULTS.out, show_default=True, help="Output folder.")
@device_option(default=DEFAULTS.device)
@seed_option(default=DEFAULTS.seed, help="Python, NumPy and torch seeds, query order, caption coins.")
@click.option("--text-model", type=click.Path(file_okay=False), default=None, show_default="the preset's",
              help="Local from_pretrained folder of the text backbone (T5 / BERT).")
@click.option("--vision-model", type=click.Path(file_okay=False), default=None, show_default="the preset's",
              help="Local from_pretrained folder of the CLIP vision backbone.")
@click.option("--tokenizer", type=click.Path(file_okay=False), default=None, show_default="--text-model, else the preset's",
              help="Local tokenizer folder.")
@click.option("--random-init", is_flag=True, default=DEFAULTS.random_init, help="Random backbone weights (benchmarks).")
@click.option("--set", "overrides", multiple=True, callback=parse_overrides, metavar="KEY=VALUE",
              help="Override a model config field of the preset (repeatable), e.g. --set fusion.memory_norm=false.")
@click.option("--caption-dropout", type=click.FloatRange(0.0, 1.0), default=None,
              show_default=strategy_default("caption_dropout"), help="P(drop an image item's caption); 0 disables.")
@click.option("--mixin", type=click.FloatRange(0.0, 10.0), default=None, show_default=strategy_default("mixin"),
              help="Single-modality mix-in: unimodal views per multimodal positive; 0 disables.")
@click.option("--query-caption-dropout/--no-query-caption-dropout", "caption_dropout_queries", default=None,
              show_default=strategy_default("caption_dropout_queries"),
              help="Image+text queries (EVQA) lose their text with the caption-dropout probability.")
@click.option("--batch-size", type=click.IntRange(min=2), default=DEFAULTS.batch_size, show_default=True,
              help="Queries per step (at least 2: in-batch negatives); under torchrun the global batch, "
                   "shared by the processes.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=DEFAULTS.grad_accum, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULTS.steps, show_default=True,
              help="Upper bound on optimisation steps.")
@click.option("--max-minutes", type=click.FloatRange(min=0.0), default=None, show_default=by_preset("max_minutes"),
              help="Wall-clock budget of the loop (dev evaluations included, final report not); 0 = none.")
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True, help="Learning rate of pretrained weights.")
@click.option("--lr-new", type=float, default=DEFAULTS.lr_new, show_default=True,
              help="Learning rate of weights trained from scratch.")
@click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True,
              help="AdamW decay (none on biases, norms, logit scale).")
@click.option("--warmup", type=click.FloatRange(0.0, 1.0), default=DEFAULTS.warmup, show_default=True,
              help="Warm-up fraction of the run.")
@click.option("--grad-clip", type=click.FloatRange(min=0.0, min_open=True), default=DEFAULTS.grad_clip, show_default=True)
@click.option("--freeze", multiple=True, type=click.Choice(FREEZABLE + ("none",)), show_default=by_preset("freeze"),
              help="Freeze a tower (repeatable); 'none' trains everything.")
@click.option("--amp/--no-amp", default=DEFAULTS.amp, show_default=True,
              help="On CUDA: autocast in bf16 where supported, else fp16 with a gradient scaler.")
@click.option("--hard-negatives", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Mined file from `mimic-engine mine`.")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, show_default=by_preset("eval_every"),
              help="Dev evaluation period in steps.")
@click.option("--eval-max-queries", type=click.IntRange(min=1), default=None, show_default="all",
              help="Bound the dev evaluation.")
@click.option("--patience", type=click.IntRange(min=0), default=None, show_default=by_preset("patience"),
              help="Evaluations without gain before stopping; 0 = never stop early.")
@caption_keep_option("--select-keep", "select_keep", default=DEFAULTS.select_keep,
                     help="Caption-keep rates whose mean dev MRR@10 selects the checkpoint.")
@caption_keep_option("--caption-keep", "final_caption_keep", default=DEFAULTS.final_caption_keep,
                     help="Caption-keep rates of the final dev/test report.")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=DEFAULTS.eval_batch_size, show_default=True)
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue from OUT/last.pt of an earlier run (same preset and fusion).")
@click.option("--progress/--no-progress", default=DEFAULTS.progress, show_default=True, help="A tqdm progress bar.")
@click.pass_context
def train_command(ctx, **_):
    """Train MiMIC (fusion-in-decoder) or the early/late fusion baselines; writes OUT/ckpt.pt (best dev
    MRR@10), OUT/last.pt, OUT/metrics.jsonl, OUT/curves.png and OUT/results.json."""
    from .run import run_training

    return run_training(options_from_context(ctx), echo=click.echo).checkpoint


@click.command("compare", context_settings=SETTINGS)
@presets_option(default=(DEFAULTS.preset,))
@data_options(default=DEFAULTS.data)
@device_option(default=DEFAULTS.device)
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True,
              help="Equal step budget: every run takes exactly this many steps (no time limit, no early stopping).")
@click.option("--minutes", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Equal time budget instead: minutes in the loop per run (--steps, when given too, stays an "
                   "upper bound).")
@seeds_option(default=DEFAULT_SEEDS)
@click.option("--variants", default=None, metavar="A,B,...",
              help=f"Comma-separated subset to run, of: {', '.join(ALL_VARIANTS)} [default: the three fusions, "
                   "plus the ablations with --ablations].")
@click.option("--ablations", is_flag=True, help=f"Also run: {', '.join(ABLATIONS)}.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/compare", show_default=True,
              help="Output folder: OUT/compare.md, OUT/compare.json, OUT/compare.png, OUT/<preset>/<variant>/seed-<s>/.")
@click.option("--reuse/--no-reuse", default=True, show_default=True,
              help="Read back a run already finished in OUT with the same options instead of training it again.")
@click.option("--report-only", is_flag=True,
              help="Train nothing: write the tables from the runs already finished in OUT (missing ones left out).")
@click.pass_context
def compare_command(ctx, presets, data_kind, data_dir, device, steps, minutes, seeds, variants, ablations, out, reuse,
                    report_only):
    """MiMIC against the MARVEL-style (early) and UniVL-DR-style (late) baselines: same data and
    budget, each variant once per seed and preset (e.g. `--preset small,small-effnet` for both image
    towers); test metrics per query kind at caption-keep 1.0 / 0.5 / 0.0 and the diagnostics as
    mean ± sd over the seeds, in OUT/compare.md and OUT/compare.json."""
    from .comparison import run_comparison, select_variants, render_markdown

    chosen = select_variants([v.strip() for v in variants.split(",") if v.strip()] if variants else None, ablations)
    if minutes is not None and ctx.get_parameter_source("steps") == ParameterSource.DEFAULT:
        steps = None  # an equal-time comparison: the clock alone ends every run
    base = dataclasses.replace(DEFAULTS, preset=presets[0], data=data_kind, data_dir=data_dir, device=device)
    doc = run_comparison(base, chosen, seeds, out, steps=steps, minutes=minutes, presets=presets, reuse=reuse,
                         train=not report_only, echo=click.echo)
    click.echo("\n" + render_markdown(doc))
    return doc


@click.command("mine", context_settings=SETTINGS)
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False),
              help="ckpt.pt of the model that mines.")
@data_options(default="demo")
@click.option("--split", default="train", show_default=True, help="Split whose queries get negatives.")
@click.option("--top", type=click.IntRange(min=1), default=DEFAULT_TOP, show_default=True,
              help="Documents retrieved per query (positives among them are dropped).")
@device_option()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file (WebQA query lines).")
def mine_command(model, data_kind, data_dir, split, top, device, out):
    """Mine hard negatives with a trained model, for `mimic-engine train --hard-negatives OUT`."""
    from mimic_engine.data import load_dataset
    from mimic_engine.encoder import MimicEncoder

    from .mining import mine, write_mined

    encoder = MimicEncoder.from_checkpoint(model, device)
    rows = mine(encoder, load_dataset(data_kind, data_dir), split, top)
    write_mined(rows, out)
    click.echo(f"mined {len(rows)} {split} queries -> {out}")
    return out


__all__ = ["compare_command", "mine_command", "options_from_context", "parse_options", "train_command"]
