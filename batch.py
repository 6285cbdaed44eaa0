"""Batch scoring's entry point: `python batch.py score|evaluate|watch ...` (see bikeshare_membership/batch_cli.py)."""

import sys

from bikeshare_membership.batch_cli import main

if __name__ == "__main__":
    sys.exit(main())
