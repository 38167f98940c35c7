"""`python training/train.py ...` = `mimic-engine train ...` (see training/cli.py; --help lists the options).

    python training/train.py --preset small                      # demo corpus, 3-minute budget on 2 CPU cores
    python training/train.py --preset base --data webqa --data-dir WEBQA --device cuda \
        --text-model T5_ANCE_DIR --vision-model CLIP_VIT_B32_DIR --freeze vision
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None):
    """Run `mimic-engine train ARGV`; returns the best checkpoint's path."""
    from mimic_engine.cli import run_command
    from mimic_engine.training.cli import train_command

    return run_command(train_command, argv, prog_name="python training/train.py")


if __name__ == "__main__":
    main(sys.argv[1:])
