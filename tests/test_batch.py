"""Batch scoring for real: City files of every layout, S3 through moto, jobs through Gunicorn, evaluate, watch."""

from __future__ import annotations

import errno
import gzip
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import S3Endpoint, service_env
from harness import ROOT, start_gunicorn, stop
from mlflow.tracking import MlflowClient
from test_preprocess import Q1_2017, Q3_2017, Q4_2017, Y2018, Y2023, Y2025

from bikeshare_membership import app as service_app
from bikeshare_membership import (
    batch_jobs,
    batch_scoring,
    city_files,
    drift,
    features,
    monitoring,
    stations,
    storage,
    watch,
)
from bikeshare_membership.config import Settings
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import LoadedModel

BUNDLED = sorted(stations.DATA_DIR.glob("bikeshare-ridership-2023-*.csv.gz"))
TRIP = {
    "trip_start_time": "2023-05-09T08:05:00",
    "trip_stop_time": "2023-05-09T08:12:00",
    "trip_duration_seconds": 420,
    "from_station_id": 7033,
    "to_station_id": 7006,
}


def run_batch(settings: Settings, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python batch_scoring.py ...` as a real process, against the test registry (a new experiment's artifacts go
    to `cwd`/mlruns, as MLflow does with a local store)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "batch.py"), *args],
        cwd=cwd,
        env=service_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_csv_text(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def input_rows(text: str) -> int:
    return len(text.strip().splitlines()) - 1


def write_big_csv(path: Path, copies: int) -> int:
    """The bundled trips `copies` times over, with unique trip ids: a file of a few hundred thousand rows."""
    raw = pd.concat([pd.read_csv(file, dtype=str, keep_default_na=False) for file in BUNDLED], ignore_index=True)
    big = pd.concat([raw] * copies, ignore_index=True)
    big[big.columns[0]] = (np.arange(len(big)) + 30_000_000).astype(str)
    big.to_csv(path, index=False)
    return len(big)


# --- score: layouts, formats, rejects -------------------------------------------------------------


def test_a_city_zip_of_every_layout_gives_one_row_per_input_row(
    tmp_path: Path, settings: Settings, model: LoadedModel
) -> None:
    members = {
        "2017 Data/Bikeshare Ridership (2017 Q1).csv": Q1_2017,
        "2017 Data/Bikeshare Ridership (2017 Q3).csv": Q3_2017,
        "2017 Data/Bikeshare Ridership (2017 Q4).csv": Q4_2017,
        "2018/Bike Share Toronto Ridership_Q1 2018.csv": Y2018,
        "Bike share ridership 2023-05.csv": Y2023,
        "Bike share ridership 2025-06.csv": Y2025,
    }
    archive = tmp_path / "bikeshare-ridership.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, text in members.items():
            zipped.writestr(name, text)
        zipped.writestr("__MACOSX/2017 Data/._Bikeshare Ridership (2017 Q1).csv", b"\x00\x05\x16\x07")

    summary = batch_scoring.score_file(settings, str(archive), None, model)

    predictions = read_csv_text(tmp_path / "bikeshare-ridership.predictions.csv")
    rejects = read_csv_text(tmp_path / "bikeshare-ridership.predictions.rejects.csv")
    expected_ids = [line.split(",")[0] for text in members.values() for line in text.strip().splitlines()[1:]]
    assert summary.rows == len(expected_ids) == len(predictions) + len(rejects)
    assert sorted([*predictions["trip_id"], *rejects["trip_id"]]) == sorted(expected_ids)
    assert rejects.to_dict("records") == [
        {
            "source": "2017 Data/Bikeshare Ridership (2017 Q4).csv",
            "trip_id": "2302635",
            "reason": "trip_stop_time: missing or not a date-time",
        }
    ]
    assert summary.rejected_by_reason == {"trip_stop_time: missing or not a date-time": 1}
    proba = predictions["proba"].astype(float)
    assert ((proba >= 50) == (predictions["membership"] == "Member")).all() and proba.between(0, 100).all()
    assert set(predictions["model_name"]) == {model.name} and set(predictions["model_version"]) == {model.version}
    # The same probabilities as scoring the whole member in memory, the way the service reads a trip.
    (tmp_path / "q1.csv").write_text(Q1_2017)
    q1 = city_files.read_trips(tmp_path / "q1.csv")
    expected = np.round(model.member_probability(q1.trips) * 100, 2)
    assert proba[predictions["trip_id"].isin(q1.trips["trip_id"])].tolist() == pytest.approx(expected.tolist())


def test_malformed_rows_bad_values_and_cp1252_text_are_rejected_or_read_never_dropped(
    tmp_path: Path, settings: Settings, model: LoadedModel
) -> None:
    header, *rows = Y2023.encode("utf-8").splitlines()
    bad_rows = [
        b"21248900,300,7030,05/01/2023 00:07,Bay St / Wellesley St W,7389",  # cut short
        b"21248901,300,7030,05/01/2023 00:07,Bay St,7389,05/01/2023 00:11,College Park,5575,Casual Member,extra",
        b"21248902,300,7030,soon,Bay St / Wellesley St W,7389,05/01/2023 00:11,College Park,5575,Casual Member",
        b"21248903,-4,7030,05/01/2023 00:07,Bay St / Wellesley St W,7389,05/01/2023 00:11,College Park,5575,Casual Member",
        b"21248904,240,,05/01/2023 00:07,Queen St E \x96 Berkeley,7389,05/01/2023 00:11,College Park,5575,Casual Member",
    ]
    path = tmp_path / "Bike share ridership 2023-05.csv"
    path.write_bytes(b"\n".join([header, *rows, *bad_rows]) + b"\n")

    summary = batch_scoring.score_file(settings, str(path), str(tmp_path / "out" / "scores.csv.gz"), model)

    with gzip.open(tmp_path / "out" / "scores.csv.gz", "rt") as scores:
        predictions = pd.read_csv(scores, dtype=str)
    rejects = read_csv_text(tmp_path / "out" / "scores.rejects.csv")
    assert summary.rows == len(rows) + len(bad_rows) == len(predictions) + len(rejects)
    assert dict(zip(rejects["trip_id"], rejects["reason"], strict=True)) == {
        "21248900": "malformed CSV row: 6 fields, expected 10",
        "21248901": "malformed CSV row: 11 fields, expected 10",
        "21248902": "trip_start_time: missing or not a date-time",
        "21248903": "trip_duration_seconds: negative",
    }
    assert "21248904" in set(predictions["trip_id"])  # a cp1252 station name does not stop the row
    assert "4 rejected" in summary.line() and "malformed CSV row" in summary.line()


def test_date_order_shown_by_one_chunk_carries_into_the_next(tmp_path: Path) -> None:
    """A month-first file in the request-schema layout (day-first by default), like the City's 2016 Q3."""
    header = "trip_id,trip_start_time,trip_stop_time,trip_duration_seconds,from_station_id,from_station_name,to_station_id,to_station_name,user_type"
    evident = [f"{i},7/13/2016 8:{i % 60:02d},7/13/2016 9:{i % 60:02d},3600,7051,,7089,,Member" for i in range(200)]
    ambiguous = [
        f"{i},8/1/2016 8:{i % 60:02d},8/1/2016 9:{i % 60:02d},3600,7051,,7089,,Member" for i in range(200, 400)
    ]
    path = tmp_path / "2016-q3.csv"
    path.write_text("\n".join([header, *evident, *ambiguous]) + "\n")

    chunks = list(city_files.read_chunks(path, chunk_rows=64))

    assert len(chunks) > 3
    last = chunks[-1].parsed
    assert last.date_order == "MDY"
    assert set(last.trips["trip_start_time"].dt.month) == {8}  # 1 August, not 8 January
    assert sum(len(chunk.parsed.trips) for chunk in chunks) == 400


def test_gzip_to_parquet_and_a_typed_parquet_input(tmp_path: Path, settings: Settings, model: LoadedModel) -> None:
    source = BUNDLED[0]
    output = tmp_path / "may.parquet"
    summary = batch_scoring.score_file(settings, str(source), str(output), model)
    from_csv = pq.read_table(output).to_pandas()
    assert summary.rows == len(from_csv) == len(city_files.read_trips(source).trips)
    assert pq.read_schema(output).names == ["trip_id", "membership", "proba", "model_name", "model_version"]

    # The same trips as a Parquet file with typed columns (integers, timestamps) score the same.
    trips = city_files.read_trips(source).trips
    typed = pa.table(
        {
            "Trip Id": pa.array(trips["trip_id"].astype("int64")),
            "Trip  Duration": pa.array(trips["trip_duration_seconds"].astype("int64")),
            "Start Station Id": pa.array(trips["from_station_id"], type=pa.float64()),
            "Start Time": pa.array(trips["trip_start_time"]),
            "End Station Id": pa.array(trips["to_station_id"], type=pa.float64()),
            "End Time": pa.array(trips["trip_stop_time"]),
            "User Type": pa.array(trips["user_type"]),
        }
    )
    pq.write_table(typed, tmp_path / "typed.parquet")
    batch_scoring.score_file(settings, str(tmp_path / "typed.parquet"), None, model)
    from_parquet = pq.read_table(tmp_path / "typed.predictions.parquet").to_pandas()
    pd.testing.assert_series_equal(from_parquet["proba"], from_csv["proba"])
    assert from_parquet["trip_id"].tolist() == from_csv["trip_id"].tolist()


def test_cli_reads_and_writes_s3_with_credentials_from_a_profile(
    s3: S3Endpoint, settings: Settings, trained, tmp_path: Path
) -> None:
    client = s3.client()
    client.upload_file(str(BUNDLED[1]), s3.bucket, "incoming/2023-02.csv.gz")

    result = run_batch(settings, tmp_path, "score", f"s3://{s3.bucket}/incoming/2023-02.csv.gz", **s3.env)

    assert result.returncode == 0, result.stderr[-3000:]
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=s3.bucket, Prefix="incoming/")["Contents"]}
    assert {"incoming/2023-02.predictions.csv", "incoming/2023-02.predictions.rejects.csv"} <= keys
    client.download_file(s3.bucket, "incoming/2023-02.predictions.csv", str(tmp_path / "scores.csv"))
    scores = read_csv_text(tmp_path / "scores.csv")
    expected = city_files.read_trips(BUNDLED[1]).trips
    assert scores["trip_id"].tolist() == expected["trip_id"].tolist()
    assert f"{len(expected):,} rows" in result.stdout and "0 rejected" in result.stdout


def test_a_file_of_no_known_layout_fails_and_leaves_nothing_behind(
    settings: Settings, model: LoadedModel, tmp_path: Path
) -> None:
    path = tmp_path / "other.csv"
    path.write_text("id,start,stop\n1,2,3\n")
    with pytest.raises(ValueError, match="unknown file layout"):
        batch_scoring.score_file(settings, str(path), None, model)
    assert [file.name for file in tmp_path.iterdir()] == ["other.csv"]  # no partial output


# --- the web service ------------------------------------------------------------------------------


@pytest.fixture
def batch_settings(settings: Settings, tmp_path: Path) -> Settings:
    root = tmp_path / "root"
    root.mkdir()
    return replace(settings, batch_root=str(root), batch_state_dir=str(tmp_path / "state"))


def batch_root(settings: Settings) -> Path:
    assert settings.batch_root is not None
    return Path(settings.batch_root)


@pytest.fixture
def client(batch_settings: Settings, model: LoadedModel):
    return service_app.create_app(batch_settings, ModelHolder(None, model)).test_client()


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"input": "/etc/passwd"}, 403, "PERMISSION_DENIED", "input"),
        ({"input": "../outside.csv"}, 403, "PERMISSION_DENIED", "input"),
        ({"input": "inside/../../outside.csv"}, 403, "PERMISSION_DENIED", "input"),
        ({"input": "escape.csv"}, 403, "PERMISSION_DENIED", "input"),  # a symlink to a file outside
        ({"input": "trips.csv", "output": "../scores.csv"}, 403, "PERMISSION_DENIED", "output"),
        ({"input": "file:///etc/passwd"}, 400, "INVALID_PARAMETER_VALUE", "input"),
        ({"input": "s3://"}, 400, "INVALID_PARAMETER_VALUE", "input"),
        ({"input": "missing.csv"}, 404, "RESOURCE_DOES_NOT_EXIST", "input"),
        ({"input": f"{'x' * 300}.csv"}, 404, "RESOURCE_DOES_NOT_EXIST", "input"),  # too long a name for a file
        ({"input": "notes.txt"}, 400, "INVALID_PARAMETER_VALUE", "input"),
        ({"input": "trips.csv", "output": "scores.json"}, 400, "INVALID_PARAMETER_VALUE", "output"),
        ({"input": "trips.csv", "output": "trips.csv"}, 400, "INVALID_PARAMETER_VALUE", "output"),
        ({"input": 42}, 400, "INVALID_PARAMETER_VALUE", "input"),
        ({"input": "trips.csv", "outptu": "x.csv"}, 400, "INVALID_PARAMETER_VALUE", "outptu"),
        (["trips.csv"], 400, "BAD_REQUEST", None),
    ],
)
def test_batch_requests_outside_the_root_or_malformed_get_a_4xx(
    client, batch_settings: Settings, tmp_path: Path, body, status: int, code: str, field: str | None
) -> None:
    root = batch_root(batch_settings)
    (root / "trips.csv").write_text(Y2023)
    (root / "notes.txt").write_text("not trips")
    (tmp_path / "outside.csv").write_text(Y2023)
    (root / "escape.csv").symlink_to(tmp_path / "outside.csv")

    response = client.post("/predict/batch", json=body)

    assert response.status_code == status and response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert (error["code"], error["field"], error["item"]) == (code, field, None) and error["message"]
    assert not (Path(batch_settings.batch_state_dir) / "jobs").exists()  # no job was started


def test_a_state_folder_that_cannot_be_written_is_a_503_not_a_crash(
    batch_settings: Settings, model: LoadedModel, tmp_path: Path
) -> None:
    (batch_root(batch_settings) / "trips.csv").write_text(Y2023)
    (tmp_path / "not-a-folder").write_text("")
    broken = replace(batch_settings, batch_state_dir=str(tmp_path / "not-a-folder"))
    client = service_app.create_app(broken, ModelHolder(None, model)).test_client()
    response = client.post("/predict/batch", json={"input": "trips.csv"})
    assert response.status_code == 503 and "BATCH_STATE_DIR" in response.get_json()["error"]["message"]


def test_a_job_whose_process_cannot_start_is_a_503_and_recorded_as_failed(
    client, batch_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    (batch_root(batch_settings) / "trips.csv").write_text(Y2023)

    def out_of_processes(*args: Any, **kwargs: Any) -> None:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(batch_jobs.subprocess, "Popen", out_of_processes)
    response = client.post("/predict/batch", json={"input": "trips.csv"})
    error = response.get_json()["error"]
    assert response.status_code == 503 and error["code"] == "TEMPORARILY_UNAVAILABLE"
    assert error["message"] == "the job's process could not start (Resource temporarily unavailable); retry later"
    (recorded,) = [
        json.loads(path.read_text()) for path in (Path(batch_settings.batch_state_dir) / "jobs").glob("*.json")
    ]
    assert recorded["status"] == "failed" and "could not start" in recorded["error"]
    assert batch_jobs.running_jobs(Path(batch_settings.batch_state_dir) / "jobs") == 0


def test_jobs_beyond_max_batch_jobs_wait_for_a_free_slot(batch_settings: Settings, model: LoadedModel) -> None:
    """With MAX_BATCH_JOBS=1 a second job is refused with 503 while the first one's process runs (it takes
    seconds to import its libraries alone), and accepted once the first has finished."""
    (batch_root(batch_settings) / "trips.csv").write_text(Y2023)
    one_at_a_time = replace(batch_settings, max_batch_jobs=1)
    client = service_app.create_app(one_at_a_time, ModelHolder(None, model)).test_client()
    first = client.post("/predict/batch", json={"input": "trips.csv", "output": "first.csv"})
    assert first.status_code == 202
    second = client.post("/predict/batch", json={"input": "trips.csv", "output": "second.csv"})
    assert second.status_code == 503
    assert second.get_json()["error"]["code"] == "TEMPORARILY_UNAVAILABLE"
    assert "MAX_BATCH_JOBS" in second.get_json()["error"]["message"]
    assert poll(lambda: client.get(f"/predict/batch/{first.get_json()['job_id']}").get_json())["status"] == "succeeded"
    third = client.post("/predict/batch", json={"input": "trips.csv", "output": "third.csv"})
    assert third.status_code == 202
    assert poll(lambda: client.get(f"/predict/batch/{third.get_json()['job_id']}").get_json())["status"] == "succeeded"
    assert not (batch_root(batch_settings) / "second.csv").exists()


def test_a_service_without_batch_root_reads_no_local_file(settings: Settings, model: LoadedModel) -> None:
    client = service_app.create_app(replace(settings, batch_root=None), ModelHolder(None, model)).test_client()
    response = client.post("/predict/batch", json={"input": str(BUNDLED[0])})
    assert response.status_code == 403 and "BATCH_ROOT" in response.get_json()["error"]["message"]


@pytest.mark.parametrize(
    ("job_id", "code"),
    [
        ("0" * 32, "RESOURCE_DOES_NOT_EXIST"),
        ("not-a-job", "RESOURCE_DOES_NOT_EXIST"),
        ("..%2F..%2Fetc%2Fpasswd", "NOT_FOUND"),
    ],
)
def test_unknown_jobs_are_404(client, job_id: str, code: str) -> None:
    response = client.get(f"/predict/batch/{job_id}")
    assert response.status_code == 404 and response.get_json()["error"]["code"] == code


def poll(get_status, until: tuple[str, ...] = batch_jobs.FINISHED, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = get_status()
        if status["status"] in until:
            return status
        time.sleep(0.2)
    raise AssertionError(f"the job did not finish within {timeout}s: {status}")


def test_a_failing_job_reports_its_error(client, batch_settings: Settings) -> None:
    (batch_root(batch_settings) / "other.csv").write_text("id,start,stop\n1,2,3\n")
    started = client.post("/predict/batch", json={"input": "other.csv"})
    assert started.status_code == 202
    job = started.get_json()
    status = poll(lambda: client.get(f"/predict/batch/{job['job_id']}").get_json())
    assert status["status"] == "failed" and "unknown file layout" in status["error"]
    print(f"\nfailed job as shown: {status}")
    assert str(batch_root(batch_settings).resolve()) not in json.dumps([job, status])


def test_s3_jobs_only_under_the_configured_prefix(
    s3: S3Endpoint, batch_settings: Settings, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.client().upload_file(str(BUNDLED[0]), s3.bucket, "allowed/2023-01.csv.gz")
    for name, value in s3.env.items():  # the job process reaches moto with the profile, as a deployment would
        monkeypatch.setenv(name, value)
    allowed = f"s3://{s3.bucket}/allowed/"

    def submit(settings: Settings, body: dict):
        return (
            service_app.create_app(settings, ModelHolder(None, model)).test_client().post("/predict/batch", json=body)
        )

    refused = {
        "no prefix": submit(batch_settings, {"input": f"{allowed}2023-01.csv.gz"}),
        "other bucket": submit(replace(batch_settings, batch_s3_prefix=allowed), {"input": "s3://other/allowed/a.csv"}),
        "other key": submit(replace(batch_settings, batch_s3_prefix=allowed), {"input": f"s3://{s3.bucket}/a.csv"}),
        "prefix of a name": submit(
            replace(batch_settings, batch_s3_prefix=f"s3://{s3.bucket}/allow"), {"input": f"{allowed}2023-01.csv.gz"}
        ),
        "output outside": submit(
            replace(batch_settings, batch_s3_prefix=allowed),
            {"input": f"{allowed}2023-01.csv.gz", "output": f"s3://{s3.bucket}/elsewhere/"},
        ),
    }
    for case, response in refused.items():
        assert response.status_code == 403, case
        assert response.get_json()["error"]["code"] == "PERMISSION_DENIED" and "BATCH_S3_PREFIX" in response.text
    dotted = submit(replace(batch_settings, batch_s3_prefix=allowed), {"input": f"{allowed}../secret/a.csv"})
    assert dotted.status_code == 400 and dotted.get_json()["error"]["field"] == "input"
    assert not (Path(batch_settings.batch_state_dir) / "jobs").exists()  # no job was started

    client = service_app.create_app(
        replace(batch_settings, batch_s3_prefix=allowed), ModelHolder(None, model)
    ).test_client()
    started = client.post("/predict/batch", json={"input": f"{allowed}2023-01.csv.gz"})
    assert started.status_code == 202, started.text
    status = poll(lambda: client.get(f"/predict/batch/{started.get_json()['job_id']}").get_json())
    assert status["status"] == "succeeded", status
    assert status["output"] == f"{allowed}2023-01.predictions.csv" and status["summary"]["scored"] > 0
    written = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="allowed/")["Contents"]
    assert "allowed/2023-01.predictions.csv" in {item["Key"] for item in written}


@pytest.fixture
def batch_service(batch_settings: Settings, trained, tmp_path: Path):
    """Gunicorn as deployed (two preloaded sync workers) with a batch root and a state folder."""
    process, url = start_gunicorn(service_env(batch_settings, **batch_settings.to_env()), tmp_path / "gunicorn.log")
    try:
        yield url
    finally:
        stop(process)


def test_a_large_job_through_gunicorn_completes_while_predict_keeps_answering(
    batch_service: str, batch_settings: Settings
) -> None:
    rows = write_big_csv(batch_root(batch_settings) / "big.csv", copies=8)

    submitted = requests.post(f"{batch_service}/predict/batch", json={"input": "big.csv"}, timeout=10)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["status"] == "starting" and job["output"].endswith("big.predictions.csv")

    def poll() -> dict:  # either worker may answer: the job's state is in a file both read
        return requests.get(f"{batch_service}/predict/batch/{job['job_id']}", timeout=10).json()

    answered_while_running, latencies = 0, []
    deadline = time.monotonic() + 180
    status = poll()
    while status["status"] not in batch_jobs.FINISHED:
        assert time.monotonic() < deadline, f"the job did not finish: {status}"
        asked = time.monotonic()
        answer = requests.post(f"{batch_service}/predict", json=TRIP, timeout=10)
        latencies.append(time.monotonic() - asked)
        assert answer.status_code == 200 and answer.json()["membership"] in ("Member", "Casual")
        answered_while_running += status["status"] == "running"
        status = poll()

    assert status["status"] == "succeeded", status
    assert answered_while_running >= 1 and max(latencies) < 5.0  # /predict kept answering while the job ran
    assert status["summary"]["rows"] == status["summary"]["scored"] == status["rows_done"] == rows
    assert status["model"]["version"] == requests.get(f"{batch_service}/health", timeout=10).json()["model"]["version"]
    root = batch_root(batch_settings).resolve()
    assert str(root) not in json.dumps([job, status])  # paths as requests give them: relative to BATCH_ROOT
    assert (job["input"], status["output"]) == ("big.csv", "big.predictions.csv")
    output = root / status["output"]
    assert output.is_file() and sum(1 for _ in output.open()) == rows + 1


# --- evaluate -------------------------------------------------------------------------------------


def test_training_logs_the_feature_profile_of_its_training_data(settings: Settings, model: LoadedModel) -> None:
    mlflow.set_tracking_uri(settings.tracking_uri)
    profile = mlflow.artifacts.load_dict(f"runs:/{model.run_id}/{drift.PROFILE_ARTIFACT}")
    assert list(profile["features"]) == list(model.pipeline.named_steps["features"].features)
    assert profile["rows"] > 40_000
    for feature in profile["features"].values():
        assert sum(feature["shares"]) == pytest.approx(1) and len(feature["shares"]) == len(feature["bins"])


def test_evaluate_logs_metrics_images_and_drift_and_fails_below_the_floor(
    settings: Settings, trained, registry_dir: Path
) -> None:
    may = BUNDLED[-1]
    result = run_batch(settings, registry_dir, "evaluate", str(may))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at or above the floor 0.60" in result.stdout

    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(f"{settings.experiment_name}-monitoring")
    assert experiment is not None
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    metrics = run.data.metrics
    for name in ("eval_roc_auc", "eval_log_loss", "eval_brier", "eval_precision", "eval_recall"):
        assert np.isfinite(metrics[name])
    assert metrics["labelled_rows"] == len(city_files.read_trips(may).trips)
    assert metrics["member_share_observed"] == pytest.approx(0.14, abs=0.03)  # May 2023's Annual Members
    assert 0 < metrics["mean_member_probability"] < 0.5
    assert {f"psi_{name}" for name in features.DEFAULT_FEATURES} <= set(metrics)
    assert all(metrics[f"psi_{name}"] >= 0 for name in features.DEFAULT_FEATURES)
    assert metrics["psi_start_hour"] < 0.25  # May's riders start at the hours the year's do
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"calibration_curve.png", "confusion_matrix.png", "feature_drift.json"} <= artifacts
    assert run.data.params["model_version"] and run.data.tags["passed"] == "true"

    failed = run_batch(settings, registry_dir, "evaluate", str(may), EVAL_MIN_ROC_AUC="0.99")
    assert failed.returncode == 1 and "below the floor 0.99" in failed.stderr
    latest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert latest.data.tags["passed"] == "false"


def test_evaluate_refuses_a_file_without_labels(settings: Settings, model: LoadedModel, tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("\n".join(line.rsplit(",", 1)[0] for line in Y2023.splitlines()) + "\n")
    with pytest.raises(monitoring.NoLabels, match="no labelled trips"):
        monitoring.evaluate_file(settings, str(unlabelled), model, min_roc_auc=0.6)


def test_population_stability_is_zero_for_the_same_data_and_large_for_a_shift(model: LoadedModel) -> None:
    trips = city_files.read_trips(BUNDLED[0]).trips
    features = drift.model_features(model.pipeline, trips)
    same = drift.DriftCounter(drift.feature_profile(features))
    same.add(features)
    assert max(feature["psi"] for feature in same.summary().values()) == pytest.approx(0, abs=1e-9)
    shifted = drift.DriftCounter(drift.feature_profile(features))
    shifted.add(features.assign(duration_log=features["duration_log"] + 1.0))
    assert shifted.summary()["duration_log"]["psi"] > 0.25


# --- watch ----------------------------------------------------------------------------------------


def stamp(path: Path, minutes_ago: float) -> None:
    moment = time.time() - minutes_ago * 60
    os.utime(path, (moment, moment))


def test_watch_scores_the_newest_file_once_and_what_arrives_while_it_is_down(
    settings: Settings, trained, registry_dir: Path, tmp_path: Path
) -> None:
    source, state = tmp_path / "incoming", tmp_path / "watch-state.json"
    source.mkdir()
    for name, copy_from, age in (("2023-01.csv.gz", BUNDLED[0], 30), ("2023-02.csv.gz", BUNDLED[1], 20)):
        (source / name).write_bytes(copy_from.read_bytes())
        stamp(source / name, age)
    watch = ("watch", str(source), "--every", "0.1s", "--state-file", str(state))

    first = run_batch(settings, registry_dir, *watch, "--max-cycles", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    scored = source / "2023-02.predictions.csv"
    assert scored.is_file() and not (source / "2023-01.predictions.csv").exists()  # the newest only
    assert first.stdout.count(" rows in ") == 1 and "nothing new" in first.stderr  # once, not every cycle
    written = scored.stat().st_mtime_ns

    restarted = run_batch(settings, registry_dir, *watch, "--max-cycles", "1")
    assert restarted.returncode == 0 and "nothing new" in restarted.stderr
    assert scored.stat().st_mtime_ns == written  # not scored again after a restart

    for name, copy_from, age in (("2023-03.csv.gz", BUNDLED[2], 10), ("2023-05.csv.gz", BUNDLED[3], 5)):
        (source / name).write_bytes(copy_from.read_bytes())
        stamp(source / name, age)
    (source / ".upload").mkdir()  # hidden: a file still being written, say
    (source / ".upload" / "2023-06.csv.gz").write_bytes(BUNDLED[3].read_bytes())
    caught_up = run_batch(settings, registry_dir, *watch, "--max-cycles", "1", "--evaluate")
    assert caught_up.returncode == 0, caught_up.stderr[-3000:]
    assert (source / "2023-03.predictions.csv").is_file() and (source / "2023-05.predictions.csv").is_file()
    assert scored.stat().st_mtime_ns == written and not (source / "2023-01.predictions.csv").exists()
    assert not list((source / ".upload").glob("*.predictions.*"))
    files = json.loads(state.read_text())["files"]
    assert {Path(location).name for location in files} == {"2023-02.csv.gz", "2023-03.csv.gz", "2023-05.csv.gz"}
    assert files[str(source / "2023-05.csv.gz")]["evaluation"]["passed"] is True


def test_watch_state_takes_the_newest_first_then_everything_newer_oldest_first(tmp_path: Path) -> None:
    def found(name: str, modified: float, fingerprint: str = "v1") -> storage.StoredFile:
        return storage.StoredFile(f"s3://bucket/in/{name}", 10, modified, fingerprint)

    state = watch.WatchState(tmp_path / "state.json")
    listing = [found("a.csv", 1), found("b.csv", 3), found("c.csv", 2)]
    assert state.pending(listing) == [found("b.csv", 3)]
    state.record(found("b.csv", 3), {})
    listing += [found("e.csv", 5), found("d.csv", 4)]
    assert [item.location[-5:] for item in watch.WatchState(state.path).pending(listing)] == ["d.csv", "e.csv"]
    changed = [found("b.csv", 6, fingerprint="v2")]  # the same name with new content is new work
    assert watch.WatchState(state.path).pending(changed) == changed


def test_an_output_name_too_long_for_a_file_is_taken_as_written(tmp_path: Path) -> None:
    """Not a 500 while answering the request: the job fails on it later, saying why."""
    output = str(tmp_path / f"{'x' * 300}.csv")
    assert batch_scoring.resolve_output(str(tmp_path / "trips.csv"), output) == output


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("10m", 600), ("1h", 3600), ("2d", 172800), ("0.5", 0.5)])
def test_intervals(text: str, seconds: float) -> None:
    assert watch.parse_interval(text) == seconds


def test_settings_survive_the_trip_to_a_job_process() -> None:
    settings = Settings(
        batch_root="/data",
        batch_s3_prefix="s3://bucket/in/",
        monitoring_experiment="mon",
        eval_min_roc_auc=0.7,
        model_path="/models/membership",
    )
    assert Settings.from_env(settings.to_env()) == settings
    assert Settings.from_env({}).monitoring_experiment_name == "bikeshare-membership-monitoring"
