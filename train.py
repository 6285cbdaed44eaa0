"""Training's entry point: `python train.py [FILE ...] [--if-missing | --force | --rollback]` trains, registers
and gates a model (see bikeshare_membership/train_cli.py)."""

import sys

from bikeshare_membership.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
