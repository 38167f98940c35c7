"""`python training/mine.py ...` = `mimic-engine mine ...` (see training/cli.py and mining.py).

    python training/mine.py --model runs/mimic/ckpt.pt --data demo --out runs/mimic/train_mined.json
    python training/train.py --hard-negatives runs/mimic/train_mined.json ...
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None):
    """Run `mimic-engine mine ARGV`; returns the path written."""
    from mimic_engine.cli import run_command
    from mimic_engine.training.cli import mine_command

    return run_command(mine_command, argv, prog_name="python training/mine.py")


if __name__ == "__main__":
    main(sys.argv[1:])
