"""Click options that several commands share, declared once.

    @click.command()
    @device_option()                       # --device auto|cpu|cuda|cuda:N
    @data_options(default="demo")          # --data KIND --data-dir DIR
    @caption_keep_option(default=DEFAULT_KEEP_RATES)   # --caption-keep 1.0,0.5,0.0
    @seeds_option(default=(0, 1, 2))       # --seeds 0,1,2
    def command(device, data_kind, data_dir, caption_keep, seeds): ...

Choices come from the modules that own them (dataset kinds: `mimic_engine.data.KINDS`; device
names: `mimic_engine.device`; presets and fusions: `mimic_engine.config`), and every option shows
its default through click's `show_default`, so no help text repeats a value. Each helper takes
extra `click.option` keywords (`envvar=`, `help=`, `default=`, ...) for the command that needs them.
This module stays light: click and the package's plain-data modules only.
"""
from __future__ import annotations

import click

from .config import DEFAULT_PRESET, FUSIONS, PRESETS
from .data import KINDS as DATA_KINDS
from .device import DEFAULT_DEVICE, check_device
from .errors import ConfigError


class DeviceType(click.ParamType):
    """auto, cpu, cuda or cuda:N (checked by `mimic_engine.device.check_device`)."""

    name = "device"

    def get_metavar(self, param, ctx=None):
        return "[auto|cpu|cuda|cuda:N]"

    def convert(self, value, param, ctx):
        try:
            return check_device(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


class CommaList(click.ParamType):
    """A comma-separated list, e.g. "1.0,0.5,0.0" -> (1.0, 0.5, 0.0); optionally bounded to [low, high]
    or to a set of `choices`."""

    name = "list"

    def __init__(self, item=float, low=None, high=None, example: str = "1,2,3", what: str = "numbers",
                 choices: tuple | None = None):
        self.item, self.low, self.high, self.example, self.what = item, low, high, example, what
        self.choices = choices

    def get_metavar(self, param, ctx=None):
        return "X,Y,..."

    def convert(self, value, param, ctx):
        parts = list(value) if isinstance(value, (list, tuple)) else [p.strip() for p in str(value).split(",")]
        parts = [p for p in parts if p != ""]
        try:
            values = tuple(self.item(p) for p in parts)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a comma-separated list of {self.what}; write e.g. {self.example}", param, ctx)
        if not values:
            self.fail(f"{value!r} is empty; write a comma-separated list of {self.what}, e.g. {self.example}", param, ctx)
        bad = [v for v in values if (self.low is not None and v < self.low) or (self.high is not None and v > self.high)]
        if bad:
            bounds = f"in [{self.low:g}, {self.high:g}]" if self.high is not None else f">= {self.low:g}"
            self.fail(f"{value!r}: {bad} out of range; every value must be {bounds}, e.g. {self.example}", param, ctx)
        unknown = [v for v in values if self.choices is not None and v not in self.choices]
        if unknown:
            self.fail(f"{value!r}: unknown {unknown}; choose from {', '.join(self.choices)}, e.g. {self.example}",
                      param, ctx)
        return values


DEVICE = DeviceType()
INTS = CommaList(int, example="1,8,64", what="integers")
FLOATS = CommaList(float, example="1.0,0.5", what="numbers")
CAPTION_KEEP_RATES = CommaList(float, 0.0, 1.0, example="1.0,0.5,0.0", what="caption-keep rates in [0, 1]")
CAPTION_KEEP_RATE = click.FloatRange(0.0, 1.0)
SEEDS = CommaList(int, 0, None, example="0,1,2", what="non-negative integer seeds")
PRESET_LIST = CommaList(str, example="small,small-effnet", what="presets", choices=PRESETS)


def comma(values) -> str:
    """(1.0, 0.5) -> "1.0,0.5": how a list default is written on the command line (and shown)."""
    return ",".join(str(v) for v in values)


def _option(*decls, **kw):
    kw.setdefault("show_default", kw.get("default") is not None)
    return click.option(*decls, **kw)


def device_option(default: str = DEFAULT_DEVICE, **kw):
    kw.setdefault("help", "Where the model runs; auto = CUDA when torch sees a GPU, else the CPU.")
    return _option("--device", type=DEVICE, default=default, **kw)


def data_options(default: str | None = None, kind_param: str = "data_kind", dir_param: str = "data_dir"):
    """--data KIND (required unless `default`) and --data-dir DIR, as parameters `kind_param`, `dir_param`."""

    def decorate(f):
        f = click.option("--data-dir", dir_param, type=click.Path(file_okay=False), default=None,
                         help="Dataset folder (demo: optional, built on first use).")(f)
        return _option("--data", kind_param, type=click.Choice(DATA_KINDS), default=default, required=default is None,
                       help="Dataset format.")(f)

    return decorate


def caption_keep_option(*decls, default, **kw):
    """A list of caption-keep rates in [0, 1] (image documents keep their caption at that rate);
    `default` from its owner (evaluation: `mimic_engine.evaluate.DEFAULT_KEEP_RATES`)."""
    kw.setdefault("help", "Comma-separated caption-keep rates in [0, 1].")
    return _option(*(decls or ("--caption-keep",)), type=CAPTION_KEEP_RATES,
                   default=comma(default) if default is not None else None, **kw)


def threads_option(default: int | None = None, **kw):
    kw.setdefault("help", "CPU threads per operator (torch / ONNX Runtime).")
    if default is None:
        kw.setdefault("show_default", "the library's: all cores")
    return _option("--threads", type=click.IntRange(min=1), default=default, **kw)


def seed_option(default: int = 0, **kw):
    kw.setdefault("help", "Random seed.")
    return _option("--seed", type=click.IntRange(min=0), default=default, **kw)


def seeds_option(default, **kw):
    kw.setdefault("help", "Comma-separated seeds; each is a separate run.")
    return _option("--seeds", type=SEEDS, default=comma(default), **kw)


def preset_option(default: str | None = DEFAULT_PRESET, **kw):
    kw.setdefault("help", "Model size preset (mimic_engine.config).")
    return _option("--preset", type=click.Choice(PRESETS), default=default, **kw)


def presets_option(default, **kw):
    """--preset A,B,...: several presets, each a separate set of runs (`mimic-engine compare`)."""
    kw.setdefault("help", "Comma-separated model size presets (mimic_engine.config); each is a separate set of runs.")
    return _option("--preset", "presets", type=PRESET_LIST, default=comma(default), **kw)


def fusion_option(default: str | None = "decoder", **kw):
    kw.setdefault("help", "decoder = MiMIC, early = MARVEL-style, late = UniVL-DR-style.")
    return _option("--fusion", type=click.Choice(FUSIONS), default=default, **kw)


__all__ = ["CAPTION_KEEP_RATE", "CAPTION_KEEP_RATES", "CommaList", "DATA_KINDS", "DEVICE", "DeviceType", "FLOATS",
           "INTS", "PRESET_LIST", "SEEDS", "caption_keep_option", "comma", "data_options", "device_option", "fusion_option",
           "preset_option", "presets_option", "seed_option", "seeds_option", "threads_option"]
