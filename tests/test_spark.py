"""The Spark job on a local[2] session: the bundled trips in every layout give the service's and batch.py's
predictions and rejects, files split across tasks keep the whole file's date order, the version is the one
Production names, and a registry without one fails in one line."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyspark
import pytest
from conftest import service_env
from harness import ROOT
from mlflow.tracking import MlflowClient
from pyspark.sql import SparkSession
from test_preprocess import Q1_2017, Q3_2017, Q4_2017, Y2018, Y2023, Y2025

from bikeshare_membership import app as service_app
from bikeshare_membership import batch_scoring, city_files, spark_classes, spark_scoring, stations
from bikeshare_membership.config import Settings
from bikeshare_membership.model_files import FAST_FORM
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import LoadedModel
from bikeshare_membership.schema import EXAMPLE_TRIP, RequestTrips, parse_request_trip
from bikeshare_membership.spark_cli import one_line

BUNDLED = sorted(stations.DATA_DIR.glob("bikeshare-ridership-2023-*.csv.gz"))
CITY_TIME = "%m/%d/%Y %H:%M"
LABELS_2017 = {"Annual Member": "Member", "Casual Member": "Casual"}


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    """One local[2] session for the file, with small splits and batches so that a plain CSV is read by several
    tasks and a task's lines of one file come in several batches (the cases a large file makes)."""
    session = spark_scoring.start_session("local[2]", app_name="bikeshare-membership-tests")
    session.conf.set("spark.sql.files.maxPartitionBytes", str(256 * 1024))
    session.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "4000")
    try:
        yield session
    finally:
        session.stop()


def run_spark_job(
    spark: SparkSession, settings: Settings, inputs: list[Path], output: Path, version: str | None = None
) -> spark_scoring.SparkSummary:
    model = spark_scoring.fetch_model(settings, spark_scoring.resolve_version(settings, version))
    return spark_scoring.score_files(spark, model, [str(path) for path in inputs], str(output), with_probability=True)


def read_predictions(output: Path) -> pd.DataFrame:
    return ds.dataset(output, format="parquet", partitioning="hive").to_table().to_pandas()


def read_rejects(location: str) -> pd.DataFrame:
    parts = [part for part in sorted(Path(location).glob("part-*.csv")) if part.stat().st_size]
    frames = [pd.read_csv(part, dtype=str, keep_default_na=False) for part in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["source", "trip_id", "reason"])


# --- the bundled trips in every layout ------------------------------------------------------------------


def bundled(index: int) -> pd.DataFrame:
    return pd.read_csv(BUNDLED[index], dtype=str, keep_default_na=False, encoding="utf-8-sig")


def reformat(texts: pd.Series, style: str) -> list[str]:
    moments = pd.to_datetime(texts, format=CITY_TIME)
    if style == "2017 Q1":  # D/M/YYYY H:MM
        return [f"{m.day}/{m.month}/{m.year} {m.hour}:{m.minute:02d}" for m in moments]
    if style == "2017 Q4":  # M/DD/YY HH:MM:SS
        return [f"{m.month}/{m.day:02d}/{m.year % 100:02d} {m.hour:02d}:{m.minute:02d}:{m.second:02d}" for m in moments]
    return [f"{m.month}/{m.day}/{m.year} {m.hour}:{m.minute:02d}" for m in moments]  # M/D/YYYY H:MM


def as_2017_q1(raw: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trip_id": raw["Trip Id"],
            "trip_start_time": reformat(raw["Start Time"], "2017 Q1"),
            "trip_stop_time": reformat(raw["End Time"], "2017 Q1"),
            "trip_duration_seconds": raw["Trip  Duration"],
            "from_station_id": raw["Start Station Id"],
            "from_station_name": raw["Start Station Name"],
            "to_station_id": raw["End Station Id"],
            "to_station_name": raw["End Station Name"],
            "user_type": raw["User Type"].map(LABELS_2017),
        }
    )


def as_2017_q4(raw: pd.DataFrame) -> pd.DataFrame:
    """No station ids: stations are found by name."""
    return pd.DataFrame(
        {
            "trip_id": raw["Trip Id"],
            "trip_start_time": reformat(raw["Start Time"], "2017 Q4"),
            "trip_stop_time": reformat(raw["End Time"], "2017 Q4"),
            "trip_duration_seconds": raw["Trip  Duration"],
            "from_station_name": raw["Start Station Name"],
            "to_station_name": raw["End Station Name"],
            "user_type": raw["User Type"].map(LABELS_2017),
        }
    )


def as_2018(raw: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trip_id": raw["Trip Id"],
            "trip_duration_seconds": raw["Trip  Duration"],
            "from_station_id": raw["Start Station Id"],
            "trip_start_time": reformat(raw["Start Time"], "2018"),
            "from_station_name": raw["Start Station Name"],
            "trip_stop_time": reformat(raw["End Time"], "2018"),
            "to_station_id": raw["End Station Id"],
            "to_station_name": raw["End Station Name"],
            "user_type": raw["User Type"],
        }
    )


# Rows batch.py rejects or reads specially (tests/test_batch.py), and stations unknown, missing or found by name.
BAD_ROWS = [
    b"21248900,300,7030,05/01/2023 00:07,Bay St / Wellesley St W,7389",  # cut short
    b"21248901,300,7030,05/01/2023 00:07,Bay St,7389,05/01/2023 00:11,College Park,5575,Casual Member,extra",
    b"21248902,300,7030,soon,Bay St / Wellesley St W,7389,05/01/2023 00:11,College Park,5575,Casual Member",
    b"21248903,-4,7030,05/01/2023 00:07,Bay St / Wellesley St W,7389,05/01/2023 00:11,College Park,5575,Casual Member",
    b"21248904,240,,05/01/2023 00:07,Queen St E \x96 Berkeley,7389,05/01/2023 00:11,College Park,5575,Casual Member",
]
CUT_SHORT_IN_ZIP = b"21248990,300,7030,05/01/2023 00:07,Bay St / Wellesley St W,7389"
STATION_ROWS = {  # trip id: the trip as the service is asked for it
    "21248905": ("99999", "Nowhere St", "7389", "College Park- Gerrard Entrance"),  # an unknown id
    "21248906": ("", "NULL", "", ""),  # both stations missing
    "21248907": ("", "Bay St / Wellesley St W", "NULL", "Union Station"),  # ids found by name
}


def station_row(trip_id: str, ends: tuple[str, str, str, str]) -> bytes:
    from_id, from_name, to_id, to_name = ends
    return f"{trip_id},360,{from_id},05/01/2023 08:07,{from_name},{to_id},05/01/2023 08:13,{to_name},5575,".encode()


@pytest.fixture(scope="module")
def layout_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The bundled trips written in every layout and format batch.py reads, and the small layout samples of
    tests/test_preprocess.py; trip ids are unique across the files."""
    folder = tmp_path_factory.mktemp("layouts")
    files = {
        "Bikeshare Ridership (2017 Q1).csv": as_2017_q1(bundled(0)),
        "Bikeshare Ridership (2017 Q4).csv.gz": as_2017_q4(bundled(1)),
        "Bike Share Toronto Ridership_Q1 2018.csv": as_2018(bundled(2)),
    }
    for name, frame in files.items():
        text = frame.to_csv(index=False).encode()
        (folder / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    shutil.copy(BUNDLED[3], folder / "Bike share ridership 2023-05.csv.gz")  # 2019-2024, gzip, as published
    samples = {"q1.csv": Q1_2017, "q3.csv": Q3_2017, "q4.csv": Q4_2017, "2018.csv": Y2018, "2025.csv": Y2025}
    for name, sample in samples.items():
        (folder / name).write_text(sample, encoding="utf-8")
    header = Y2023.encode("utf-8").splitlines()[0]  # with its byte order mark
    stations_rows = [station_row(trip_id, ends) for trip_id, ends in STATION_ROWS.items()]
    (folder / "Bike share ridership 2023-06 (bad rows).csv").write_bytes(
        b"\n".join([header, *BAD_ROWS, *stations_rows]) + b"\n"
    )
    # Parquet with typed columns (integers, timestamps), as tests/test_batch.py writes it, under new trip ids.
    trips = city_files.read_trips(BUNDLED[0]).trips
    typed = pa.table(
        {
            "Trip Id": pa.array(trips["trip_id"].astype("int64") + 90_000_000),
            "Trip  Duration": pa.array(trips["trip_duration_seconds"].astype("int64")),
            "Start Station Id": pa.array(trips["from_station_id"], type=pa.float64()),
            "Start Time": pa.array(trips["trip_start_time"]),
            "End Station Id": pa.array(trips["to_station_id"], type=pa.float64()),
            "End Time": pa.array(trips["trip_stop_time"]),
            "User Type": pa.array(trips["user_type"]),
        }
    )
    pq.write_table(typed, folder / "typed.parquet")
    # A zip of CSVs in two layouts, as the City publishes a year, one of them with a row cut short.
    renumbered = bundled(2).assign(**{"Trip Id": lambda raw: (raw["Trip Id"].astype(int) + 80_000_000).astype(str)})
    with zipfile.ZipFile(folder / "bikeshare-ridership-2018.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("2018/Bike Share Toronto Ridership_Q1 2018.csv", as_2018(renumbered).to_csv(index=False))
        archive.writestr("2018/Bike share ridership 2023-07.csv", b"\n".join([header, CUT_SHORT_IN_ZIP]) + b"\n")
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def spark_run(
    spark: SparkSession, settings: Settings, trained, layout_files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[spark_scoring.SparkSummary, pd.DataFrame, pd.DataFrame]:
    """The Spark job over the folder of layout files: its summary, predictions and rejects."""
    output = tmp_path_factory.mktemp("spark-out") / "predictions"
    summary = run_spark_job(spark, settings, [layout_files[0].parent], output)
    return summary, read_predictions(output), read_rejects(summary.rejects)


def test_every_layout_gives_batch_pys_predictions_and_rejects(
    spark_run, layout_files: list[Path], settings: Settings, model: LoadedModel, tmp_path: Path
) -> None:
    summary, predictions, rejects = spark_run
    expected, expected_rejects, reference = [], [], []
    for path in layout_files:
        output = tmp_path / f"{path.name}.predictions.parquet"
        batch_scoring.score_file(settings, str(path), str(output), model)
        expected.append(pq.read_table(output).to_pandas())
        expected_rejects.append(read_csv_text(Path(batch_scoring.rejects_location(str(output)))))
        trips = city_files.read_trips(path).trips
        reference.append(pd.DataFrame({"trip_id": trips["trip_id"], "p": model.member_probability(trips)}))
    batch = pd.concat(expected, ignore_index=True)
    batch_rejects = pd.concat(expected_rejects, ignore_index=True)

    assert summary.inputs == len(layout_files) and summary.rows == len(batch) + len(batch_rejects)
    assert len(predictions) == len(batch) == predictions["trip_id"].nunique()
    joined = batch.merge(predictions, on="trip_id", suffixes=("_batch", "_spark"), validate="one_to_one")
    assert len(joined) == len(batch)
    assert (joined["membership_batch"] == joined["membership_spark"]).all()
    assert (joined["proba_batch"] == joined["proba_spark"]).all()  # the same rounded percent, exactly
    raw = pd.concat(reference, ignore_index=True).merge(predictions, on="trip_id", validate="one_to_one")
    assert len(raw) == len(batch) and np.abs(raw["p"] - raw["probability"]).max() <= 1e-9
    assert set(predictions["model_name"]) == {model.name} and set(predictions["model_version"]) == {model.version}
    # Partitioned by the trip's start date, Toronto time, as the trip's texts give it.
    starts = pd.concat([city_files.read_trips(path).trips for path in layout_files], ignore_index=True)
    dates = starts.set_index("trip_id")["trip_start_time"].dt.strftime("%Y-%m-%d")
    assert (predictions["trip_date"].astype(str) == predictions["trip_id"].map(dates)).all()

    def keyed(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
        """Each reject by its file's name (Spark names a file by its URI, batch.py by its name; a CSV in a zip
        both by its path in the zip), trip id and reason."""
        return sorted(
            zip(frame["source"].map(lambda source: Path(source).name), frame["trip_id"], frame["reason"], strict=True)
        )

    assert keyed(rejects) == keyed(batch_rejects)
    assert "2018/Bike share ridership 2023-07.csv" in set(rejects["source"])
    # The 2017 Q4 sample's NULLNULL row, four bad rows, and the zipped one.
    assert len(rejects) == summary.rejected == 6
    assert summary.rescored_files == []  # every part of every file shows its order: one pass
    print(f"\nspark job over {summary.inputs} files: {summary.line()}")


def read_csv_text(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_unknown_and_missing_stations_are_scored_as_the_service_scores_them(
    spark_run, settings: Settings, model: LoadedModel
) -> None:
    _, predictions, _ = spark_run
    trips = []
    for trip_id, (from_id, from_name, to_id, to_name) in STATION_ROWS.items():
        trips.append(
            {
                "trip_id": trip_id,
                "trip_start_time": "05/01/2023 08:07",
                "trip_stop_time": "05/01/2023 08:13",
                "trip_duration_seconds": 360,
                "from_station_id": from_id or None,
                "from_station_name": from_name or None,
                "to_station_id": to_id or None,
                "to_station_name": to_name or None,
            }
        )
    client = service_app.create_app(settings, ModelHolder(None, model)).test_client()
    answer = client.post("/predict", json=trips)
    assert answer.status_code == 200, answer.text
    served = {item["trip_id"]: item for item in answer.get_json()["predictions"]}
    raw = model.request_probabilities(RequestTrips.of([parse_request_trip(trip) for trip in trips]))
    spark_rows = predictions.set_index("trip_id").loc[list(STATION_ROWS)]
    for (trip_id, row), probability in zip(spark_rows.iterrows(), raw, strict=True):
        assert row["membership"] == served[trip_id]["membership"]
        assert abs(row["probability"] - probability) <= 1e-9
        assert round(row["probability"] * 100, 2) == served[trip_id]["proba"]
    parsed = [parse_request_trip(trip) for trip in trips]
    assert parsed[0]["from_station_id"] == 99999 and 99999 not in stations.station_index().coordinates  # unknown
    assert np.isnan(parsed[1]["from_station_id"]) and np.isnan(parsed[1]["to_station_id"])  # missing
    assert not np.isnan(parsed[2]["from_station_id"]) and not np.isnan(parsed[2]["to_station_id"])  # by name


def test_a_version_shipped_without_its_saved_fast_form_is_loaded_whole_and_scores_the_same(
    spark: SparkSession, spark_run, layout_files: list[Path], settings: Settings, tmp_path: Path
) -> None:
    """A worker scores with the fast form the driver saved in the shipped folder; a folder without one (a
    pipeline the fast form does not take, a driver cache it could not be saved in) is loaded whole, with MLflow
    and scikit-learn: the same predictions, to the bit."""
    _, predictions, _ = spark_run
    fetched = spark_scoring.fetch_model(settings, spark_scoring.resolve_version(settings))
    bare = tmp_path / "version-without-its-fast-form"
    shutil.copytree(fetched.directory, bare, ignore=shutil.ignore_patterns(FAST_FORM.parts[0]))
    output = tmp_path / "predictions"
    inputs = [str(layout_files[0].parent)]
    summary = spark_scoring.score_files(
        spark, replace(fetched, directory=bare), inputs, str(output), with_probability=True
    )
    again = read_predictions(output)
    assert summary.scored == len(again) == len(predictions)
    joined = predictions.merge(again, on="trip_id", suffixes=("", "_whole"), validate="one_to_one")
    assert len(joined) == len(predictions)
    assert (joined["probability"] == joined["probability_whole"]).all()


# --- a file in parts ----------------------------------------------------------------------------------


def test_a_file_read_by_several_tasks_is_read_in_the_date_order_the_whole_file_shows(
    spark: SparkSession, settings: Settings, trained, tmp_path: Path
) -> None:
    """A month-first file in the day-first 2017 Q1/Q2 layout (as the City's 2016 Q3) whose first rows show no
    order: only the later ones, read by other tasks, say that 7/1/2016 is 1 July, not 7 January."""
    header = "trip_id,trip_start_time,trip_stop_time,trip_duration_seconds,from_station_id,from_station_name,to_station_id,to_station_name,user_type"
    rows = []
    for i in range(12_000):
        day = 1 + i * 12 // 6000 if i < 6000 else 13 + (i - 6000) * 18 // 6000  # days 1-12, then 13-30
        rows.append(f"{i},7/{day}/2016 8:{i % 60:02d},7/{day}/2016 9:{i % 60:02d},3600,7051,,7089,,Member")
    path = tmp_path / "2016-q3.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    assert path.stat().st_size > 2 * 256 * 1024  # three splits at least: the fixture's maxPartitionBytes

    output = tmp_path / "predictions"
    summary = run_spark_job(spark, settings, [path], output)

    predictions = read_predictions(output)
    assert summary.scored == len(predictions) == 12_000 and summary.rejected == 0
    assert [Path(name).name for name in summary.rescored_files] == [path.name]  # the first split was read day-first
    assert set(predictions["trip_date"].astype(str).str[:7]) == {"2016-07"}
    assert sorted(predictions["trip_id"].astype(int)) == list(range(12_000))  # each header left out once


# --- the version -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_versions(settings: Settings, model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A model of its own in the session registry with three copies of the session model's version (so the
    other tests' Production is left alone)."""
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    name = f"{settings.registered_model}-spark"
    client.create_registered_model(name)
    source = client.get_model_version_download_uri(settings.registered_model, model.version)
    for _ in range(3):
        client.create_model_version(name, source, run_id=model.run_id, await_creation_for=0)
    return replace(settings, registered_model=name, model_cache_dir=str(tmp_path_factory.mktemp("spark-cache")))


def test_the_version_written_is_the_one_production_names_alias_first_then_stage(
    spark: SparkSession, three_versions: Settings, layout_files: list[Path], tmp_path: Path
) -> None:
    client = MlflowClient(three_versions.tracking_uri, three_versions.tracking_uri)
    name, sample = three_versions.registered_model, [path for path in layout_files if path.name == "2025.csv"]
    with pytest.warns(FutureWarning):
        client.transition_model_version_stage(name, "3", "Production")
    client.set_registered_model_alias(name, "production", "2")

    aliased = run_spark_job(spark, three_versions, sample, tmp_path / "aliased")
    client.delete_registered_model_alias(name, "production")
    staged = run_spark_job(spark, three_versions, sample, tmp_path / "staged")
    asked = run_spark_job(spark, three_versions, sample, tmp_path / "asked", version="1")

    for summary, version in ((aliased, "2"), (staged, "3"), (asked, "1")):
        written = read_predictions(Path(summary.output))
        assert summary.model["version"] == version and set(written["model_version"]) == {version}
        assert set(written["model_name"]) == {name} and len(written) == 2


# --- the command line -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def class_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the command-line runs keep Java's class archive: the tests' own, not the user's."""
    return tmp_path_factory.mktemp("spark-classes")


def run_cli(settings: Settings, cwd: Path, class_cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "spark_score.py"), *args],
        cwd=cwd,
        env=service_env(settings, SPARK_CLASS_CACHE=str(class_cache)),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_registry_without_a_production_version_fails_in_one_line(
    settings: Settings, model: LoadedModel, class_cache: Path, tmp_path: Path
) -> None:
    """A registered model whose one version is neither aliased nor staged: one line, and Spark, started meanwhile,
    stopped without a word."""
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    unpromoted = replace(settings, registered_model=f"{settings.registered_model}-unpromoted")
    client.create_registered_model(unpromoted.registered_model)
    source = client.get_model_version_download_uri(settings.registered_model, model.version)
    client.create_model_version(unpromoted.registered_model, source, run_id=model.run_id, await_creation_for=0)
    (tmp_path / "trips.csv").write_text(Y2025)

    result = run_cli(unpromoted, tmp_path, class_cache, "trips.csv", "--output", "out")

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        f"spark_score.py: no version of model '{unpromoted.registered_model}' is in Production (alias or stage) "
        f"at {settings.tracking_uri}"
    )
    assert not (tmp_path / "out").exists()
    assert not list(class_cache.glob("*/*.part"))  # a failed run's Java is killed, saving no classes


def test_the_command_line_scores_files_and_an_existing_output_is_refused_in_one_line(
    spark: SparkSession, settings: Settings, trained, layout_files: list[Path], class_cache: Path, tmp_path: Path
) -> None:
    source = next(path for path in layout_files if "bad rows" in path.name)

    result = run_cli(settings, tmp_path, class_cache, str(source), "--output", "out", "--master", "local[2]")

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") == 1 and "rows from 1 file in" in result.stdout
    assert "4 rejected" in result.stdout and "-> out.rejects" in result.stdout
    written = read_predictions(tmp_path / "out")
    assert set(STATION_ROWS) <= set(written["trip_id"]) and len(written) == 4  # the stations' and cp1252's
    assert list(written.columns) == ["trip_id", "membership", "proba", "model_name", "model_version", "trip_date"]
    assert len(read_rejects(str(tmp_path / "out.rejects"))) == 4

    model = spark_scoring.fetch_model(settings, spark_scoring.resolve_version(settings))
    with pytest.raises(FileExistsError) as refused:
        spark_scoring.score_files(spark, model, [str(source)], str(tmp_path / "out"))
    assert "already exists" in one_line(refused.value) and "\n" not in one_line(refused.value)


def test_the_first_run_saves_javas_class_archive_and_later_runs_start_from_it(
    spark: SparkSession, settings: Settings, trained, layout_files: list[Path], tmp_path: Path
) -> None:
    """The first run on a host leaves Java's class archive (spark_classes.py), which Java itself finds valid for
    Spark's class path; a later run starts from it and writes the same predictions. A damaged archive, which Java
    refuses to start from, is removed and the job run without it."""
    source = next(path for path in layout_files if "bad rows" in path.name)
    cache = tmp_path / "spark-classes"

    def scored(output: str) -> pd.DataFrame:
        result = run_cli(settings, tmp_path, cache, str(source), "--output", output, "--master", "local[2]")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("\n") == 1 and "rows from 1 file in" in result.stdout  # no notice from Java
        assert ("saved the classes Spark loaded" in result.stderr) == (output == "first")
        return read_predictions(tmp_path / output).sort_values("trip_id", ignore_index=True)

    first = scored("first")
    [folder] = cache.iterdir()
    assert sorted(path.name for path in folder.iterdir()) == [spark_classes.BASE, spark_classes.SPARK]  # no part
    java_home = spark_scoring.local_java_home()
    assert java_home is not None
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    archives = f"{folder / spark_classes.BASE}:{folder / spark_classes.SPARK}"
    check = subprocess.run(
        [
            *(str(java_home / "bin" / "java"), f"-XX:SharedArchiveFile={archives}"),
            *spark_scoring.LOCAL_JAVA_OPTIONS.split(),
            *("-XX:+PrintSharedArchiveAndExit", "-cp", jvm.System.getProperty("java.class.path"), "-version"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0 and "archive is valid" in check.stdout, check.stdout[-2000:] + check.stderr

    pd.testing.assert_frame_equal(scored("later"), first)

    damaged = folder / spark_classes.SPARK
    damaged.unlink()
    damaged.write_bytes(b"not an archive" * 1000)
    pd.testing.assert_frame_equal(scored("damaged"), first)
    assert not any(folder.iterdir())  # the next run saves the archive again


def test_a_class_archive_that_cannot_be_made_leaves_spark_starting_without_one(tmp_path: Path) -> None:
    java_home = spark_scoring.local_java_home()
    assert java_home is not None
    (tmp_path / "not-a-folder").write_text("")

    spark_home = Path(pyspark.__file__).parent

    archive = spark_classes.class_archive(tmp_path / "not-a-folder" / "cache", java_home, spark_home, "")

    assert archive is None


def test_a_killed_runs_part_file_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """A run killed while Java saved its classes leaves a part file (about 130 MB for Spark's); the next run removes
    it once it is older than any run takes to write one, and leaves a newer one, which may be a run's own."""
    java_home = spark_scoring.local_java_home()
    assert java_home is not None
    spark_home = Path(pyspark.__file__).parent
    first = spark_classes.class_archive(tmp_path, java_home, spark_home, "")
    assert first is not None and first.saving is not None
    folder = first.base.parent
    killed, writing = folder / f"{spark_classes.SPARK}.1.part", folder / f"{spark_classes.SPARK}.2.part"
    for part in (killed, writing):
        part.write_bytes(b"classes")
    long_ago = time.time() - spark_classes.STALE_PART_SECONDS - 60
    os.utime(killed, (long_ago, long_ago))

    later = spark_classes.class_archive(tmp_path, java_home, spark_home, "")

    assert later == first
    assert sorted(path.name for path in folder.iterdir()) == [spark_classes.BASE, writing.name]


def test_spark_reads_the_prediction_log_as_one_table_with_its_date(
    spark: SparkSession, model: LoadedModel, tmp_path: Path
) -> None:
    """The service's prediction log, as a Spark job over the log would read it: every answer, `date` a column."""
    folder = tmp_path / "prediction-log"
    app = service_app.create_app(Settings(prediction_log=str(folder)), ModelHolder(None, model))
    client = app.test_client()
    trips = [{**EXAMPLE_TRIP, "trip_id": index, "trip_duration_seconds": 120 + 60 * index} for index in range(30)]
    answers = []
    for body in (trips[:10], *trips[10:]):
        response = client.post("/predict", json=body)
        response.close()  # recorded once closed, as servers do
        answered = response.get_json()
        answers += answered.get("predictions", [answered])
    app.extensions["prediction_log"].close()

    logged = spark.read.parquet(str(folder)).toPandas().sort_values("trip_id", key=lambda ids: ids.astype(int))
    assert logged["proba"].tolist() == [answer["proba"] for answer in answers]
    assert logged["trip_id"].tolist() == [str(answer["trip_id"]) for answer in answers]
    answered_on = pd.to_datetime(logged["answered_at"], utc=True).dt.strftime("%Y-%m-%d")
    assert (logged["date"].astype(str) == answered_on).all()
