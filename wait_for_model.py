"""Waiting for a Production model's entry point: `python wait_for_model.py [--timeout S] [--interval S]`, run by
docker-compose.yml before the web service (see bikeshare_membership/wait_cli.py)."""

import sys

from bikeshare_membership.wait_cli import main

if __name__ == "__main__":
    sys.exit(main())
