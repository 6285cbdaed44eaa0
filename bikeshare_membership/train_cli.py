"""Train the membership model on City trip files, test it on a month it has not seen, register it, and promote
it to Production only if it passes the champion/challenger gate.

    python train.py                 # the bundled trips in data/: evaluate, register, gate, promote
    python train.py FILE ...        # City trip files in any layout (CSV, gzip, zip, Parquet)
    python train.py --if-missing    # only when the registry has no Production version (used by `make serve`)
    python train.py --force         # promote even when the gate refuses, and say so in the run and the card
    python train.py --rollback      # move Production back to the version it replaced (alias `previous`)

The time-ordered evaluation and the candidates are in training.py, logging and registering in
registration.py, the gate, promotion and rollback in promotion.py. One MLflow run records the test month's
figures beside the prior's, every validation month, the gate's comparison, the figures, the training feature
profile (drift.py) and the fitted pipeline; the registered version carries the model card (description and
tags) that `GET /model` returns. Exit status: 0 when the version is promoted (or, with --if-missing, one
already is), 1 when the gate refuses it, 2 when the data cannot support a time-ordered evaluation, there
is nothing to roll back to or a setting is invalid (config.py). Logs are JSON lines on stderr; the summary
is on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from bikeshare_membership import jsonlog, promotion
from bikeshare_membership.config import settings_from_env
from bikeshare_membership.registration import DEFAULT_DATA, train
from bikeshare_membership.registry import NoProductionModel, has_production_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="*", type=Path, default=DEFAULT_DATA, help="trip files (default: data/*.csv.gz)")
    parser.add_argument("--if-missing", action="store_true", help="do nothing if a Production version exists")
    parser.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded)")
    parser.add_argument("--rollback", action="store_true", help="move Production back to the `previous` version")
    args = parser.parse_args(argv)
    jsonlog.configure()
    settings = settings_from_env("train.py")
    name = settings.registered_model

    if args.rollback:
        try:
            left, restored = promotion.rollback(MlflowClient(settings.tracking_uri, settings.tracking_uri), name)
        except (LookupError, NoProductionModel) as error:
            print(f"{name}: cannot roll back: {error}", file=sys.stderr)
            return 2
        print(f"rolled {name} back from version {left} to version {restored} (now in Production)")
        return 0
    if args.if_missing and has_production_model(settings):
        print(f"{name} already has a Production version at {settings.tracking_uri}; not training")
        return 0
    try:
        result = train(settings, args.data, force=args.force)
    except ValueError as error:
        print(f"{name}: cannot train: {error}", file=sys.stderr)
        return 2
    metrics = result.metrics
    print(
        f"time-ordered test on {result.test_month}: ROC AUC {metrics['test_roc_auc']:.4f} "
        f"(prior {metrics['prior_roc_auc']:.4f}), log loss {metrics['test_log_loss']:.4f} "
        f"(prior {metrics['prior_log_loss']:.4f}), Brier {metrics['test_brier']:.4f} "
        f"(prior {metrics['prior_brier']:.4f})\n"
        f"registered {name} version {result.version} (run {result.run_id}), refitted on every month\n"
        f"gate: {result.verdict.reason}"
    )
    if not result.verdict.promote:
        print(f"{name} version {result.version} not promoted; Production is unchanged", file=sys.stderr)
        return 1
    replaced = f", replacing version {result.replaced} (alias previous)" if result.replaced else ""
    print(f"promoted {name} version {result.version} to Production{replaced}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
