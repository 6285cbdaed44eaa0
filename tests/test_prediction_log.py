"""The prediction log (PREDICTION_LOG): every answered trip as a Parquet row, through real Gunicorn, across
SIGTERM, max_requests recycling, a reload and SIGKILL, and with its destination failing (a local folder, moto's S3
stopped)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as ds
import pytest
import requests
from conftest import S3Endpoint, service_env
from harness import start_gunicorn, start_moto, stop
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from test_batch import run_batch

from bikeshare_membership import app as service_app
from bikeshare_membership import city_files, prediction_log, stations
from bikeshare_membership.config import Settings
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import LoadedModel
from bikeshare_membership.schema import EXAMPLE_TRIP as TRIP

BUNDLED_MAY = stations.DATA_DIR / "bikeshare-ridership-2023-05-sample.csv.gz"
STATIONS = [7000 + index for index in range(1, 80)]


def trip(index: int) -> dict[str, Any]:
    """A different trip per index (stations, duration, hour), so the answers' probabilities differ."""
    hour = index % 24
    return {
        "trip_id": index,
        "trip_start_time": f"2023-05-{1 + index % 28:02d}T{hour:02d}:05:00",
        "trip_stop_time": f"2023-05-{1 + index % 28:02d}T{hour:02d}:45:00",
        "trip_duration_seconds": 120 + (index * 37) % 2300,
        "from_station_id": STATIONS[index % len(STATIONS)],
        "to_station_id": STATIONS[(index * 7) % len(STATIONS)],
    }


def read_log(location: Path) -> pd.DataFrame:
    """The whole log, as any reader would take it: the folder as one Hive-partitioned dataset."""
    # Partial files being written are hidden (".partial-..."), and readers skip them: a folder holding only one
    # is an empty log.
    if not location.exists() or not any(not part.name.startswith(".") for part in location.rglob("*.parquet")):
        return pd.DataFrame(columns=prediction_log.SCHEMA.names)
    return ds.dataset(location, format="parquet", partitioning="hive").to_table().to_pandas()


def answers_of(url: str, bodies: list[Any], threads: int = 4) -> list[tuple[str, dict[str, Any], float]]:
    """POST each body on its own connection: (request id, answer, seconds) for each."""

    def post(body: Any) -> tuple[str, dict[str, Any], float]:
        started = time.perf_counter()
        response = requests.post(f"{url}/predict", json=body, headers={"Connection": "close"}, timeout=30)
        seconds = time.perf_counter() - started
        assert response.status_code == 200, response.text
        return response.headers["X-Request-ID"], response.json(), seconds

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(post, bodies))


def answered_trips(answers: list[tuple[str, dict[str, Any], float]]) -> pd.DataFrame:
    rows = [
        {"request_id": request_id, "trip_id": str(item["trip_id"]), "answer_proba": item["proba"], "version": version}
        for request_id, answer, _ in answers
        for version in [answer["model"]["version"]]
        for item in answer.get("predictions", [answer])
    ]
    return pd.DataFrame(rows)


def assert_logged_exactly(logged: pd.DataFrame, answers: list[tuple[str, dict[str, Any], float]]) -> None:
    expected = answered_trips(answers)
    assert len(logged) == len(expected)
    joined = expected.merge(logged, on=["request_id", "trip_id"], how="left", validate="one_to_one")
    assert joined["proba"].notna().all()
    assert (joined["proba"] == joined["answer_proba"]).all()  # the same float, not merely close
    assert (joined["model_version"] == joined["version"]).all()


def dropped(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    samples = {
        sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
    }
    return samples.get("bikeshare_prediction_log_dropped_total", 0.0)


def graceful_stop(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 0


# --- In process ---------------------------------------------------------------------------------------


def test_a_row_per_answered_trip_with_the_trip_as_validated_and_no_header(model: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / "log"
    app = service_app.create_app(Settings(prediction_log=str(folder)), ModelHolder(None, model))
    client = app.test_client()
    no_station = {**TRIP, "trip_id": None, "from_station_id": None, "from_station_name": "no such station"}
    single = client.post("/predict", json=TRIP, headers={"X-Request-ID": "one", "Authorization": "Bearer secret"})
    listed = client.post("/predict", json=[{**TRIP, "trip_id": "a-7"}, no_station], headers={"X-Request-ID": "two"})
    refused = client.post("/predict", json={"trip_id": 1})
    assert (single.status_code, listed.status_code, refused.status_code) == (200, 200, 400)
    for response in (single, listed, refused):
        response.close()  # a request is recorded when its response is closed, as servers do
    app.extensions["prediction_log"].close()

    (partition,) = folder.iterdir()
    assert partition.name == f"date={time.strftime('%Y-%m-%d', time.gmtime())}"
    (part,) = partition.iterdir()
    assert part.name.startswith(f"part-{os.getpid()}-000001-") and part.suffix == ".parquet"
    logged = pd.read_parquet(folder)  # pandas reads the partitioned folder as one table
    assert list(logged["request_id"]) == ["one", "two", "two"]
    assert list(logged["trip_id"][:2]) == [str(TRIP["trip_id"]), "a-7"] and pd.isna(logged["trip_id"][2])
    answered = [single.get_json(), *listed.get_json()["predictions"]]
    assert list(logged["proba"]) == [answer["proba"] for answer in answered]
    assert logged["member_probability"].mul(100).round(2).tolist() == logged["proba"].tolist()
    assert list(logged["membership"]) == [answer["membership"] for answer in answered]
    first = logged.iloc[0]
    assert first["trip_start_time"] == pd.Timestamp("2017-01-01 00:00:00")
    assert first["from_station_id"] == 7051.0 and first["to_station_name"] == TRIP["to_station_name"]
    assert first["user_type"] == "Member" and first["model_version"] == model.version
    assert pd.isna(logged.iloc[2]["from_station_id"]) and logged.iloc[2]["from_station_name"] == "no such station"
    assert set(logged.columns) == {*prediction_log.SCHEMA.names, "date"}
    text = part.read_bytes()
    assert b"secret" not in text and b"127.0.0.1" not in text


# --- Through Gunicorn ---------------------------------------------------------------------------------


@pytest.fixture
def log_folder(tmp_path: Path) -> Path:
    return tmp_path / "prediction-log"


def start_logging_service(settings: Settings, log_folder: Path | str, tmp_path: Path, **env: str) -> tuple[Any, str]:
    environment = service_env(settings, PREDICTION_LOG=str(log_folder), MODEL_REFRESH_SECONDS="0", **env)
    return start_gunicorn(environment, tmp_path / "gunicorn.log")


def test_a_thousand_answers_are_a_thousand_rows_after_sigterm(
    settings: Settings, trained: Any, log_folder: Path, tmp_path: Path
) -> None:
    """Rows are held (files roll every 60 s) until SIGTERM: the exiting workers write them."""
    process, url = start_logging_service(settings, log_folder, tmp_path)
    try:
        singles = [trip(index) for index in range(600)]
        lists = [[trip(600 + 100 * batch + index) for index in range(100)] for batch in range(4)]
        answers = answers_of(url, [*singles, *lists])
        assert read_log(log_folder).empty  # nothing due yet: the files roll every 60 s
        graceful_stop(process)
    finally:
        stop(process)
    logged = read_log(log_folder)
    assert_logged_exactly(logged, answers)
    assert logged["trip_id"].nunique() == 1000


def test_rows_survive_max_requests_recycling(
    settings: Settings, trained: Any, log_folder: Path, tmp_path: Path
) -> None:
    """A worker recycled after max_requests writes its rows as it exits; none is lost or written twice."""
    process, url = start_logging_service(
        settings, log_folder, tmp_path, GUNICORN_CMD_ARGS="--max-requests 150 --max-requests-jitter 0"
    )
    try:
        answers = answers_of(url, [trip(index) for index in range(1000)])
        time.sleep(2)  # a worker recycled by the last requests is still exiting
        before = read_log(log_folder)
        written_by = {int(part.name.split("-")[1]) for part in log_folder.rglob("*.parquet")}
        lines = [json.loads(line) for line in (tmp_path / "gunicorn.log").read_text().splitlines() if line.strip()]
        answered_by = {line["request_id"]: line["pid"] for line in lines if line.get("endpoint") == "/predict"}
        graceful_stop(process)
    finally:
        stop(process)
    # Before SIGTERM, only the recycled workers have written: each wrote exactly the trips it answered.
    assert len(written_by) >= 4, written_by  # 1,000 requests, 150 per worker: at least 4 recycled (2 workers)
    assert sorted(before["request_id"]) == sorted(rid for rid, pid in answered_by.items() if pid in written_by)
    assert_logged_exactly(read_log(log_folder), answers)


def booted_workers(log: Path) -> set[int]:
    """The pids of the workers Gunicorn has booted, from its log (each worker logs its own boot)."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {line["pid"] for line in lines if str(line.get("message", "")).startswith("Booting worker")}


def wait_until(condition: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_rows_survive_a_reload(settings: Settings, trained: Any, log_folder: Path, tmp_path: Path) -> None:
    """SIGHUP: Gunicorn boots new workers and stops the old ones gracefully; the old ones write what they hold as
    they exit, the new ones log the later answers, and no row is lost or written twice."""
    process, url = start_logging_service(settings, log_folder, tmp_path)
    log = tmp_path / "gunicorn.log"
    try:
        before = answers_of(url, [trip(index) for index in range(300)])
        old_workers = booted_workers(log)
        os.kill(process.pid, signal.SIGHUP)
        wait_until(lambda: len(booted_workers(log) - old_workers) >= 2 and not any(map(alive, old_workers)))
        written_at_reload = wait_for_rows(lambda: read_log(log_folder), 300)  # files roll every 60 s: nothing else
        after = answers_of(url, [trip(300 + index) for index in range(300)])
        graceful_stop(process)
    finally:
        stop(process)
    assert sorted(written_at_reload["request_id"]) == sorted(request_id for request_id, *_ in before)
    assert_logged_exactly(read_log(log_folder), before + after)


def test_a_killed_worker_loses_at_most_what_it_held(
    settings: Settings, trained: Any, log_folder: Path, tmp_path: Path
) -> None:
    """SIGKILL loses only the rows a worker held: with files rolled every second, every trip answered a few seconds
    before the kill is in the log (the bound is PREDICTION_LOG_ROLL_SECONDS and the writer's tick; the margin here
    is for a loaded machine), and every row logged is an answer, once, with its proba."""
    process, url = start_logging_service(settings, log_folder, tmp_path, PREDICTION_LOG_ROLL_SECONDS="1")
    log = tmp_path / "gunicorn.log"
    answered: list[tuple[str, dict[str, Any], float]] = []
    answered_at: dict[str, float] = {}
    try:
        index, started = 0, time.monotonic()
        while time.monotonic() - started < 6:
            (answer,) = answers_of(url, [trip(index)], threads=1)
            answered.append(answer)
            answered_at[answer[0]] = time.monotonic()
            index += 1
        workers = booted_workers(log)
        killed_at = time.monotonic()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(booted_workers(log) - workers) >= 2)
        graceful_stop(process)
    finally:
        stop(process)
    logged = read_log(log_folder)
    expected = answered_trips(answered)
    joined = logged.merge(expected, on=["request_id", "trip_id"], how="left", validate="one_to_one")
    assert joined["answer_proba"].notna().all() and (joined["proba"] == joined["answer_proba"]).all()
    lost = set(expected["request_id"]) - set(logged["request_id"])
    assert all(killed_at - answered_at[request_id] < 3 for request_id in lost), "rows older than the roll were lost"
    assert len(logged) >= len(expected) / 3  # most of 6 s of answers were written before the kill


def unwritable(folder: Path) -> None:
    """Make `folder` unwritable for this service: read-only, or (root ignores modes) a file in its place."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def writable(folder: Path) -> None:
    if folder.is_file():
        folder.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)


def wait_for_rows(read: Any, count: float, timeout: float = 40) -> pd.DataFrame:
    deadline = time.monotonic() + timeout
    while len(rows := read()) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return rows


def median_seconds(answers: list[tuple[str, dict[str, Any], float]]) -> float:
    return statistics.median(seconds for *_, seconds in answers)


def test_an_unwritable_folder_drops_and_counts_never_slows_and_writing_resumes(
    settings: Settings, trained: Any, log_folder: Path, tmp_path: Path
) -> None:
    process, url = start_logging_service(
        settings, log_folder, tmp_path, PREDICTION_LOG_ROLL_SECONDS="0.5", PREDICTION_LOG_MAX_PENDING="100"
    )
    try:
        # No more trips than a worker may hold, so that none is dropped before the outage.
        healthy = answers_of(url, [trip(index) for index in range(100)], threads=1)
        assert len(wait_for_rows(lambda: read_log(log_folder), 100)) == 100
        unwritable(log_folder)
        failing = answers_of(url, [trip(1000 + index) for index in range(500)], threads=1)
        time.sleep(2 * prediction_log.FLUSH_SECONDS)  # the records of the last requests reach the log's queue
        lost = dropped(url)
        assert 500 - 2 * 100 <= lost < 500  # each of the 2 workers holds at most 100 trips
        assert median_seconds(failing) <= 2 * median_seconds(healthy) + 0.005
        writable(log_folder)
        logged = wait_for_rows(lambda: since_outage(read_log(log_folder)), 500 - lost)
        assert len(logged) == 500 - lost  # the held trips, written once the folder was back
        assert set(logged["trip_id"].astype(int)) <= set(range(1000, 1500))
        after = answers_of(url, [trip(2000 + index) for index in range(50)], threads=1)
        graceful_stop(process)
    finally:
        stop(process)
    logged = since_outage(read_log(log_folder))
    assert len(logged) == 500 - lost + 50 and dropped_rows_of(after, logged) == 0


def since_outage(logged: pd.DataFrame) -> pd.DataFrame:
    """The rows of the trips sent once the destination failed (ids from 1000), not those written before."""
    return logged[logged["trip_id"].astype(int) >= 1000]


def dropped_rows_of(answers: list[tuple[str, dict[str, Any], float]], logged: pd.DataFrame) -> int:
    return len(set(answered_trips(answers)["request_id"]) - set(logged["request_id"]))


@pytest.fixture
def own_s3(aws_profile: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A moto S3 of this test's own, which it may stop and start again (on the same port, empty)."""
    process, endpoint = start_moto(tmp_path / "moto.log")
    state: dict[str, Any] = {
        "process": process,
        "url": endpoint,
        "env": {**aws_profile, "MLFLOW_S3_ENDPOINT_URL": endpoint},
    }
    try:
        yield state
    finally:
        stop(state["process"])


def s3_log(own_s3: dict[str, Any], bucket: str, prefix: str) -> Any:
    client = S3Endpoint(own_s3["url"], bucket, own_s3["env"]).client()

    def read() -> pd.DataFrame:
        frames = []
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in (item for page in pages for item in page.get("Contents", [])):
            assert "/date=" in item["Key"] and item["Key"].endswith(".parquet")
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            frames.append(pd.read_parquet(io.BytesIO(body)))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=prediction_log.SCHEMA.names)

    return client, read


def test_an_s3_outage_drops_and_counts_never_slows_and_writing_resumes(
    settings: Settings, trained: Any, own_s3: dict[str, Any], tmp_path: Path
) -> None:
    bucket, prefix = "prediction-log", "live/"
    client, read = s3_log(own_s3, bucket, prefix)
    client.create_bucket(Bucket=bucket)
    environment = service_env(
        settings,
        PREDICTION_LOG=f"s3://{bucket}/{prefix}",
        MODEL_REFRESH_SECONDS="0",
        PREDICTION_LOG_ROLL_SECONDS="0.5",
        PREDICTION_LOG_MAX_PENDING="100",
        MODEL_FETCH_TIMEOUT="2",
        **own_s3["env"],
    )
    process, url = start_gunicorn(environment, tmp_path / "gunicorn.log")
    try:
        # No more trips than a worker may hold, so that none is dropped before the outage.
        healthy = answers_of(url, [trip(index) for index in range(100)], threads=1)
        assert len(wait_for_rows(read, 100)) == 100
        stop(own_s3["process"])  # the outage
        failing = answers_of(url, [trip(1000 + index) for index in range(500)], threads=1)
        time.sleep(2 * prediction_log.FLUSH_SECONDS)  # the records of the last requests reach the log's queue
        lost = dropped(url)
        assert 500 - 2 * 100 <= lost < 500
        assert median_seconds(failing) <= 2 * median_seconds(healthy) + 0.005
        port = int(own_s3["url"].rsplit(":", 1)[1])
        own_s3["process"], _ = start_moto(tmp_path / "moto-again.log", port)  # back, empty
        client.create_bucket(Bucket=bucket)
        logged = wait_for_rows(read, 500 - lost)
        assert len(logged) == 500 - lost
        assert set(logged["trip_id"].astype(int)) <= set(range(1000, 1500))
        graceful_stop(process)
    finally:
        stop(process)
    assert len(read()) == 500 - lost


# --- batch.py evaluate --predictions --------------------------------------------------------------------


def request_trip(row: Any) -> dict[str, Any]:
    """A parsed City trip as a client would send it (no label: live traffic has none)."""

    def station(value: float) -> int | None:
        return None if pd.isna(value) else int(value)

    return {
        "trip_id": row.trip_id,
        "trip_start_time": row.trip_start_time.isoformat(),
        "trip_stop_time": row.trip_stop_time.isoformat(),
        "trip_duration_seconds": row.trip_duration_seconds,
        "from_station_id": station(row.from_station_id),
        "from_station_name": None if pd.isna(row.from_station_name) else row.from_station_name,
        "to_station_id": station(row.to_station_id),
        "to_station_name": None if pd.isna(row.to_station_name) else row.to_station_name,
    }


def latest_run_metrics(settings: Settings) -> dict[str, Any]:
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(f"{settings.experiment_name}-monitoring")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return {**run.data.metrics, **{f"param:{key}": value for key, value in run.data.params.items()}}


def test_evaluate_on_the_log_gives_the_metrics_evaluate_gives_on_the_same_trips(
    settings: Settings, trained: Any, registry_dir: Path, log_folder: Path, tmp_path: Path
) -> None:
    """2,000 trips of a labelled month answered through Gunicorn (and 30 the file does not have); the file's
    last 50 trips never asked. Joined on trip_id, the log scores as `batch.py evaluate` scores the 2,000."""
    with gzip.open(BUNDLED_MAY, "rt") as source:
        lines = [next(source) for _ in range(2051)]
    labelled, asked = tmp_path / "may-labelled.csv", tmp_path / "may-asked.csv"
    labelled.write_text("".join(lines))
    asked.write_text("".join(lines[:-50]))
    trips = [request_trip(row) for row in city_files.read_trips(asked).trips.itertuples()]
    strangers = [{**trip(index), "trip_id": f"not-in-the-file-{index}"} for index in range(30)]
    bodies = [trips[start : start + 100] for start in range(0, len(trips), 100)] + strangers

    process, url = start_logging_service(settings, log_folder, tmp_path)
    try:
        answers = answers_of(url, bodies)
        graceful_stop(process)
    finally:
        stop(process)
    assert_logged_exactly(read_log(log_folder), answers)

    live = run_batch(settings, registry_dir, "evaluate", "--predictions", str(log_folder), str(labelled))
    assert live.returncode == 0, live.stderr[-3000:]
    assert f"{len(trips) + 30:,} answers, 30 found no label, 50 labelled trips had no answer" in live.stdout
    from_log = latest_run_metrics(settings)
    offline = run_batch(settings, registry_dir, "evaluate", str(asked))
    assert offline.returncode == 0, offline.stderr[-3000:]
    from_file = latest_run_metrics(settings)

    assert from_log["labelled_rows"] == from_file["labelled_rows"] == len(trips)
    assert (from_log["answers_without_label"], from_log["labels_without_answer"]) == (30, 50)
    compared = [name for name in from_file if name.startswith(("eval_", "member_share", "mean_member", "psi_"))]
    assert {"eval_roc_auc", "eval_log_loss", "eval_brier", "psi_start_hour"} <= set(compared)
    for name in compared:
        assert from_log[name] == pytest.approx(from_file[name], rel=1e-9, abs=1e-12), name
    assert from_log["param:model_version"] == from_file["param:model_version"]
    assert from_log["param:predictions"] == str(log_folder)
