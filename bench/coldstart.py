"""Cold and warm start of the service, and the model download beside a plain boto3 download.

    python bench/coldstart.py [--repeats 3]

Starts, on loopback: moto's S3 server, an `mlflow server` (SQLite store, S3 artifacts) and trains a model
through it with `train.py`. Then measures, in one run, the time from launching Gunicorn to the first
successful POST /predict: with an empty model cache (registry + S3), with a warm cache, and with
MODEL_PATH pointing at the same files (no registry at all); and, beside them, `mlflow models serve` on the
same registered version (it downloads the version at every start) to its first answered /invocations. Then the
model store's download of the version (registry look-ups included) beside boto3 downloading the same objects.
Medians of --repeats. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import ModelStore
from bikeshare_membership.schema import EXAMPLE_TRIP as TRIP
from bikeshare_membership.storage import s3_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: real processes on free ports

from harness import clean_env, free_port, run_train, start, start_mlflow_server, start_moto, stop, write_aws_profile  # noqa: E402

MODEL = "bikeshare-coldstart"
# The example trip as `mlflow models serve` takes it: the model's signature columns, dataframe_split.
MLFLOW_BODY = {
    "dataframe_split": {
        "columns": ["trip_start_time", "trip_duration_seconds", "from_station_id", "to_station_id"],
        "data": [["2017-01-01T00:00:00", 223.0, 7051.0, 7089.0]],
    }
}


def seconds_to_first_answer(
    command: Callable[[int], list[str]], env: dict[str, str], path: str, body: Any, log_path: Path
) -> float:
    """Launch a server (`command` for a free port) and time it until POST `path` first answers 200."""
    port = free_port()
    started = time.monotonic()
    process = start(command(port), env, log_path)
    try:
        while time.monotonic() - started < 120:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log_path.read_text()[-2000:]}")
            try:
                if requests.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=5).status_code == 200:
                    return time.monotonic() - started
            except requests.ConnectionError:
                pass
            time.sleep(0.02)
        raise RuntimeError("no answer within 120 s")
    finally:
        stop(process)


def seconds_to_first_prediction(env: dict[str, str], log_path: Path) -> float:
    """This service under its Gunicorn configuration, to its first answered POST /predict."""

    def gunicorn(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            str(ROOT / "gunicorn.conf.py"),
            "--bind",
            f"127.0.0.1:{port}",
        ]

    return seconds_to_first_answer(gunicorn, env, "/predict", TRIP, log_path)


def seconds_to_first_mlflow_answer(env: dict[str, str], model_uri: str, log_path: Path) -> float:
    """`mlflow models serve` on `model_uri`, to its first answered POST /invocations (the same trip)."""

    def mlflow_serve(port: int) -> list[str]:
        serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
        return [*serve, "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local"]

    bin_dir = str(Path(sys.executable).parent)  # uvicorn must be on PATH for `mlflow models serve`
    serve_env = env | {"PATH": f"{bin_dir}:{env['PATH']}"}
    return seconds_to_first_answer(mlflow_serve, serve_env, "/invocations", MLFLOW_BODY, log_path)


def timed(action: Callable[[], object], repeats: int) -> float:
    durations = []
    for _ in range(repeats):
        started = time.monotonic()
        action()
        durations.append(time.monotonic() - started)
    return statistics.median(durations)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="coldstart-"))
    base_env = clean_env()
    profile = write_aws_profile(work)
    processes = []
    try:
        moto, s3_url = start_moto(work / "moto.log")
        processes.append(moto)
        env = {**base_env, **profile, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_DISABLE_TELEMETRY": "true"}
        os.environ.update(profile | {"MLFLOW_S3_ENDPOINT_URL": s3_url})  # this process's own S3 clients
        settings = Settings(fetch_timeout_seconds=30)
        s3_client(settings).create_bucket(Bucket="models")
        mlflow_server, tracking_uri = start_mlflow_server(
            work / "mlflow.db", "s3://models/mlflow", env, work / "mlflow.log"
        )
        processes.append(mlflow_server)
        env |= {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTERED_MODEL": MODEL, "MODEL_REFRESH_SECONDS": "0"}
        print("training a model through the tracking server ...", flush=True)
        run_train(env, work)

        cache = work / "cache"
        cold = []
        for attempt in range(args.repeats):
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(seconds_to_first_prediction(env | {"MODEL_CACHE_DIR": str(cache)}, work / f"cold{attempt}.log"))
        warm = [
            seconds_to_first_prediction(env | {"MODEL_CACHE_DIR": str(cache)}, work / "warm.log")
            for _ in range(args.repeats)
        ]
        version_dir = next(path for path in (cache / MODEL).iterdir() if path.name.isdigit())
        mlflow_serve = [
            seconds_to_first_mlflow_answer(env, f"models:/{MODEL}/{version_dir.name}", work / "mlflow-serve.log")
            for _ in range(args.repeats)
        ]
        local = [
            seconds_to_first_prediction(env | {"MODEL_PATH": str(version_dir)}, work / "local.log")
            for _ in range(args.repeats)
        ]

        store = ModelStore(
            Settings(tracking_uri=tracking_uri, registered_model=MODEL, model_cache_dir=str(work / "dl"))
        )
        version = store.production_version()

        def store_download_only() -> None:
            target = work / "dl" / MODEL / str(version.version)
            shutil.rmtree(target, ignore_errors=True)
            with store._lock():
                store._download(version, target)

        source = store.client.get_model_version_download_uri(MODEL, version.version)
        bucket, prefix = source[len("s3://") :].split("/", 1)
        client = s3_client(settings)
        keys = [entry["Key"] for entry in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]]

        def boto3_download() -> None:
            target = work / "boto3"
            shutil.rmtree(target, ignore_errors=True)
            for key in keys:
                path = target / key[len(prefix) + 1 :]
                path.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(path))

        store.load(version)  # warm the clients and the registry connection, as a long-lived service has them
        download_s = timed(store_download_only, max(args.repeats, 5))
        boto3_s = timed(boto3_download, max(args.repeats, 5))
        model_bytes = sum(path.stat().st_size for path in (work / "boto3").rglob("*") if path.is_file())
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "cold_start_s": round(statistics.median(cold), 3),
        "warm_start_s": round(statistics.median(warm), 3),
        "local_path_start_s": round(statistics.median(local), 3),
        "warm_vs_local": round(statistics.median(warm) / statistics.median(local), 3),
        "mlflow_serve_start_s": round(statistics.median(mlflow_serve), 3),
        "warm_vs_mlflow_serve": round(statistics.median(warm) / statistics.median(mlflow_serve), 3),
        "download_s": round(download_s, 4),
        "boto3_download_s": round(boto3_s, 4),
        "download_vs_boto3": round(download_s / boto3_s, 3),
    }
    print(f"model artifacts: {len(keys)} objects, {model_bytes:,} bytes")
    print(
        f"launch -> first /predict, median of {args.repeats}: cold (registry + S3) {result['cold_start_s']} s, "
        f"warm cache {result['warm_start_s']} s, local path {result['local_path_start_s']} s "
        f"(warm/local {result['warm_vs_local']}x); mlflow models serve {result['mlflow_serve_start_s']} s "
        f"(warm/mlflow {result['warm_vs_mlflow_serve']}x)"
    )
    print(
        f"download of the version: model store {result['download_s']} s (registry look-ups + S3 + manifest), "
        f"plain boto3 {result['boto3_download_s']} s ({result['download_vs_boto3']}x)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
