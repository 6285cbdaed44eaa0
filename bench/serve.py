"""Serving throughput and latency: this service beside `mlflow models serve` and an HTTP floor, in one run.

    python bench/serve.py [--duration 10] [--observed]   # needs wrk (apt-get install wrk)

On free loopback ports it starts: this service under its production Gunicorn configuration, `mlflow
models serve` on the same registered model version, and a no-op Flask app under the same Gunicorn
configuration (the floor: HTTP and Flask, no model). wrk, in its own process, drives each with the same
bounded load: single trips at 1, 8 and 32 connections, and at 8 lists: of 100 and 1,000 trips (the example trip
repeated) and of 100 distinct trips (`varied_trips`, as a dispatcher's last minute would be), for --duration
seconds each. It prints req/s, p50/p99 latency and errors for each, the
ratios, and the in-process cost per trip through the service's code path without HTTP: one trip, and lists
of the example trip repeated and of varied trips (distinct times, durations and stations). The last line is
one JSON object. With --observed a fourth server joins, side by side: the service with the prediction log
(PREDICTION_LOG, a temporary folder) and a shadow challenger (SHADOW_MODEL_ALIAS; the served version
registered again as `challenger`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from mlflow.tracking import MlflowClient

from bikeshare_membership import app as service_app
from bikeshare_membership import promotion
from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import LoadedModel, ModelStore
from bikeshare_membership.schema import EXAMPLE_TRIP as TRIP
from bikeshare_membership.schema import parse_request_trip, typed_trips
from bikeshare_membership.stations import station_index

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: real processes on free ports

from harness import clean_env, free_port, run_train, start, start_gunicorn, stop, wait_for_http  # noqa: E402

MODEL = "bikeshare-serve-bench"
# The same trip as `mlflow models serve` takes it: the model's signature columns, dataframe_split.
MLFLOW_ROW = ["2017-01-01T00:00:00", 223.0, 7051.0, 7089.0]
MLFLOW_COLUMNS = ["trip_start_time", "trip_duration_seconds", "from_station_id", "to_station_id"]
FLOOR_APP = "bench.noop_app:app"  # the HTTP floor: reads the body, answers a constant
# (kind, connections, trips): lists of the example trip repeated, and `varied100`, lists of distinct trips
SCENARIOS = [
    ("single", 1, 1),
    ("single", 8, 1),
    ("single", 32, 1),
    ("batch100", 8, 100),
    ("varied100", 8, 100),
    ("batch1000", 8, 1000),
]


@dataclass
class Result:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def body_for(server: str, kind: str, trips: int) -> bytes:
    """The request body of a scenario: the example trip, repeated `trips` times, or `varied_trips` for `varied`
    kinds; for `mlflow models serve`, the same trips as its signature's rows."""
    varied = kind.startswith("varied")
    records = varied_trips(trips) if varied else [TRIP] * trips
    if server == "mlflow":
        rows = [mlflow_row(record) for record in records] if varied else [MLFLOW_ROW] * trips
        return orjson.dumps({"dataframe_split": {"columns": MLFLOW_COLUMNS, "data": rows}})
    return orjson.dumps(TRIP if trips == 1 else records)


def mlflow_row(record: dict[str, Any]) -> list[Any]:
    trip = parse_request_trip(record)
    return [trip["trip_start_time"].isoformat(), *(float(trip[column]) for column in MLFLOW_COLUMNS[1:])]


def milliseconds(text: str) -> float:
    value, unit = found(r"^([\d.]+)(us|ms|s)$", text)
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def found(pattern: str, text: str) -> tuple[str, ...]:
    """The groups of `pattern`'s first match in wrk's output; an error showing both if there is none."""
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"wrk's output has no {pattern!r}:\n{text}")
    return match.groups()


def wrk_workspace(script: str, prefix: str) -> tuple[Path, dict[str, str]]:
    """For a script driving servers with wrk: exits if wrk is missing; else `bench_workspace`."""
    if shutil.which("wrk") is None:
        sys.exit(f"{script} needs wrk: apt-get install wrk")
    return bench_workspace(prefix)


def bench_workspace(prefix: str) -> tuple[Path, dict[str, str]]:
    """A new temporary folder and the environment of the processes a benchmark starts (train.py, servers): a SQLite
    registry in that folder, no registry checks and no telemetry."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    env = clean_env() | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "MODEL_REFRESH_SECONDS": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    return work, env


def run_wrk(url: str, body: bytes, connections: int, duration: int, work: Path) -> Result:
    script = work / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
    )
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Result(
        requests_per_s=float(found(r"Requests/sec:\s+([\d.]+)", output)[0]),
        p50_ms=milliseconds(found(r"\s50%\s+(\S+)", output)[0]),
        p99_ms=milliseconds(found(r"\s99%\s+(\S+)", output)[0]),
        errors=(sum(int(count) for count in socket_errors.groups()) if socket_errors else 0)
        + (int(non_2xx.group(1)) if non_2xx else 0),
    )


def varied_trips(count: int) -> list[dict[str, Any]]:
    """`count` distinct trips in the request's form: times, durations and stations drawn with a fixed seed."""
    rng = random.Random(2017)
    station_ids = sorted(station_index().coordinates)
    trips = []
    for number in range(count):
        start = datetime(2017, 1, 1) + timedelta(minutes=rng.randrange(365 * 24 * 60))
        duration = rng.randrange(60, 3600)
        stop = start + timedelta(seconds=duration)
        trips.append(
            {
                **TRIP,
                "trip_id": number,
                "trip_start_time": f"{start.month}/{start.day}/{start.year} {start.hour}:{start.minute:02d}",
                "trip_stop_time": f"{stop.month}/{stop.day}/{stop.year} {stop.hour}:{stop.minute:02d}",
                "trip_duration_seconds": duration,
                "from_station_id": rng.choice(station_ids),
                "to_station_id": rng.choice(station_ids),
            }
        )
    return trips


def in_process_microseconds(model: LoadedModel, body: Any, repeats: int) -> float:
    """One request's body through the service's code path (parse, validate, features, model, render), without
    HTTP: the median of `repeats` calls, in microseconds per trip."""
    raw = orjson.dumps(body)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        orjson.dumps(service_app.predictions(typed_trips(raw), model))  # as /predict reads a well-typed body
        timings.append(time.perf_counter() - started)
    trips = len(body) if isinstance(body, list) else 1
    return sorted(timings)[len(timings) // 2] * 1e6 / trips


def register_challenger(settings: Settings) -> None:
    """The Production version registered again, with the alias `challenger`: a shadow as costly as the model."""
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    production = ModelStore(settings).production_version()
    location = client.get_model_version_download_uri(MODEL, production.version)
    challenger = client.create_model_version(MODEL, location, production.run_id)
    client.set_registered_model_alias(MODEL, promotion.CHALLENGER_ALIAS, challenger.version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per scenario and server")
    parser.add_argument(
        "--observed", action="store_true", help="also the service with the prediction log and a shadow challenger"
    )
    args = parser.parse_args()
    work, env = wrk_workspace("bench/serve.py", "serve-bench-")
    settings = Settings(
        tracking_uri=env["MLFLOW_TRACKING_URI"], registered_model=MODEL, model_cache_dir=str(work / "cache")
    )
    env |= {"MLFLOW_REGISTERED_MODEL": MODEL, "MODEL_CACHE_DIR": settings.model_cache_dir}
    processes = []
    try:
        print("training the model to serve ...", flush=True)
        run_train(env, work)
        version = ModelStore(settings).production_version().version

        service, service_url = start_gunicorn(env, work / "service.log")
        processes.append(service)
        servers = {"service": f"{service_url}/predict"}
        if args.observed:
            register_challenger(settings)
            observing = {"PREDICTION_LOG": str(work / "prediction-log"), "SHADOW_MODEL_ALIAS": "challenger"}
            observed, observed_url = start_gunicorn(env | observing, work / "observed.log")
            processes.append(observed)
            servers["observed"] = f"{observed_url}/predict"
        floor, floor_url = start_gunicorn(env, work / "floor.log", app=FLOOR_APP)
        processes.append(floor)
        mlflow_port = free_port()
        mlflow_command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}/{version}"]
        mlflow_command += ["-h", "127.0.0.1", "-p", str(mlflow_port), "--env-manager", "local"]
        bin_dir = str(Path(sys.executable).parent)  # uvicorn must be on PATH for `mlflow models serve`
        mlflow_serve = start(mlflow_command, env | {"PATH": f"{bin_dir}:{env['PATH']}"}, work / "mlflow-serve.log")
        processes.append(mlflow_serve)
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        wait_for_http(f"{mlflow_url}/ping", mlflow_serve, timeout=120)

        servers |= {"mlflow": f"{mlflow_url}/invocations", "floor": f"{floor_url}/predict"}
        results: dict[tuple[str, str, int], Result] = {}
        print(f"{'server':8} {'load':10} {'clients':>7} {'req/s':>9} {'trips/s':>9} {'p50 ms':>8} {'p99 ms':>8} errors")
        for kind, connections, trips in SCENARIOS:
            for server, url in servers.items():
                result = run_wrk(url, body_for(server, kind, trips), connections, args.duration, work)
                results[server, kind, connections] = result
                rates = f"{result.requests_per_s:>9.0f} {result.requests_per_s * trips:>9.0f}"
                latency = f"{result.p50_ms:>8.2f} {result.p99_ms:>8.2f}"
                print(f"{server:8} {kind:10} {connections:>7} {rates} {latency} {result.errors}", flush=True)
        model = ModelStore(settings).load_production()
        in_process_us = {
            "single": in_process_microseconds(model, TRIP, 3000),
            "list100_same": in_process_microseconds(model, [TRIP] * 100, 300),
            "list100_varied": in_process_microseconds(model, varied_trips(100), 300),
            "list1000_same": in_process_microseconds(model, [TRIP] * 1000, 30),
            "list1000_varied": in_process_microseconds(model, varied_trips(1000), 30),
        }
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)

    service_c8, mlflow_c8 = results["service", "single", 8], results["mlflow", "single", 8]
    service_c1, floor_c1 = results["service", "single", 1], results["floor", "single", 1]
    summary = {
        "single_c8_ratio_vs_mlflow": round(service_c8.requests_per_s / mlflow_c8.requests_per_s, 1),
        "single_c1_p50_ms": round(service_c1.p50_ms, 3),
        "single_c1_p50_vs_floor": round(service_c1.p50_ms / floor_c1.p50_ms, 2),
        "batch100_c8_trips_per_s": round(results["service", "batch100", 8].requests_per_s * 100),
        "varied100_c8_trips_per_s": round(results["service", "varied100", 8].requests_per_s * 100),
        "batch1000_c8_trips_per_s": round(results["service", "batch1000", 8].requests_per_s * 1000),
        "errors": sum(result.errors for (server, _, _), result in results.items() if server in ("service", "observed")),
        "in_process_us_per_trip": {name: round(value, 1) for name, value in in_process_us.items()},
    }
    if args.observed:
        observed_c1 = results["observed", "single", 1]
        summary["observed_single_c1_p50_vs_floor"] = round(observed_c1.p50_ms / floor_c1.p50_ms, 2)
        summary["observed_single_c8_vs_service"] = round(
            results["observed", "single", 8].requests_per_s / service_c8.requests_per_s, 2
        )
    costs = ", ".join(f"{name} {value:.1f}" for name, value in in_process_us.items())
    print(f"in process, us per trip through the service's code path without HTTP: {costs}")
    print(
        f"single trip, 8 clients: {summary['single_c8_ratio_vs_mlflow']}x mlflow models serve; "
        f"1 client p50 {summary['single_c1_p50_ms']} ms = {summary['single_c1_p50_vs_floor']}x the no-op floor; "
        f"lists at 8 clients: {summary['batch100_c8_trips_per_s']} trips/s (100), "
        f"{summary['varied100_c8_trips_per_s']} trips/s (100 distinct), "
        f"{summary['batch1000_c8_trips_per_s']} trips/s (1,000)"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
