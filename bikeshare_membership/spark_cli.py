"""Batch scoring on Spark from the command line (spark_scoring.py): City trip files of any size in, Parquet
partitioned by trip start date out.

    python spark_score.py INPUT [INPUT ...] --output DIR [--master local[2]]   # Spark in this process
    spark-submit [options] spark_score.py INPUT [INPUT ...] --output DIR      # a cluster: docs/spark.md

INPUT is a file, a folder or a glob (.csv, .csv.gz, .zip, .parquet), local or on any file system Spark's Hadoop has
(`s3a://` with hadoop-aws on the cluster). The version scored is the registry's Production one (alias, else
stage), or `--model-version`; without one the command fails in one line. Spark starts while the driver
resolves and fetches the version. Logs go to stderr; a one-line summary ends the run on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bikeshare_membership import jsonlog
from bikeshare_membership.config import Settings
from bikeshare_membership.errors import first_line
from bikeshare_membership.spark_scoring import (
    FetchedModel,
    fetch_model,
    local_class_archive,
    resolve_version,
    score_files,
    start_session,
    stop_session,
    under_spark_submit,
)

PROGRAM = "spark_score.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="a file, folder or glob: .csv, .csv.gz, .zip, .parquet"
    )
    parser.add_argument("--output", required=True, help="the predictions' folder (Parquet, partitioned by trip_date)")
    parser.add_argument("--rejects", help="the rejects' folder (CSV; default: OUTPUT.rejects)")
    parser.add_argument("--model-version", help="score with this version, not the Production one")
    parser.add_argument("--master", help="Spark's master when run by hand (default local[*]); spark-submit's own")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT and the rejects if they exist")
    parser.add_argument("--probability", action="store_true", help="also write P(Member) unrounded, `probability`")
    parser.add_argument("--summary-file", type=Path, help="also write the run's summary here as JSON")
    return parser


def one_line(error: BaseException) -> str:
    """An error as one line: a Python worker's error by its own last line, not Spark's pages around it."""
    text = str(error).strip()
    java = getattr(error, "java_exception", None)  # py4j's Py4JJavaError
    if java is not None:
        text = str(java.toString())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:  # pyspark's PythonException carries the worker's traceback
        lines = [line for line in lines if not line.startswith(("at ", "File ", "^"))]
        return lines[-1][:500]
    return lines[0][:500] if lines else first_line(error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.master and under_spark_submit():
        print(f"{PROGRAM}: --master is spark-submit's under spark-submit", file=sys.stderr)
        return 2
    jsonlog.configure()
    logging.getLogger("py4j").setLevel(logging.WARNING)  # a line per call to the JVM at INFO
    settings = Settings.from_env()
    classes = None
    if settings.spark_class_cache and not under_spark_submit():
        classes = local_class_archive(Path(settings.spark_class_cache).expanduser())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model") as pool:
        # The driver resolves, fetches and loads the version while Spark starts and lists the inputs (Java runs in
        # a process of its own): the job needs the version only once the inputs are listed.
        model = pool.submit(resolve_and_fetch, settings, args.model_version)
        try:
            started = time.monotonic()
            spark = start_session(args.master, classes=classes)
            start_seconds = time.monotonic() - started
        except Exception as error:  # no Java, a bad master: one line
            print(f"{PROGRAM}: {one_line(error)}", file=sys.stderr)
            return 2
        done = False
        try:
            summary = score_files(
                spark,
                model,
                args.inputs,
                args.output,
                rejects=args.rejects,
                overwrite=args.overwrite,
                with_probability=args.probability,
                spark_start_seconds=start_seconds,
            )
            done = True
        except Exception as error:  # no Production version, an input missing or unreadable, an output that exists,
            print(f"{PROGRAM}: {one_line(error)}", file=sys.stderr)  # a model or a worker's error: one line
            return 2
        finally:
            stop_session(spark, classes, keep_classes=done)
    if args.summary_file:
        args.summary_file.write_text(json.dumps(summary.as_dict(), indent=1))
    print(summary.line())
    return 0


def resolve_and_fetch(settings: Settings, version: str | None) -> FetchedModel:
    """The Production version, or `version`, in the driver's cache and checked to load."""
    return fetch_model(settings, resolve_version(settings, version))
