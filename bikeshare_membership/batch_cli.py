"""Batch scoring from the command line: a file of trips in, one prediction per trip out, by hand, by the
service (a job's process) or on a schedule.

    python batch.py score INPUT [--output OUTPUT]     # a local path or s3:// URI; CSV, gzip, zip or Parquet
    python batch.py evaluate INPUT [--min-roc-auc X]  # a labelled file: metrics and drift, logged to MLflow
    python batch.py evaluate --predictions LOG INPUT  # the live answers of PREDICTION_LOG against INPUT's labels
    python batch.py watch SOURCE --every 10m [--evaluate]   # score each new file under a folder or S3 prefix

Scoring is batch_scoring.py's, the service's jobs batch_jobs.py's, watching watch.py's. Logs are JSON lines
on stderr; a one-line summary ends each run on stdout.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bikeshare_membership import jsonlog
from bikeshare_membership.batch_jobs import JobStatusFile, now
from bikeshare_membership.batch_scoring import score_file
from bikeshare_membership.config import Settings, settings_from_env
from bikeshare_membership.model_store import (
    ModelUnavailable,
    load_model_version,
    load_production_model,
)
from bikeshare_membership.watch import WatchState, floor, parse_interval, watch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score one file")
    score.add_argument("input", help="a local path or s3:// URI (.csv, .csv.gz, .zip, .parquet)")
    score.add_argument("--output", help="where to write (.csv, .csv.gz, .parquet, or a folder/ prefix)")
    score.add_argument("--model-version", help="score with this version, not the Production one")
    score.add_argument("--status-file", type=Path, help="a job's status JSON to keep up to date (the service's)")
    score.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by N")

    evaluate = commands.add_parser("evaluate", help="evaluate the Production model on a labelled file")
    evaluate.add_argument("input", help="a labelled local path or s3:// URI")
    evaluate.add_argument("--min-roc-auc", type=float, help="fail below this (default EVAL_MIN_ROC_AUC, 0.6)")
    evaluate.add_argument(
        "--predictions", metavar="LOG", help="score the answers in this prediction log (PREDICTION_LOG), by version"
    )

    watcher = commands.add_parser("watch", help="score each new file under a folder or S3 prefix")
    watcher.add_argument("source", help="a local folder or s3://bucket/prefix/")
    watcher.add_argument("--every", type=parse_interval, required=True, help="how long to sleep: 30s, 10m, 1h")
    watcher.add_argument("--output", help="a folder or s3:// prefix for the results (default: beside each input)")
    watcher.add_argument("--evaluate", action="store_true", help="also evaluate each new labelled file")
    watcher.add_argument("--min-roc-auc", type=float, help="the evaluation's floor (default EVAL_MIN_ROC_AUC)")
    watcher.add_argument("--state-file", type=Path, help="default: <BATCH_STATE_DIR>/watch-state.json")
    watcher.add_argument("--max-cycles", type=int, help="stop after N cycles (default: never)")
    return parser


def _score_command(settings: Settings, args: argparse.Namespace) -> int:
    os.nice(args.nice)
    job = JobStatusFile(args.status_file) if args.status_file else None
    if job is not None:
        job.update(status="running", pid=os.getpid(), host=socket.gethostname(), started_at=now())
    try:
        model = (
            load_model_version(settings, args.model_version) if args.model_version else load_production_model(settings)
        )
        with tqdm(unit="B", unit_scale=True, disable=not sys.stderr.isatty(), desc="scoring") as bar:

            def on_progress(rows: int, bytes_read: int, size: int) -> None:
                bar.total = size
                bar.update(bytes_read - bar.n)
                bar.set_postfix(rows=f"{rows:,}", refresh=False)
                if job is not None:
                    job.progress(rows, bytes_read, size)

            summary = score_file(settings, args.input, args.output, model, on_progress)
    except BaseException as error:
        if job is not None:
            message = str(error) if isinstance(error, Exception) else "stopped before it finished"
            job.update(status="failed", finished_at=now(), error=message)
        raise
    if job is not None:
        job.update(
            status="succeeded",
            finished_at=now(),
            rows_done=summary.rows,
            progress=1.0,
            summary=summary.as_dict(),
            peak_rss_mb=_peak_rss_mb(),
        )
    print(summary.line())
    return 0


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux's VmHWM), for sizing the service's memory; None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def _evaluate_command(settings: Settings, args: argparse.Namespace) -> int:
    from bikeshare_membership import monitoring  # MLflow's run logging and matplotlib, only here

    if args.predictions:
        return _evaluate_predictions(settings, args)
    model = load_production_model(settings)
    try:
        result = monitoring.evaluate_file(settings, args.input, model, floor(settings, args.min_roc_auc))
    except monitoring.NoLabels as error:
        print(f"batch.py evaluate: {error}", file=sys.stderr)
        return 2
    metrics = result.metrics
    print(
        f"{args.input}: model {model.name} version {model.version} on {metrics['labelled_rows']:,.0f} labelled "
        f"trips: {result.message}; Member share {metrics['member_share_predicted']:.1%} predicted, "
        f"{metrics['member_share_observed']:.1%} observed; run {result.run_id} in {result.experiment!r}"
    )
    if not result.passed:
        print(f"batch.py evaluate: FAILED: {result.message}", file=sys.stderr)
        return 1
    return 0


def _evaluate_predictions(settings: Settings, args: argparse.Namespace) -> int:
    from bikeshare_membership import live_monitoring, monitoring

    try:
        result = live_monitoring.evaluate_predictions(
            settings, args.predictions, args.input, floor(settings, args.min_roc_auc)
        )
    except monitoring.NoLabels as error:
        print(f"batch.py evaluate: {error}", file=sys.stderr)
        return 2
    print(
        f"{args.predictions} x {args.input}: {result.answers:,} answers, {result.answers_without_label:,} found no "
        f"label, {result.labels_without_answer:,} labelled trips had no answer"
    )
    for (name, version, role), evaluation in result.by_version.items():
        print(live_monitoring.version_line(name, version, role, evaluation))
    failed = [
        evaluation for (*_, role), evaluation in result.by_version.items() if role == "served" and not evaluation.passed
    ]
    for evaluation in failed:
        print(f"batch.py evaluate: FAILED: {evaluation.message}", file=sys.stderr)
    return 1 if failed else 0


def _watch_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.output is not None and not (args.output.endswith("/") or Path(args.output).is_dir()):
        print("batch.py watch: --output must be a folder or an s3:// prefix ending with /", file=sys.stderr)
        return 2
    state = WatchState(args.state_file or Path(settings.batch_state_dir) / "watch-state.json")
    watch(settings, args.source, args.every, state, args.output, args.evaluate, args.min_roc_auc, args.max_cycles)
    return 0


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM (docker stop) ends the run like Ctrl-C: partial outputs are removed, a job records it."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    jsonlog.configure()
    signal.signal(signal.SIGTERM, _stop)
    settings = settings_from_env(f"batch.py {args.command}")
    commands = {"score": _score_command, "evaluate": _evaluate_command, "watch": _watch_command}
    try:
        return commands[args.command](settings, args)
    except (ValueError, OSError, LookupError, ModelUnavailable) as error:  # no model; a file missing or unreadable
        print(f"batch.py {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
