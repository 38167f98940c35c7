"""The `mimic-engine` command. Subcommands live beside the code they drive and load lazily, so
`mimic-engine --help` stays fast and a missing optional package only affects its own command."""
from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from .errors import MimicError

# name -> "module:attribute" of a click command
COMMANDS = {
    "train": "mimic_engine.training.cli:train_command",
    "compare": "mimic_engine.training.cli:compare_command",
    "mine": "mimic_engine.training.cli:mine_command",
    "demo": "mimic_engine.data.demo:demo_command",
    "eval": "mimic_engine.evaluate:eval_command",
    "export": "mimic_engine.export.cli:export_command",
    "serve": "mimic_engine.server.cli:serve_command",
    "index": "mimic_engine.index.cli:index_group",
    "search": "mimic_engine.server.cli:search_command",
    "bench": "mimic_engine.bench.cli:bench_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if self._spec(name) is not None)

    @staticmethod
    def _spec(name):
        module = COMMANDS[name].split(":")[0]
        try:
            return importlib.util.find_spec(module)
        except ModuleNotFoundError:
            return None

    def get_command(self, ctx, name):
        if name not in COMMANDS or self._spec(name) is None:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mimic-engine")
def cli():
    """MiMIC universal multimodal retrieval: train, evaluate, export, serve, benchmark."""


def run_command(command: click.Command, argv=None, prog_name: str | None = None):
    """Run a click command as a program: its return value, or an exit with a one-line error (no
    traceback) for usage errors (2), input errors (2) and Ctrl-C (130). The `mimic-engine` program
    and the `python training/*.py` scripts both run through here."""
    try:
        return command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MimicError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def main(argv=None):
    run_command(cli, argv, prog_name="mimic-engine")


if __name__ == "__main__":
    main()
