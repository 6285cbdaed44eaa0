"""Batch scoring: a file of trips in, one prediction per trip out, by hand, by the service or on a schedule.

    python batch.py score INPUT [--output OUTPUT]     # a local path or s3:// URI; CSV, gzip, zip or Parquet
    python batch.py evaluate INPUT [--min-roc-auc X]  # a labelled file: metrics and drift, logged to MLflow
    python batch.py watch SOURCE --every 10m [--evaluate]   # score each new file under a folder or S3 prefix

`score` writes `trip_id, membership, proba, model_name, model_version` (proba in percent, as the service
answers) as CSV or Parquet by the output's suffix, by default beside the input as `<name>.predictions.csv`
(`.parquet` for a Parquet input), and the rows it could not read, with the reason, to `<output
name>.rejects.csv` beside it. Every input row is in exactly one of the two. A thread reads and parses the
file in chunks (see trip_reader.py) while two others score the chunks before it, so memory stays bounded
whatever the file's size and both cores stay busy; a one-line summary ends the run.

The service runs the same `score` as a background job for `POST /predict/batch` (`submit_job`): a detached
process that writes its state to a JSON file under BATCH_STATE_DIR, which any Gunicorn worker can read
(`job_status`). `watch` remembers what it scored in a state file, so a restart neither repeats nor skips work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import storage
import trip_reader
from config import Settings
from model_store import (
    LoadedModel,
    ModelUnavailable,
    exclusive_lock,
    load_model_version,
    load_production_model,
    membership,
)
from preprocess import MEMBER, any_case

OUTPUT_SUFFIXES = (".csv.gz", ".csv", ".parquet")
OUTPUT_RULE = f"must end with {', '.join(OUTPUT_SUFFIXES)} (or / for a folder)"
PREDICTIONS_TAG = ".predictions"
REJECTS_SUFFIX = ".rejects.csv"
PREDICTION_SCHEMA = pa.schema(
    [
        ("trip_id", pa.large_string()),
        ("membership", pa.string()),
        ("proba", pa.float64()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
    ]
)
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("trip_id", pa.large_string()), ("reason", pa.string())])

log = logging.getLogger("batch")


# --- Scoring a file ---------------------------------------------------------------------------------


def output_suffix(name: str) -> str | None:
    """The output format `name` asks for by its suffix (case aside), or None."""
    return next((suffix for suffix in OUTPUT_SUFFIXES if name.lower().endswith(suffix)), None)


def default_output_name(input_location: str) -> str:
    """`<name>.predictions.csv` for `<name>.csv[.gz]` or `<name>.zip`; `.parquet` for a Parquet input."""
    name = storage.name_of(input_location)
    suffix = trip_reader.input_suffix(name) or ""
    result_suffix = ".parquet" if suffix == ".parquet" else ".csv"
    return f"{name[: len(name) - len(suffix)]}{PREDICTIONS_TAG}{result_suffix}"


def resolve_output(input_location: str, output: str | None) -> str:
    """Where results go: `output`, or the default name in `output` if it is a folder (ends with /), or beside
    the input."""
    if output is None:
        return storage.sibling(input_location, default_output_name(input_location))
    if output.endswith("/") or (not storage.is_s3(output) and os.path.isdir(output)):  # False for a name too long
        return storage.inside(output, default_output_name(input_location))
    if output_suffix(output) is None:
        raise ValueError(f"{output}: the output {OUTPUT_RULE}")
    return output


def rejects_location(output: str) -> str:
    """The rejects file beside an output: its name with `.rejects.csv` for the format's suffix."""
    name = storage.name_of(output)
    suffix = output_suffix(name) or ""
    return storage.sibling(output, f"{name[: len(name) - len(suffix)]}{REJECTS_SUFFIX}")


def is_batch_output(name: str) -> bool:
    """Whether a file is one `score` wrote (so `watch` does not take it for an input)."""
    return PREDICTIONS_TAG + "." in name or name.endswith(REJECTS_SUFFIX)


@dataclass(frozen=True)
class ScoreSummary:
    input: str
    output: str
    rejects: str
    rows: int
    scored: int
    rejected: int
    rejected_by_reason: dict[str, int]
    member_share: float  # of the scored trips, predicted Member at the shared threshold
    seconds: float
    model: dict[str, str]

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary a person reads at the end of a run."""
        reasons = ", ".join(f"{count:,} {reason}" for reason, count in self.rejected_by_reason.items())
        rejected = f"{self.rejected:,} rejected ({reasons}) -> {self.rejects}" if self.rejected else "0 rejected"
        return (
            f"{self.rows:,} rows in {self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s): {self.scored:,} scored, "
            f"{self.member_share:.1%} predicted Member -> {self.output}; {rejected}; "
            f"model {self.model['name']} version {self.model['version']}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 1)}


Progress = Callable[[int, int, int], None]  # (rows so far, input bytes read, input size)


def score_file(
    settings: Settings,
    input_location: str,
    output: str | None,
    model: LoadedModel,
    on_progress: Progress | None = None,
    chunk_rows: int = trip_reader.CHUNK_ROWS,
) -> ScoreSummary:
    """Score every trip of a file and write the predictions and the rejects; see the module docstring."""
    output_location = resolve_output(input_location, output)
    rejects_at = rejects_location(output_location)
    started = time.monotonic()
    rows = scored = members = 0
    reasons: Counter[str] = Counter()
    with (
        storage.local_copy(input_location, settings) as path,
        storage.output_file(output_location, settings) as output_path,
        storage.output_file(rejects_at, settings) as rejects_path,
        _table_writer(output_path, output_suffix(output_location), PREDICTION_SCHEMA) as predictions,
        _table_writer(rejects_path, ".csv", REJECT_SCHEMA) as rejects,
        threadpool_limits(limits=1, user_api="openmp"),  # one core per model call: see MODEL_THREADS
    ):
        size = path.stat().st_size
        for chunk, proba in _scored(_read_ahead(trip_reader.read_chunks(path, chunk_rows)), model):
            trips, rejected = chunk.parsed.trips, chunk.parsed.rejects
            labels = membership(proba)
            predictions.write_table(_prediction_table(trips["trip_id"], labels, proba, model))
            rejects.write_table(_reject_table(chunk.source, rejected))
            rows += len(trips) + len(rejected)
            scored += len(trips)
            members += int((labels == MEMBER).sum())
            reasons.update(rejected["reason"].value_counts().to_dict())
            if on_progress is not None:
                on_progress(rows, chunk.bytes_read, size)
    return ScoreSummary(
        input=input_location,
        output=output_location,
        rejects=rejects_at,
        rows=rows,
        scored=scored,
        rejected=rows - scored,
        rejected_by_reason=dict(reasons.most_common()),
        member_share=members / scored if scored else 0.0,
        seconds=time.monotonic() - started,
        model=model.describe(),
    )


# Chunks scored at once, each by a thread whose model runs on one core (`threadpool_limits` in `score_file`).
# On this 2-core machine two single-threaded model calls beat one call on two OpenMP threads (whose threads
# wait for each other at every tree), and the reading thread fills the gaps. Each holds one chunk in memory.
MODEL_THREADS = 2


def _scored(
    chunks: Iterator[trip_reader.TripChunk], model: LoadedModel
) -> Iterator[tuple[trip_reader.TripChunk, np.ndarray]]:
    """Each chunk with its probabilities, in the file's order; MODEL_THREADS chunks are scored at once."""

    def probabilities(chunk: trip_reader.TripChunk) -> np.ndarray:
        trips = chunk.parsed.trips
        return model.member_probability(trips) if len(trips) else np.empty(0)

    with ThreadPoolExecutor(max_workers=MODEL_THREADS, thread_name_prefix="model") as pool:
        scoring: deque[tuple[trip_reader.TripChunk, Future[np.ndarray]]] = deque()
        for chunk in chunks:
            scoring.append((chunk, pool.submit(probabilities, chunk)))
            if len(scoring) == MODEL_THREADS:
                done, future = scoring.popleft()
                yield done, future.result()
        for done, future in scoring:
            yield done, future.result()


def _read_ahead(chunks: Iterator[trip_reader.TripChunk]) -> Iterator[trip_reader.TripChunk]:
    """Yield chunks while a thread reads and parses the next one, so reading overlaps the model's work."""
    with closing(chunks), ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as reader:
        upcoming = reader.submit(next, chunks, None)
        while (chunk := upcoming.result()) is not None:
            upcoming = reader.submit(next, chunks, None)
            yield chunk


@contextmanager
def _table_writer(path: Path, suffix: str | None, schema: pa.Schema) -> Iterator[Any]:
    """A streaming CSV (`.csv`, `.csv.gz`) or Parquet (`.parquet`) writer."""
    with pa.OSFile(str(path), "wb") as file:
        sink = pa.CompressedOutputStream(file, "gzip") if suffix == ".csv.gz" else file
        writer = (
            pq.ParquetWriter(sink, schema, compression="zstd")
            if suffix == ".parquet"
            else pa_csv.CSVWriter(sink, schema)
        )
        with closing(sink), closing(writer):  # the writer finishes first
            yield writer


def _prediction_table(trip_ids: pd.Series, labels: np.ndarray, proba: np.ndarray, model: LoadedModel) -> pa.Table:
    count = len(trip_ids)
    return pa.table(
        [
            pa.array(trip_ids.astype("str"), type=pa.large_string(), from_pandas=True),
            pa.array(labels, type=pa.string()),
            pa.array(np.round(proba * 100, 2), type=pa.float64()),
            pa.repeat(pa.scalar(model.name), count),
            pa.repeat(pa.scalar(model.version), count),
        ],
        schema=PREDICTION_SCHEMA,
    )


def _reject_table(source: str, rejects: pd.DataFrame) -> pa.Table:
    count = len(rejects)
    return pa.table(
        [
            pa.repeat(pa.scalar(source), count),
            pa.array(rejects["trip_id"].astype("str"), type=pa.large_string(), from_pandas=True),
            pa.array(rejects["reason"].astype("str"), type=pa.string(), from_pandas=True),
        ],
        schema=REJECT_SCHEMA,
    )


# --- Jobs for the web service -----------------------------------------------------------------------

JOB_ID = re.compile(r"[0-9a-f]{32}")
FINISHED = ("succeeded", "failed")
JOB_NICENESS = 10  # a job yields the CPU to the web workers, so /predict keeps answering
BATCH_BODY = '{"input": "<path under BATCH_ROOT, or s3:// URI under BATCH_S3_PREFIX>", "output": "<optional, alike>"}'


class JobRefused(Exception):
    """A batch request the service refuses; predict.py renders it as its JSON error."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


class JobNotStarted(RuntimeError):
    """The operating system refused to start a job's process."""


def jobs_dir(settings: Settings) -> Path:
    return Path(settings.batch_state_dir) / "jobs"


def checked_location(settings: Settings, value: Any, field: str) -> str:
    """`value` if the service may use it: an s3:// URI under BATCH_S3_PREFIX, or a path under BATCH_ROOT.

    A relative path is taken from BATCH_ROOT; symlinks and `..` are resolved before the check, so neither
    can lead outside it. An S3 key with a `.` or `..` segment is refused, as some S3-compatible stores
    resolve them.
    """
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise JobRefused(400, "INVALID_PARAMETER_VALUE", f"{field} must be a path or an s3:// URI", field)
    if storage.is_s3(value):
        bucket, key = storage.split_s3(value)
        if not bucket or not key or {".", ".."} & set(key.split("/")):
            raise JobRefused(400, "INVALID_PARAMETER_VALUE", f"{field} must be s3://bucket/key", field)
        if not settings.batch_s3_prefix:
            message = f"{field}: this service reads and writes no s3:// location (no BATCH_S3_PREFIX)"
            raise JobRefused(403, "PERMISSION_DENIED", message, field)
        prefix = settings.batch_s3_prefix.rstrip("/") + "/"
        if not value.startswith(prefix):
            raise JobRefused(403, "PERMISSION_DENIED", f"{field} is outside {prefix} (BATCH_S3_PREFIX)", field)
        return value
    if "://" in value:
        raise JobRefused(
            400, "INVALID_PARAMETER_VALUE", f"{field}: only s3:// URIs and paths under the batch root", field
        )
    if settings.batch_root is None:
        raise JobRefused(
            403, "PERMISSION_DENIED", f"{field}: this service reads no local files (no BATCH_ROOT); use s3://", field
        )
    root = Path(settings.batch_root).resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise JobRefused(403, "PERMISSION_DENIED", f"{field} is outside the batch root", field)
    return str(path) + ("/" if value.endswith("/") else "")


def location_pattern(suffixes: Sequence[str], folders: bool = False) -> str:
    """The locations `checked_location` lets through that end with one of `suffixes` (any case), or with / for
    `folders`, as a JSON Schema pattern: an s3:// URI or a path. Where it is stricter than the checks, the
    document says so: a path has no `:` at all (the check refuses `://`), a folder of an S3 key does not start
    with `.` (the check refuses `.` and `..`), and a folder ends with / (the check takes an existing one too)."""
    bucket, folder = rf"{storage.S3_SCHEME}[^/\x00]+/", r"([^/.\x00][^/\x00]*)?/"
    named = rf"({bucket}({folder})*[^/\x00]*|[^:\x00]*)({'|'.join(any_case(suffix) for suffix in suffixes)})"
    return rf"^({named}|{bucket}({folder})+|[^:\x00]*/)$" if folders else f"^{named}$"


INPUT_PATTERN = location_pattern(trip_reader.INPUT_SUFFIXES)
OUTPUT_PATTERN = location_pattern(OUTPUT_SUFFIXES, folders=True)


def submit_job(settings: Settings, body: Any, model: LoadedModel) -> dict[str, Any]:
    """Check a `POST /predict/batch` body and start its job: a detached `batch.py score` process.

    The process scores with the model version this worker serves and keeps the job's state in
    `<BATCH_STATE_DIR>/jobs/<id>.json`, where any worker finds it. Returns that state.
    """
    if not isinstance(body, Mapping):
        raise JobRefused(400, "BAD_REQUEST", f"the body must be {BATCH_BODY}")
    unknown = sorted(set(body) - {"input", "output"})
    if unknown:
        raise JobRefused(400, "INVALID_PARAMETER_VALUE", f"unknown field; the body is {BATCH_BODY}", unknown[0])
    input_location = checked_location(settings, body.get("input"), "input")
    if trip_reader.input_suffix(input_location) is None:
        suffixes = ", ".join(trip_reader.INPUT_SUFFIXES)
        raise JobRefused(400, "INVALID_PARAMETER_VALUE", f"input must be a {suffixes} file", "input")
    if not storage.is_s3(input_location) and not os.path.isfile(input_location):  # False for a name too long
        raise JobRefused(404, "RESOURCE_DOES_NOT_EXIST", "input: no such file under the batch root", "input")
    output = None if body.get("output") is None else checked_location(settings, body["output"], "output")
    try:
        output_location = resolve_output(input_location, output)
    except ValueError:  # its text names the resolved path, which an answer must not show
        raise JobRefused(400, "INVALID_PARAMETER_VALUE", f"output {OUTPUT_RULE}", "output") from None
    if output_location == input_location:
        raise JobRefused(400, "INVALID_PARAMETER_VALUE", "output must not be the input", "output")

    job_id = uuid.uuid4().hex
    folder = jobs_dir(settings)
    status_path = folder / f"{job_id}.json"
    status = {
        "job_id": job_id,
        "status": "starting",
        "input": input_location,
        "output": output_location,
        "rejects": rejects_location(output_location),
        "model": model.describe(),
        "submitted_at": _now(),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # The count and the start are one step for every worker of the host.
        with exclusive_lock(folder / ".submit.lock"):
            running = running_jobs(folder)
            if running >= settings.max_batch_jobs:
                message = f"{running} batch jobs are running, the most at once (MAX_BATCH_JOBS); retry later"
                raise JobRefused(503, "TEMPORARILY_UNAVAILABLE", message)
            _write_json(status_path, status)
            process = _start_job(settings, model, input_location, output_location, status_path)
    except JobNotStarted as error:
        _write_json(status_path, {**status, "status": "failed", "finished_at": _now(), "error": str(error)})
        raise JobRefused(503, "TEMPORARILY_UNAVAILABLE", f"{error}; retry later") from None
    except OSError as error:
        message = f"batch jobs cannot be recorded: BATCH_STATE_DIR is not writable ({error.strerror})"
        raise JobRefused(503, "TEMPORARILY_UNAVAILABLE", message) from None
    threading.Thread(target=_supervise, args=(process, status_path), name=f"job-{job_id}", daemon=True).start()
    return _as_shown(settings, status)


def _start_job(
    settings: Settings, model: LoadedModel, input_location: str, output_location: str, status_path: Path
) -> subprocess.Popen:
    """The job's detached `batch.py score` process; its pid goes beside the status file (`running_jobs`)."""
    command = [sys.executable, str(Path(__file__).resolve()), "score", input_location, "--output", output_location]
    command += ["--model-version", model.version, "--status-file", str(status_path), "--nice", str(JOB_NICENESS)]
    with open(status_path.with_suffix(".log"), "ab") as job_log:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=job_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not stopped with the worker that started it
                env={**os.environ, **settings.to_env()},
            )
        except OSError as error:  # out of processes or memory: not the state folder's fault
            raise JobNotStarted(f"the job's process could not start ({error.strerror})") from error
    status_path.with_suffix(".pid").write_text(str(process.pid))
    return process


def running_jobs(folder: Path) -> int:
    """Jobs whose process is alive and has not recorded an outcome. A process counts by its pid file, so a job
    whose worker was replaced (nobody left to reap it) still counts while it runs, and not after."""
    running = 0
    for pid_file in folder.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), 0)
            finished = json.loads(pid_file.with_suffix(".json").read_text())["status"] in FINISHED
        except (OSError, ValueError, KeyError):  # gone, or a file being replaced
            continue
        running += not finished
    return running


def _supervise(process: subprocess.Popen, status_path: Path) -> None:
    """Reap a job's process, and record a failure it could not record itself (killed, out of memory)."""
    exit_code = process.wait()
    status_path.with_suffix(".pid").unlink(missing_ok=True)  # reaped: no longer counted (running_jobs)
    status = json.loads(status_path.read_text())
    if status["status"] not in FINISHED:
        error = f"the job's process ended with exit code {exit_code} before it finished"
        _write_json(status_path, {**status, "status": "failed", "finished_at": _now(), "error": error})


def job_status(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """The state of a job, or None if there is no such job."""
    if not JOB_ID.fullmatch(job_id):
        return None
    try:
        return _as_shown(settings, json.loads((jobs_dir(settings) / f"{job_id}.json").read_text()))
    except FileNotFoundError:
        return None


def _as_shown(settings: Settings, document: dict[str, Any]) -> dict[str, Any]:
    """A job's state as the API shows it: local paths relative to BATCH_ROOT, as requests give them, in every
    field and message. The job works with resolved paths; where BATCH_ROOT is on the server is not the
    client's business."""
    if settings.batch_root is None:
        return document
    root = str(Path(settings.batch_root).resolve()) + os.sep

    def relative(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(root, "")
        if isinstance(value, dict):
            return {key: relative(item) for key, item in value.items()}
        if isinstance(value, list):
            return [relative(item) for item in value]
        return value

    return relative(document)


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Replace `path` atomically, so a reader in another process never sees half a document."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    partial.write_text(json.dumps(document, indent=1))
    os.replace(partial, path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobStatusFile:
    """The job's side of its status file: running, progress at most once a second, then the outcome."""

    def __init__(self, path: Path) -> None:
        self.path, self.last_write = path, 0.0

    def update(self, **changes: Any) -> None:
        current = json.loads(self.path.read_text()) if self.path.exists() else {}
        _write_json(self.path, {**current, **changes})
        self.last_write = time.monotonic()

    def progress(self, rows: int, bytes_read: int, size: int) -> None:
        if time.monotonic() - self.last_write >= 1.0:
            self.update(rows_done=rows, progress=round(bytes_read / size, 3) if size else None)


# --- Watching a folder or prefix --------------------------------------------------------------------

INTERVAL = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
SECONDS_PER_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """`30s`, `10m`, `1h`, `1d` (or plain seconds) as seconds."""
    match = INTERVAL.fullmatch(text.strip().lower())
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval such as 30s, 10m, 1h or 1d")
    return float(match[1]) * SECONDS_PER_UNIT[match[2]]


def input_files(source: str, settings: Settings) -> list[storage.StoredFile]:
    """The trip files under a folder or prefix: readable suffixes, not results of `score`."""
    return [
        found
        for found in storage.list_files(source, settings)
        if trip_reader.input_suffix(name := storage.name_of(found.location)) and not is_batch_output(name)
    ]


class WatchState:
    """What `watch` has scored: location -> fingerprint (size and mtime, or the S3 ETag), and the outcome.

    Saved after every file, atomically, so a restart neither scores a file again nor misses one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = json.loads(path.read_text())["files"] if path.exists() else {}

    def is_done(self, found: storage.StoredFile) -> bool:
        return self.files.get(found.location, {}).get("fingerprint") == found.fingerprint

    def pending(self, found: list[storage.StoredFile]) -> list[storage.StoredFile]:
        """What to score now, oldest first: on the first run the newest file; after that every file not done
        that is at least as new as the newest one done (what arrived while `watch` was down included)."""
        new = sorted(
            (item for item in found if not self.is_done(item)), key=lambda item: (item.modified, item.location)
        )
        if not self.files:
            return new[-1:]
        newest_done = max(record["modified"] for record in self.files.values())
        return [item for item in new if item.modified >= newest_done]

    def record(self, found: storage.StoredFile, outcome: dict[str, Any]) -> None:
        self.files[found.location] = {"fingerprint": found.fingerprint, "modified": found.modified, **outcome}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(self.path, {"files": self.files})


def watch(
    settings: Settings,
    source: str,
    every: float,
    state: WatchState,
    output: str | None = None,
    evaluate: bool = False,
    min_roc_auc: float | None = None,
    max_cycles: int | None = None,
) -> None:
    """Score what is new under `source`, sleep `every` seconds, repeat (`max_cycles` times, or forever)."""
    cycle = 0
    while True:
        _watch_once(settings, source, state, output, evaluate, min_roc_auc)
        cycle += 1
        if max_cycles is not None and cycle >= max_cycles:
            return
        time.sleep(every)


def _watch_once(
    settings: Settings,
    source: str,
    state: WatchState,
    output: str | None,
    evaluate: bool,
    min_roc_auc: float | None,
) -> None:
    try:
        pending = state.pending(input_files(source, settings))
    except Exception:  # the store may be down for a while: try again next cycle
        log.exception("cannot list %s", source)
        return
    if not pending:
        log.info("nothing new under %s", source)
        return
    model = load_production_model(settings)  # each cycle, so a newly promoted version takes over
    for found in pending:
        try:
            summary = score_file(settings, found.location, resolve_output(found.location, output), model)
        except Exception:  # one unreadable file must not stop the watch; it is tried again next cycle
            log.exception("scoring %s failed", found.location)
            continue
        print(summary.line(), flush=True)
        outcome: dict[str, Any] = {"scored_at": _now(), "summary": summary.as_dict()}
        if evaluate:
            outcome["evaluation"] = _evaluate_in_watch(settings, found.location, model, min_roc_auc)
        state.record(found, outcome)


def _evaluate_in_watch(
    settings: Settings, location: str, model: LoadedModel, min_roc_auc: float | None
) -> dict[str, Any]:
    import monitoring  # MLflow's run logging and matplotlib, only when evaluating

    try:
        result = monitoring.evaluate_file(settings, location, model, _floor(settings, min_roc_auc))
    except monitoring.NoLabels:
        log.info("%s has no labels: not evaluated", location)
        return {"evaluated": False}
    except Exception:
        log.exception("evaluating %s failed", location)
        return {"evaluated": False, "error": True}
    if not result.passed:
        log.error("ALERT %s: %s (MLflow run %s)", location, result.message, result.run_id)
    return {"evaluated": True, "passed": result.passed, "run_id": result.run_id, "message": result.message}


def _floor(settings: Settings, min_roc_auc: float | None) -> float:
    return settings.eval_min_roc_auc if min_roc_auc is None else min_roc_auc


# --- Command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score one file")
    score.add_argument("input", help="a local path or s3:// URI (.csv, .csv.gz, .zip, .parquet)")
    score.add_argument("--output", help="where to write (.csv, .csv.gz, .parquet, or a folder/ prefix)")
    score.add_argument("--model-version", help="score with this version, not the Production one")
    score.add_argument("--status-file", type=Path, help="a job's status JSON to keep up to date (the service's)")
    score.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by N")

    evaluate = commands.add_parser("evaluate", help="evaluate the Production model on a labelled file")
    evaluate.add_argument("input", help="a labelled local path or s3:// URI")
    evaluate.add_argument("--min-roc-auc", type=float, help="fail below this (default EVAL_MIN_ROC_AUC, 0.6)")

    watcher = commands.add_parser("watch", help="score each new file under a folder or S3 prefix")
    watcher.add_argument("source", help="a local folder or s3://bucket/prefix/")
    watcher.add_argument("--every", type=parse_interval, required=True, help="how long to sleep: 30s, 10m, 1h")
    watcher.add_argument("--output", help="a folder or s3:// prefix for the results (default: beside each input)")
    watcher.add_argument("--evaluate", action="store_true", help="also evaluate each new labelled file")
    watcher.add_argument("--min-roc-auc", type=float, help="the evaluation's floor (default EVAL_MIN_ROC_AUC)")
    watcher.add_argument("--state-file", type=Path, help="default: <BATCH_STATE_DIR>/watch-state.json")
    watcher.add_argument("--max-cycles", type=int, help="stop after N cycles (default: never)")
    return parser


def _score_command(settings: Settings, args: argparse.Namespace) -> int:
    os.nice(args.nice)
    job = JobStatusFile(args.status_file) if args.status_file else None
    if job is not None:
        job.update(status="running", pid=os.getpid(), host=socket.gethostname(), started_at=_now())
    try:
        model = (
            load_model_version(settings, args.model_version) if args.model_version else load_production_model(settings)
        )
        with tqdm(unit="B", unit_scale=True, disable=not sys.stderr.isatty(), desc="scoring") as bar:

            def on_progress(rows: int, bytes_read: int, size: int) -> None:
                bar.total = size
                bar.update(bytes_read - bar.n)
                bar.set_postfix(rows=f"{rows:,}", refresh=False)
                if job is not None:
                    job.progress(rows, bytes_read, size)

            summary = score_file(settings, args.input, args.output, model, on_progress)
    except BaseException as error:
        if job is not None:
            message = str(error) if isinstance(error, Exception) else "stopped before it finished"
            job.update(status="failed", finished_at=_now(), error=message)
        raise
    if job is not None:
        job.update(
            status="succeeded",
            finished_at=_now(),
            rows_done=summary.rows,
            progress=1.0,
            summary=summary.as_dict(),
            peak_rss_mb=_peak_rss_mb(),
        )
    print(summary.line())
    return 0


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux's VmHWM), for sizing the service's memory; None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def _evaluate_command(settings: Settings, args: argparse.Namespace) -> int:
    import monitoring

    model = load_production_model(settings)
    try:
        result = monitoring.evaluate_file(settings, args.input, model, _floor(settings, args.min_roc_auc))
    except monitoring.NoLabels as error:
        print(f"batch.py evaluate: {error}", file=sys.stderr)
        return 2
    metrics = result.metrics
    print(
        f"{args.input}: model {model.name} version {model.version} on {metrics['labelled_rows']:,.0f} labelled "
        f"trips: {result.message}; Member share {metrics['member_share_predicted']:.1%} predicted, "
        f"{metrics['member_share_observed']:.1%} observed; run {result.run_id} in {result.experiment!r}"
    )
    if not result.passed:
        print(f"batch.py evaluate: FAILED: {result.message}", file=sys.stderr)
        return 1
    return 0


def _watch_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.output is not None and not (args.output.endswith("/") or Path(args.output).is_dir()):
        print("batch.py watch: --output must be a folder or an s3:// prefix ending with /", file=sys.stderr)
        return 2
    state = WatchState(args.state_file or Path(settings.batch_state_dir) / "watch-state.json")
    watch(settings, args.source, args.every, state, args.output, args.evaluate, args.min_roc_auc, args.max_cycles)
    return 0


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM (docker stop) ends the run like Ctrl-C: partial outputs are removed, a job records it."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    settings = Settings.from_env()
    commands = {"score": _score_command, "evaluate": _evaluate_command, "watch": _watch_command}
    try:
        return commands[args.command](settings, args)
    except (ValueError, OSError, LookupError, ModelUnavailable) as error:  # no model; a file missing or unreadable
        print(f"batch.py {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
