"""Batch jobs for the web service: `POST /predict/batch` starts a detached process scoring a file
(batch_scoring.py), which writes its state to a JSON file under BATCH_STATE_DIR that any Gunicorn worker
reads (`job_status`). Locations are checked against BATCH_ROOT and BATCH_S3_PREFIX before anything runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, cast

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict

from bikeshare_membership import city_files, storage
from bikeshare_membership.batch_scoring import (
    OUTPUT_RULE,
    OUTPUT_SUFFIXES,
    BatchSummary,
    rejects_location,
    resolve_output,
)
from bikeshare_membership.config import Settings
from bikeshare_membership.errors import Refused
from bikeshare_membership.model_store import LoadedModel, ModelRef
from bikeshare_membership.schema import Timestamp, any_case, closed

JOB_ID = re.compile(r"[0-9a-f]{32}")
JobState = Literal["starting", "running", "succeeded", "failed"]
FINISHED: tuple[JobState, ...] = ("succeeded", "failed")
JOB_NICENESS = 10  # a job yields the CPU to the web workers, so /predict keeps answering
BATCH_BODY = '{"input": "<path under BATCH_ROOT, or s3:// URI under BATCH_S3_PREFIX>", "output": "<optional, alike>"}'


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
        raise Refused(400, "INVALID_PARAMETER_VALUE", f"{field} must be a path or an s3:// URI", field)
    if storage.is_s3(value):
        bucket, key = storage.split_s3(value)
        if not bucket or not key or {".", ".."} & set(key.split("/")):
            raise Refused(400, "INVALID_PARAMETER_VALUE", f"{field} must be s3://bucket/key", field)
        if not settings.batch_s3_prefix:
            message = f"{field}: this service reads and writes no s3:// location (no BATCH_S3_PREFIX)"
            raise Refused(403, "PERMISSION_DENIED", message, field)
        prefix = settings.batch_s3_prefix.rstrip("/") + "/"
        if not value.startswith(prefix):
            raise Refused(403, "PERMISSION_DENIED", f"{field} is outside {prefix} (BATCH_S3_PREFIX)", field)
        return value
    if "://" in value:
        raise Refused(400, "INVALID_PARAMETER_VALUE", f"{field}: only s3:// URIs and paths under the batch root", field)
    if settings.batch_root is None:
        raise Refused(
            403, "PERMISSION_DENIED", f"{field}: this service reads no local files (no BATCH_ROOT); use s3://", field
        )
    root = Path(settings.batch_root).resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise Refused(403, "PERMISSION_DENIED", f"{field} is outside the batch root", field)
    return str(path) + ("/" if value.endswith("/") else "")


def location_pattern(suffixes: Sequence[str], folders: bool = False) -> str:
    """The locations `checked_location` lets through that end with one of `suffixes` (any case), or with / for
    `folders`, as a JSON Schema pattern: an s3:// URI or a path. Where it is stricter than the checks, the
    document says so: a path has no `:` at all (the check refuses `://`), a folder of an S3 key does not start
    with `.` (the check refuses `.` and `..`), and a folder ends with / (the check takes an existing one too)."""
    bucket, folder = rf"{storage.S3_SCHEME}[^/\x00]+/", r"([^/.\x00][^/\x00]*)?/"
    named = rf"({bucket}({folder})*[^/\x00]*|[^:\x00]*)({'|'.join(any_case(suffix) for suffix in suffixes)})"
    return rf"^({named}|{bucket}({folder})+|[^:\x00]*/)$" if folders else f"^{named}$"


INPUT_PATTERN = location_pattern(city_files.INPUT_SUFFIXES)
OUTPUT_PATTERN = location_pattern(OUTPUT_SUFFIXES, folders=True)
LOCATION = "A path relative to BATCH_ROOT, or an s3:// URI."
LOCATION_PATTERN_NOTE = (
    "The pattern leaves out paths with a `:` and S3 folders starting with `.`; the service refuses only `://` "
    "in a path and `.` or `..` folders."
)


@with_config(ConfigDict(extra="forbid", json_schema_extra={"examples": [{"input": "trips.csv"}]}))
class BatchRequest(TypedDict):
    """A file of trips to score in the background, and where its predictions go."""

    input: Annotated[
        str,
        Field(
            pattern=INPUT_PATTERN,
            description="A trip file (CSV, gzip, zip or Parquet): a path under BATCH_ROOT (relative paths start "
            f"there) or an s3:// URI under BATCH_S3_PREFIX. {LOCATION_PATTERN_NOTE}",
        ),
    ]
    output: NotRequired[
        Annotated[
            Annotated[str, Field(pattern=OUTPUT_PATTERN)] | None,
            Field(
                description="Where the predictions go (.csv, .csv.gz, .parquet, or a folder ending in /); by default "
                f"beside the input as `<name>.predictions.csv`; not the input itself. {LOCATION_PATTERN_NOTE}"
            ),
        ]
    ]


@closed
class BatchJob(TypedDict):
    """A batch job: `starting`, `running` (with progress), `succeeded` (with the summary) or `failed` (with the
    error)."""

    job_id: Annotated[str, Field(pattern=f"^{JOB_ID.pattern}$")]
    status: JobState
    input: Annotated[str, Field(description=LOCATION)]
    output: Annotated[str, Field(description=LOCATION)]
    rejects: Annotated[str, Field(description=f"Where the rows that could not be read go. {LOCATION}")]
    model: ModelRef
    submitted_at: Timestamp
    started_at: NotRequired[Timestamp]
    finished_at: NotRequired[Timestamp]
    pid: NotRequired[int]
    host: NotRequired[str]
    rows_done: NotRequired[int]
    progress: NotRequired[Annotated[float, Field(ge=0, le=1)] | None]
    error: NotRequired[Annotated[str, Field(description="Why a failed job failed.")]]
    summary: NotRequired[BatchSummary]
    peak_rss_mb: NotRequired[float | None]


def submit_job(settings: Settings, body: Any, model: LoadedModel) -> BatchJob:
    """Check a `POST /predict/batch` body and start its job: a detached `batch.py score` process.

    The process scores with the model version this worker serves and keeps the job's state in
    `<BATCH_STATE_DIR>/jobs/<id>.json`, where any worker finds it. Returns that state.
    """
    if not isinstance(body, Mapping):
        raise Refused(400, "BAD_REQUEST", f"the body must be {BATCH_BODY}")
    unknown = sorted(set(body) - BatchRequest.__annotations__.keys())
    if unknown:
        raise Refused(400, "INVALID_PARAMETER_VALUE", f"unknown field; the body is {BATCH_BODY}", unknown[0])
    input_location = checked_location(settings, body.get("input"), "input")
    if city_files.input_suffix(input_location) is None:
        suffixes = ", ".join(city_files.INPUT_SUFFIXES)
        raise Refused(400, "INVALID_PARAMETER_VALUE", f"input must be a {suffixes} file", "input")
    if not storage.is_s3(input_location) and not os.path.isfile(input_location):  # False for a name too long
        raise Refused(404, "RESOURCE_DOES_NOT_EXIST", "input: no such file under the batch root", "input")
    output = None if body.get("output") is None else checked_location(settings, body["output"], "output")
    try:
        output_location = resolve_output(input_location, output)
    except ValueError:  # its text names the resolved path, which an answer must not show
        raise Refused(400, "INVALID_PARAMETER_VALUE", f"output {OUTPUT_RULE}", "output") from None
    if output_location == input_location:
        raise Refused(400, "INVALID_PARAMETER_VALUE", "output must not be the input", "output")

    job_id = uuid.uuid4().hex
    folder = jobs_dir(settings)
    status_path = folder / f"{job_id}.json"
    status: BatchJob = {
        "job_id": job_id,
        "status": "starting",
        "input": input_location,
        "output": output_location,
        "rejects": rejects_location(output_location),
        "model": model.describe(),
        "submitted_at": now(),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # The count and the start are one step for every worker of the host.
        with storage.exclusive_lock(folder / ".submit.lock"):
            running = running_jobs(folder)
            if running >= settings.max_batch_jobs:
                message = f"{running} batch jobs are running, the most at once (MAX_BATCH_JOBS); retry later"
                raise Refused(503, "TEMPORARILY_UNAVAILABLE", message)
            write_json(status_path, status)
            process = _start_job(settings, model, input_location, output_location, status_path)
    except JobNotStarted as error:
        write_json(status_path, {**status, "status": "failed", "finished_at": now(), "error": str(error)})
        raise Refused(503, "TEMPORARILY_UNAVAILABLE", f"{error}; retry later") from None
    except OSError as error:
        message = f"batch jobs cannot be recorded: BATCH_STATE_DIR is not writable ({error.strerror})"
        raise Refused(503, "TEMPORARILY_UNAVAILABLE", message) from None
    threading.Thread(target=_supervise, args=(process, status_path), name=f"job-{job_id}", daemon=True).start()
    return _as_shown(settings, status)


def _start_job(
    settings: Settings, model: LoadedModel, input_location: str, output_location: str, status_path: Path
) -> subprocess.Popen:
    """The job's detached `batch.py score` process (run as its module, so it needs no path to the script); its
    pid goes beside the status file (`running_jobs`)."""
    command = [sys.executable, "-m", "bikeshare_membership.batch_cli", "score", input_location]
    command += ["--output", output_location]
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
        write_json(status_path, {**status, "status": "failed", "finished_at": now(), "error": error})


def job_status(settings: Settings, job_id: str) -> BatchJob | None:
    """The state of a job, or None if there is no such job."""
    if not JOB_ID.fullmatch(job_id):
        return None
    try:
        return _as_shown(settings, json.loads((jobs_dir(settings) / f"{job_id}.json").read_text()))
    except FileNotFoundError:
        return None


def _as_shown(settings: Settings, document: BatchJob) -> BatchJob:
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

    return cast(BatchJob, relative(document))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobStatusFile:
    """The job's side of its status file: running, progress at most once a second, then the outcome."""

    def __init__(self, path: Path) -> None:
        self.path, self.last_write = path, 0.0

    def update(self, **changes: Any) -> None:
        current = json.loads(self.path.read_text()) if self.path.exists() else {}
        write_json(self.path, {**current, **changes})
        self.last_write = time.monotonic()

    def progress(self, rows: int, bytes_read: int, size: int) -> None:
        if time.monotonic() - self.last_write >= 1.0:
            self.update(rows_done=rows, progress=round(bytes_read / size, 3) if size else None)


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Replace `path` atomically, so a reader in another process never sees half a document."""
    with storage.atomic_path(path) as partial:
        partial.write_text(json.dumps(document, indent=1))
