"""Wait until the registry has a Production version of the model; exit 1 if none appears in time.

    python wait_for_model.py [--timeout SECONDS] [--interval SECONDS]

docker-compose.yml runs it before the web service, which refuses to start without a Production model: with
`--profile local` the tracking server is still starting and the trainer still training. An unreachable
registry counts as "not yet". Exit status 2 for an invalid setting (config.py). Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mlflow.exceptions import MlflowException

from bikeshare_membership import jsonlog
from bikeshare_membership.config import Settings, settings_from_env
from bikeshare_membership.registry import has_production_model


def wait_for_model(settings: Settings, timeout: float, interval: float) -> bool:
    """Poll the registry every `interval` seconds; True as soon as it has a Production version."""
    deadline = time.monotonic() + timeout
    reported = ""
    while True:
        try:
            if has_production_model(settings):
                return True
            status, detail = "no Production version yet", ""
        except MlflowException as error:
            status, detail = "the registry does not answer yet", f": {error.message}"
        if time.monotonic() + interval > deadline:
            print(f"giving up after {timeout:.0f}s: {status}{detail}", file=sys.stderr)
            return False
        if status != reported:  # say it once, not every look
            print(f"waiting for {settings.registered_model} at {settings.tracking_uri}: {status}", flush=True)
            reported = status
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait in all (default 300)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between two looks (default 3)")
    args = parser.parse_args(argv)
    jsonlog.configure()
    # This loop is the retry: one quick attempt per look instead of MLflow's minutes of backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    settings = settings_from_env("wait_for_model.py")
    if not wait_for_model(settings, args.timeout, args.interval):
        return 1
    print(f"{settings.registered_model} has a Production version at {settings.tracking_uri}")
    return 0
