"""Benchmark `train.py` at full-year scale: a year of trips as large as the City publishes, gate included.

    python bench/train.py [--rows 5700000] [--keep DIR]

It writes one CSV in the City's 2019-2024 layout for 2024. Each month gets a share of `--rows` in proportion
to 2017's monthly trip totals (41k in January to 226k in September, counted from the City's files), drawn
from the bundled real trips of the nearest season (January and February for November to February, March for
March and April, May for May to October), each moved to the same weekday and time of day, give or take five
minutes, in one of the month's first three weeks from its first Monday, and numbered anew. Then it runs the
whole of `python train.py FILE` on it (reading, the time-ordered selection and test, the refit, logging,
registration and the gate) in a fresh SQLite registry, and measures the wall time and the peak resident
memory of that process. The last line is one JSON object: rows, train_s, peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: real processes on free ports

from generated_trips import bundled_rows, moved  # noqa: E402
from harness import clean_env  # noqa: E402

YEAR = 2024
# 2017's trips per month, counted from the City's files: the shape of a year of Toronto riding.
MONTHLY_TRIPS_2017 = (
    *(41_314, 41_626, 49_183, 79_026, 104_725, 149_602),
    *(213_604, 223_477, 226_355, 185_476, 118_712, 59_115),
)
# The bundled month (2023) each month of the generated year draws its trips from.
SOURCE_MONTH = {1: 1, 2: 2, 3: 3, 4: 3, 5: 5, 6: 5, 7: 5, 8: 5, 9: 5, 10: 5, 11: 1, 12: 2}
FIRST_TRIP_ID = 30_000_000
TARGETS = {"rows": 5_000_000, "train_s": 20 * 60, "peak_rss_mb": 8 * 1024}


def generate_year(path: Path, rows: int, seed: int = YEAR) -> int:
    """Write a year of trips (see the module docstring); returns how many."""
    rng = np.random.default_rng(seed)
    real = bundled_rows()
    real_month = pd.to_datetime(real["Start Time"], format="%m/%d/%Y %H:%M").dt.month.to_numpy()
    shares = np.array(MONTHLY_TRIPS_2017) / sum(MONTHLY_TRIPS_2017)
    written, header = 0, True
    for month, share in enumerate(shares, start=1):
        first = pd.Timestamp(YEAR, month, 1)
        first_monday = first + pd.Timedelta(days=(7 - first.day_of_week) % 7)
        trips = moved(real[real_month == SOURCE_MONTH[month]], round(rows * share), first_monday, 3, rng)
        trips["Trip Id"] = (np.arange(len(trips)) + FIRST_TRIP_ID + written).astype(str)
        trips.to_csv(path, index=False, header=header, mode="w" if header else "a")
        written, header = written + len(trips), False
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_700_000)
    parser.add_argument("--keep", type=Path, help="write the file and the registry here and keep them")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        trips_csv = folder / f"bike-share-ridership-{YEAR}-generated.csv"
        started = time.perf_counter()
        rows = generate_year(trips_csv, args.rows)
        size_mb = trips_csv.stat().st_size / 2**20
        print(f"generated {rows:,} trips ({size_mb:,.0f} MiB) in {time.perf_counter() - started:.0f}s: {trips_csv}")

        env = clean_env() | {
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "MODEL_CACHE_DIR": str(folder / "model-cache"),
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), str(trips_csv)], cwd=folder, env=env)
        train_s = time.perf_counter() - started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux
        if result.returncode not in (0, 1):  # 1: the gate refused, which is still a whole run
            print(f"train.py failed with exit status {result.returncode}", file=sys.stderr)
            return result.returncode

    measured = {"rows": rows, "train_s": round(train_s, 1), "peak_rss_mb": round(peak_rss_mb)}
    met = {
        "rows": rows >= TARGETS["rows"],
        "train_s": train_s <= TARGETS["train_s"],
        "peak_rss_mb": peak_rss_mb <= TARGETS["peak_rss_mb"],
    }
    print(f"on {os.cpu_count()} cores: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in met.items()))
    print(json.dumps(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
