"""Benchmark batch scoring end to end on a million generated trips, beside the bare model.

    python bench/batch.py [--rows 1000000] [--keep DIR]

It needs a Production model in the configured registry (`python train.py` first). It writes a CSV in the
City's 2019-2024 layout by sampling the bundled real trips, moving each to the same weekday and time of day
(give or take five minutes) in a random week of June 2024 and numbering the trips anew. It scores that file
with `python batch.py score ... --status-file` in a separate process, exactly as the service runs a job (read,
parse, features, model, write), and takes the rows/s and the peak memory the job reports. Then it times the
bare model, `LoadedModel.member_probability`, on the same trips parsed in memory, with OpenMP's default
threads and with one (the faster counts). The last line is one JSON object: rows, rows_per_s, peak_rss_mb,
bare_model_rows_per_s, ratio_to_bare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from bikeshare_membership import city_files
from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import LoadedModel, load_production_model

ROOT = Path(__file__).resolve().parent.parent

from generated_trips import bundled_rows, moved  # noqa: E402

JUNE_2024_FIRST_MONDAY = pd.Timestamp("2024-06-03")
FIRST_TRIP_ID = 27_000_000
TARGETS = {"rows_per_s": 150_000, "peak_rss_mb": 1024, "ratio_to_bare": 0.5}


def generate_trips(path: Path, rows: int, seed: int = 2024) -> None:
    """`rows` trips in the 2019-2024 layout, sampled from the bundled real ones (see the module docstring)."""
    rng = np.random.default_rng(seed)
    trips = moved(bundled_rows(), rows, JUNE_2024_FIRST_MONDAY, 4, rng)
    trips["Trip Id"] = (np.arange(rows) + FIRST_TRIP_ID).astype(str)
    trips.to_csv(path, index=False, encoding="utf-8-sig")


def score_end_to_end(trips_csv: Path, folder: Path) -> dict:
    """`batch.py score` as a job runs it: the job's final status, with its summary and peak memory.

    The job measures its own peak (VmHWM): the kernel's rusage for a child would count this process's
    memory at the fork too.
    """
    status = folder / "job.json"
    status.unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / "batch.py"), "score", str(trips_csv), "--output", str(folder / "scores.csv")]
    subprocess.run([*command, "--status-file", str(status)], check=True)
    return json.loads(status.read_text())


def bare_model_rows_per_s(model: LoadedModel, trips: pd.DataFrame, threads: int | None) -> float:
    """`member_probability` on every trip at once, with OpenMP's threads as they are (None) or limited."""
    with threadpool_limits(limits=threads, user_api="openmp"):
        model.member_probability(trips.head(2000))  # the first call starts thread pools: not what is measured
        started = time.perf_counter()
        model.member_probability(trips)
        seconds = time.perf_counter() - started
    print(f"bare model (member_probability, {threads or 'default'} OpenMP threads): {len(trips) / seconds:,.0f} rows/s")
    return len(trips) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the files here and keep them (default: a temporary folder)")
    args = parser.parse_args(argv)
    model = load_production_model(Settings.from_env())

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        trips_csv = folder / "bike-share-ridership-2024-06-generated.csv"
        started = time.perf_counter()
        generate_trips(trips_csv, args.rows)
        seconds, size_mb = time.perf_counter() - started, trips_csv.stat().st_size / 2**20
        print(f"generated {args.rows:,} trips ({size_mb:,.0f} MiB) in {seconds:.1f}s: {trips_csv}")

        job = score_end_to_end(trips_csv, folder)
        summary, peak_rss_mb = job["summary"], job["peak_rss_mb"]
        print(
            f"end to end (batch.py score: read, parse, features, model, write): {summary['rows']:,} rows in "
            f"{summary['seconds']:.2f}s = {summary['rows_per_s']:,.0f} rows/s, peak RSS {peak_rss_mb:,.0f} MiB"
        )

        trips = city_files.read_trips(trips_csv).trips
    bare_rows_per_s = max(bare_model_rows_per_s(model, trips, threads) for threads in (None, 1))

    result = {
        "rows": summary["rows"],
        "rows_per_s": round(summary["rows_per_s"]),
        "peak_rss_mb": round(peak_rss_mb),
        "bare_model_rows_per_s": round(bare_rows_per_s),
        "ratio_to_bare": round(summary["rows_per_s"] / bare_rows_per_s, 3),
    }
    met = {
        "rows_per_s": result["rows_per_s"] >= TARGETS["rows_per_s"],
        "peak_rss_mb": result["peak_rss_mb"] <= TARGETS["peak_rss_mb"],
        "ratio_to_bare": result["ratio_to_bare"] >= TARGETS["ratio_to_bare"],
    }
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in met.items()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
