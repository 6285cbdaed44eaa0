"""A single trip's steps in process, warm and with the CPU's caches emptied before each call.

    python bench/cold_steps.py [--repeats 300]

In the server each request finds part of what it touches gone from the caches: the client, the kernel and the
other worker ran in between. A warm loop hides that, so this measures the two ends. It trains the bench's model
(train.py, a temporary SQLite registry), loads it as the service does, and times each step of POST /predict's
path for one trip: in a loop (warm), and each call after writing over a buffer twice the size of the CPU's
last-level cache (cold: the step's code and data come from memory). Medians in microseconds; a step's inputs are
the previous steps' outputs, made beforehand. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bikeshare_membership import app as service_app
from bikeshare_membership.config import Settings
from bikeshare_membership.features import SCALAR_MATH, trip_features
from bikeshare_membership.model_store import ModelStore
from bikeshare_membership.schema import (
    EXAMPLE_TRIP,
    MODEL_INPUT_COLUMNS,
    ONE_SECOND,
    UNIX_EPOCH,
    RequestTrips,
    parse_request_trip,
    typed_trips,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: train.py as a user runs it

from harness import run_train  # noqa: E402
from serve import bench_workspace  # noqa: E402

MODEL = "bikeshare-cold-bench"
FALLBACK_CACHE_BYTES = 64 << 20


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux lists for core 0, or 64 MiB where it lists none."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=FALLBACK_CACHE_BYTES)


def steps(settings: Settings) -> dict[str, Callable[[], Any]]:
    """Each step of one trip's path, as a call on ready inputs: POST /predict's order, the model's parts indented."""
    model = ModelStore(settings).load_production()
    fast = model.fast
    if fast is None:
        sys.exit("the model has no fast form; see docs/architecture.md")
    body = orjson.dumps(EXAMPLE_TRIP)
    typed = typed_trips(body)
    trips = RequestTrips.one(parse_request_trip(typed))
    start, duration, from_id, to_id = (trips.columns[column][0] for column in MODEL_INPUT_COLUMNS)
    seconds = (start - UNIX_EPOCH) // ONE_SECOND
    ends = fast.places[from_id], fast.places[to_id]
    features = trip_features(seconds, duration, from_id, to_id, *ends, fast.holidays, SCALAR_MATH)
    row = [float(value) for value in features]
    encoded = [encoding.encode(row[position]) if encoding else row[position] for position, encoding in fast.columns]
    answer = service_app.predictions(typed, model)
    return {
        "decoding the body": lambda: typed_trips(body),
        "validation": lambda: RequestTrips.one(parse_request_trip(typed)),
        "the model": lambda: model.request_probabilities(trips),
        "  features": lambda: trip_features(seconds, duration, from_id, to_id, *ends, fast.holidays, SCALAR_MATH),
        "  encodings and trees": lambda: fast.row_score(row),
        "  trees": lambda: fast.tables.row_score(encoded),
        "rendering the answer": lambda: orjson.dumps(answer),
        "the whole path": lambda: orjson.dumps(service_app.predictions(typed_trips(body), model)),
    }


def microseconds(call: Callable[[], Any], before: Callable[[], Any] | None, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter_ns()
        call()
        timings.append(time.perf_counter_ns() - started)
    return statistics.median(timings) / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300, help="cold calls per step (ten times as many warm)")
    args = parser.parse_args()
    work, env = bench_workspace("cold-steps-")
    try:
        settings = Settings(
            tracking_uri=env["MLFLOW_TRACKING_URI"], registered_model=MODEL, model_cache_dir=str(work / "cache")
        )
        print("training the model to load ...", flush=True)
        run_train(env | {"MLFLOW_REGISTERED_MODEL": MODEL}, work)
        calls = steps(settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Every cache line of twice the last-level cache written: what the step touches is then in memory only.
    evicting = np.zeros(2 * last_level_cache_bytes() // 8)

    def empty_the_caches() -> None:
        evicting[::8] += 1.0

    results = {}
    print(f"{'step':24} {'warm us':>8} {'cold us':>8}")
    for name, call in calls.items():
        warm = microseconds(call, None, 10 * args.repeats)
        cold = microseconds(call, empty_the_caches, args.repeats)
        results[name.strip()] = {"warm_us": round(warm, 1), "cold_us": round(cold, 1)}
        print(f"{name:24} {warm:8.1f} {cold:8.1f}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
