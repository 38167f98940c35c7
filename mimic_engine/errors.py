"""Errors a user can act on.

Every message names the bad value, what was expected, and how to fix it. Library code raises
these; the CLI prints them without a traceback and the HTTP server maps them to 4xx answers.
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MimicError(Exception):
    """Base class for errors caused by input, configuration or environment (not bugs)."""


class ConfigError(MimicError, ValueError):
    """A configuration value is unknown or out of range."""


class InputError(MimicError, ValueError):
    """An item (text, image, request field) cannot be used."""


class CheckpointError(MimicError):
    """A checkpoint file is missing, foreign, truncated or of a newer format."""


class DataError(MimicError, ValueError):
    """A data file is malformed or refers to ids that do not exist."""


class MissingDependencyError(MimicError, ImportError):
    """An optional package is not installed."""


def choice(name: str, value, allowed) -> None:
    """Raise ConfigError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, allowed))}")


def require(module: str, install: str | None = None, purpose: str = "") -> ModuleType:
    """Import an optional dependency or fail with the exact command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" (needed for {purpose})" if purpose else ""
        cmd = install or f"pip install {module}"
        raise MissingDependencyError(f"the optional package '{module}' is not installed{what}; install it with: {cmd}") from exc
