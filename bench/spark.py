"""Benchmark the Spark job against `batch.py score` on a million generated trips, each end to end, in one run.

    python bench/spark.py [--rows 1000000] [--master local[2]] [--keep DIR] [--compare-scorers]

It trains the model it scores (`train.py` on the bundled trips) into a SQLite registry of its own in the work
folder, so it runs from a clean clone and leaves the configured registry alone, and caches the version (with its
saved fast form), and Java's class archive for Spark (spark_classes.py: a first run on 10,000 trips), before timing
anything, so both commands start as on a host that has scored before. It writes
the trips as bench/batch.py does (the City's 2019-2024 layout, sampled from the bundled real trips, moved into
June 2024), then times, as separate processes from launch to exit, `python batch.py score TRIPS --output
scores.parquet` and
`python spark_score.py TRIPS --output DIR --master local[2]`: start-up, reading, parsing, features, model and
writing all count, Spark's JVM and Python workers included. Spark's start-up (the session alone) is reported apart.
It then joins the two outputs on trip_id: every trip must be in both, with the same membership; `max_abs_diff` is
the largest difference of their `proba` (percent, as written) in probability units.

`--compare-scorers` also times the scoring forms on the parsed trips held in Spark's cache, in this process:
`mlflow.pyfunc.spark_udf(..., env_manager="local", result_type="array<double>")` against the job's form, a
`mapInArrow` over `LoadedModel.member_probability` (docs/spark.md has the figures).

The last line is one JSON object: rows, spark_rows_per_s, batch_rows_per_s, spark_vs_batch, max_abs_diff.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: train.py run as a user runs it

from harness import clean_env, run_train  # noqa: E402

from batch import generate_trips  # noqa: E402  bench/batch.py: the same generated trips
from bikeshare_membership import spark_classes  # noqa: E402
from bikeshare_membership.config import Settings  # noqa: E402
from bikeshare_membership.model_store import ModelStore  # noqa: E402

TARGETS = {"spark_vs_batch": 0.4, "max_abs_diff": 1e-9}


def timed(command: list[str], env: dict[str, str]) -> float:
    """Run `command` from the repository root; its wall-clock seconds, launch to exit. Fails if it fails."""
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def save_class_archive(trips_csv: Path, folder: Path, master: str, env: dict[str, str]) -> None:
    """Run the Spark job once on the first 10,000 trips, untimed: the first run on a host saves Java's class
    archive (spark_classes.py), which every later run starts from."""
    sample = folder / "warm-up.csv"
    with trips_csv.open("rb") as source, sample.open("wb") as head:
        head.writelines(line for _, line in zip(range(10_001), source, strict=False))
    command = [sys.executable, "spark_score.py", str(sample), "--output", str(folder / "warm-up-scores")]
    seconds = timed([*command, "--overwrite", "--master", master], env)
    print(f"saved Spark's class archive with a first run on 10,000 trips in {seconds:.1f}s")


def compare(batch_output: Path, spark_output: Path) -> float:
    """The largest |proba| difference (probability units) over the trips of both outputs; fails unless both hold
    the same trips with the same memberships."""
    batch = pq.read_table(batch_output, columns=["trip_id", "membership", "proba"]).to_pandas()
    spark = ds.dataset(spark_output, format="parquet", partitioning="hive").to_table().to_pandas()
    joined = batch.merge(spark, on="trip_id", how="outer", suffixes=("_batch", "_spark"), indicator=True)
    if not (joined["_merge"] == "both").all() or len(joined) != len(batch) or len(batch) != len(spark):
        raise SystemExit(f"the outputs hold different trips: {joined['_merge'].value_counts().to_dict()}")
    if not (joined["membership_batch"] == joined["membership_spark"]).all():
        raise SystemExit("the outputs disagree on a membership")
    return float((joined["proba_batch"] - joined["proba_spark"]).abs().max() / 100)


def compare_scorers(trips_csv: Path, master: str, settings: Settings) -> None:
    """spark_udf against mapInArrow over the same parsed trips, cached in Spark; each timed twice (cold, warm)."""
    import mlflow
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from bikeshare_membership import spark_scoring
    from bikeshare_membership.schema import MODEL_INPUT_COLUMNS

    model = spark_scoring.fetch_model(settings, spark_scoring.resolve_version(settings))
    spark = spark_scoring.start_session(master)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-spark-model-") as staging:
            ref = spark_scoring.ship_model(spark, model, Path(staging))
            inputs = spark_scoring.read_inputs(spark, [str(trips_csv)])
            parsed = spark_scoring.parsed_trips(spark, inputs).where(F.col("reason").isNull())
            parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
            rows = parsed.count()
            tally = spark.sparkContext.accumulator(spark_scoring.Tally(), spark_scoring.TallyParam())
            mlflow.set_tracking_uri(settings.tracking_uri)
            mlflow.set_registry_uri(settings.tracking_uri)
            udf = mlflow.pyfunc.spark_udf(
                spark, f"models:/{ref.name}/{ref.version}", result_type="array<double>", env_manager="local"
            )
            forms = {
                "spark_udf": lambda: parsed.select(udf(F.struct(*MODEL_INPUT_COLUMNS))[1].alias("p")),
                "mapInArrow": lambda: parsed.mapInArrow(
                    lambda batches: spark_scoring._scored_batches(ref, tally, batches),
                    spark_scoring.spark_schema(spark_scoring.SCORED_SCHEMA),
                ).select("probability"),
            }
            for name, form in forms.items():
                for attempt in ("cold", "warm"):
                    started = time.perf_counter()
                    form().write.format("noop").mode("overwrite").save()
                    seconds = time.perf_counter() - started
                    print(f"scoring {rows:,} parsed trips by {name} ({attempt}): {rows / seconds:,.0f} rows/s")
            parsed.unpersist()
    finally:
        spark.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--keep", type=Path, help="write the files here and keep them (default: a temporary folder)")
    parser.add_argument("--compare-scorers", action="store_true", help="also time spark_udf against mapInArrow")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-spark-") as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        trips_csv = folder / "bike-share-ridership-2024-06-generated.csv"
        if not trips_csv.exists() or pd.read_csv(trips_csv, usecols=[0]).shape[0] != args.rows:
            started = time.perf_counter()
            generate_trips(trips_csv, args.rows)
            print(f"generated {args.rows:,} trips in {time.perf_counter() - started:.1f}s: {trips_csv}")
        settings = Settings(
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            registered_model="bikeshare-membership-bench",
            model_cache_dir=str(folder / "model-cache"),
            spark_class_cache=str(folder / "spark-classes"),
        )
        env = clean_env() | settings.to_env() | {"MLFLOW_DISABLE_TELEMETRY": "true"}
        if not (folder / "mlflow.db").exists():
            print("training the model to score ...", flush=True)
            run_train(env, folder)
        ModelStore(settings).load_production()  # cached with its fast form, as on a host that has scored before
        if not any(Path(settings.spark_class_cache).glob(f"*/{spark_classes.SPARK}")):
            save_class_archive(trips_csv, folder, args.master, env)

        batch_output = folder / "scores.parquet"
        batch_seconds = timed([sys.executable, "batch.py", "score", str(trips_csv), "--output", str(batch_output)], env)
        print(f"batch.py score, end to end: {args.rows:,} rows in {batch_seconds:.1f}s")

        spark_output, summary_file = folder / "spark-scores", folder / "spark-summary.json"
        spark_seconds = timed(
            [
                *(sys.executable, "spark_score.py", str(trips_csv), "--output", str(spark_output), "--overwrite"),
                *("--master", args.master, "--summary-file", str(summary_file)),
            ],
            env,
        )
        summary = json.loads(summary_file.read_text())
        print(
            f"spark_score.py on {args.master}, end to end: {summary['rows']:,} rows in {spark_seconds:.1f}s; "
            f"Spark's session started in {summary['spark_start_seconds']:.1f}s, the job took "
            f"{summary['seconds'] - summary['spark_start_seconds']:.1f}s after it"
        )
        max_abs_diff = compare(batch_output, spark_output)
        if args.compare_scorers:
            compare_scorers(trips_csv, args.master, settings)

    result = {
        "rows": summary["rows"],
        "spark_rows_per_s": round(summary["rows"] / spark_seconds),
        "batch_rows_per_s": round(args.rows / batch_seconds),
        "spark_vs_batch": round(batch_seconds / spark_seconds, 3),
        "max_abs_diff": max_abs_diff,
    }
    met = {
        "spark_vs_batch": result["spark_vs_batch"] >= TARGETS["spark_vs_batch"],
        "max_abs_diff": result["max_abs_diff"] <= TARGETS["max_abs_diff"],
    }
    print(f"load average while it ran: {os.getloadavg()[0]:.1f} (1 min)")
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in met.items()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
