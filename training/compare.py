"""`python training/compare.py ...` = `mimic-engine compare ...` (see training/cli.py and comparison.py).

    python training/compare.py                       # small preset, demo corpus, equal steps, seeds 0,1,2
    python training/compare.py --ablations           # + MiMIC without its strategies, early fusion with them
    python training/compare.py --minutes 3 --seeds 0 # an equal time budget instead, one seed
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None):
    """Run `mimic-engine compare ARGV`; returns the compare.json document."""
    from mimic_engine.cli import run_command
    from mimic_engine.training.cli import compare_command

    return run_command(compare_command, argv, prog_name="python training/compare.py")


if __name__ == "__main__":
    main(sys.argv[1:])
