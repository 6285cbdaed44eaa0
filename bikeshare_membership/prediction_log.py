"""The prediction log: every trip the service answered, as Parquet files under `PREDICTION_LOG`.

With `PREDICTION_LOG` set (a local folder or an `s3://bucket/prefix/`), each answered trip becomes one row:
the request id, when it was answered, the trip as validated (schema.parse_request_trip's fields, the trip id
as text), the model name and version that answered, `proba` exactly as answered (percent, rounded), the
unrounded `member_probability`, and `membership`. No client address and no header other than the request id
is kept. `batch.py evaluate --predictions` joins these rows with a labelled City file (live_monitoring.py).

Layout: `<PREDICTION_LOG>/date=YYYY-MM-DD/part-<pid>-<seq>-<token>.parquet`, partitioned by the UTC date the
trip was answered (Hive style: pandas, pyarrow.dataset and Spark read the folder or prefix as one table with
a `date` column). `token` is random per process: pids repeat across hosts and container restarts.

Off the request path: the request recorder's thread (recorder.py) appends each answered request's trips to a
queue, with the shadow's scores of them if there is a shadow (shadow.py).
A thread in each worker turns the queue into Arrow batches every FLUSH_SECONDS and writes a file when the
rows held reach ROLL_ROWS or the oldest is PREDICTION_LOG_ROLL_SECONDS old. A file is published whole: a
local one through storage.atomic_path (a hidden partial file renamed into place; readers skip hidden files),
an S3 one by uploading a finished local file.

What can be lost: a worker that exits (SIGTERM, max_requests, a reload of Gunicorn) writes everything it holds
first (gunicorn.conf.py `worker_exit`); a worker killed with SIGKILL loses the rows it held, at most
PREDICTION_LOG_ROLL_SECONDS (plus FLUSH_SECONDS) of its answers and never more than ROLL_ROWS trips.

When the destination fails: the rows are kept and the write retried with backoff (1 s doubling to 10 s);
requests never wait for it. At most PREDICTION_LOG_MAX_PENDING trips are held per worker: trips answered
beyond that are dropped and counted in `bikeshare_prediction_log_dropped_total`. Writing resumes, oldest rows
first, when the destination answers again; an exiting worker that cannot write counts what it held as dropped.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prometheus_client import Counter

from bikeshare_membership import storage
from bikeshare_membership.config import Settings
from bikeshare_membership.schema import RequestTrips, membership, percent, trip_percent

if TYPE_CHECKING:
    from bikeshare_membership.model_store import LoadedModel
    from bikeshare_membership.shadow import ShadowScores

FLUSH_SECONDS = 0.1  # how often the thread turns queued answers into Arrow batches (short, so each is brief)
ROLL_ROWS = 100_000  # a file holds at most this many trips (about 4 MB of Parquet)
RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0, 10.0)  # after the 1st, 2nd, ... failed write in a row

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("answered_at", pa.timestamp("us", tz="UTC")),
        ("trip_id", pa.string()),
        ("trip_start_time", pa.timestamp("ms")),  # Toronto time, as the schema reads it
        ("trip_stop_time", pa.timestamp("ms")),
        ("trip_duration_seconds", pa.float64()),
        ("from_station_id", pa.float64()),
        ("from_station_name", pa.string()),
        ("to_station_id", pa.float64()),
        ("to_station_name", pa.string()),
        ("user_type", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("proba", pa.float64()),  # as answered: P(Member) in percent, rounded to 2 decimals
        ("member_probability", pa.float64()),  # the model's P(Member), unrounded
        ("membership", pa.string()),
        # The shadow challenger (shadow.py), null without one or where it failed: its version, P(Member) in
        # percent rounded as an answer would be, and unrounded.
        ("shadow_model_version", pa.string()),
        ("shadow_proba", pa.float64()),
        ("shadow_member_probability", pa.float64()),
    ]
)
TRIP_COLUMNS = [
    "trip_start_time",
    "trip_stop_time",
    "trip_duration_seconds",
    "from_station_id",
    "from_station_name",
    "to_station_id",
    "to_station_name",
    "user_type",
]

DROPPED = Counter(
    "bikeshare_prediction_log_dropped",
    "Answered trips not written to the prediction log: over PREDICTION_LOG_MAX_PENDING, or held at exit",
)
WRITTEN = Counter("bikeshare_prediction_log_written", "Answered trips written to the prediction log")

log = logging.getLogger(__name__)


class Answered(NamedTuple):
    """What a request keeps until the writer converts it."""

    request_id: str
    answered_at: float  # epoch seconds
    model_name: str
    model_version: str
    trips: RequestTrips
    probabilities: Sequence[float]
    shadow: ShadowScores | None


def _positions(repeats: list[int]) -> np.ndarray:
    """[2, 1] -> [0, 0, 1]: each request's index once per trip it answered."""
    return np.repeat(np.arange(len(repeats)), repeats)


class PredictionLog:
    """One worker's writer of the prediction log; `keep` on the request recorder's thread, the rest on its
    own."""

    def __init__(self, settings: Settings) -> None:
        if not settings.prediction_log:
            raise ValueError("PREDICTION_LOG is not set")
        self.settings = settings
        self.location: str = settings.prediction_log
        self.roll_seconds = settings.prediction_log_roll_seconds
        self.max_pending = settings.prediction_log_max_pending
        self.pending: deque[Answered] = deque()
        # Each counter has one writer, so no update is lost between threads: `kept` is the recorder's,
        # `released` (written, or given up at exit) the writer's.
        self.kept = self.released = 0
        self.batches: list[pa.RecordBatch] = []
        self.held_rows = 0
        self.oldest: float | None = None  # time.monotonic() when the oldest held row was converted
        self.failures = 0
        self.retry_at = 0.0
        self.sequence = 0
        self.token = os.urandom(4).hex()
        self.writing = threading.Lock()  # one writer at a time: the thread, or the exiting worker

    # --- The request path -------------------------------------------------------------------------------

    def keep(
        self,
        request_id: str,
        answered_at: float,
        model: LoadedModel,
        trips: RequestTrips,
        probabilities: Sequence[float],
        shadow: ShadowScores | None = None,
    ) -> None:
        """Queue a request's answered trips (validated, with their probabilities, in the order of its answers;
        `shadow`: the shadow's scores of them); drop and count them if the worker already holds
        PREDICTION_LOG_MAX_PENDING (counted at once: the writer may be stuck on a destination that does not
        answer)."""
        count = len(trips)
        if self.kept - self.released + count > self.max_pending:
            DROPPED.inc(count)
            return
        self.kept += count
        self.pending.append(Answered(request_id, answered_at, model.name, model.version, trips, probabilities, shadow))

    # --- The writer ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Write from a thread of this process from now on (after the fork: a new token, a new sequence)."""
        self.token = os.urandom(4).hex()
        threading.Thread(target=self._write_forever, name="prediction-log", daemon=True).start()
        atexit.register(self.close)  # `python predict.py`; a Gunicorn worker has closed it already (worker_exit)

    def _write_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:  # the thread must outlive one bad batch
                log.exception("prediction log: unexpected error")

    def flush(self, force: bool = False) -> None:
        """Convert what is queued; write a file if one is due (or, with `force`, whatever is held)."""
        with self.writing:
            self._convert()
            now = time.monotonic()
            due = self.held_rows >= ROLL_ROWS or (self.oldest is not None and now - self.oldest >= self.roll_seconds)
            if self.held_rows and (force or (due and now >= self.retry_at)):
                self._write_held(give_up=force)

    def close(self) -> None:
        """What an exiting worker does: write every row it holds, once; what cannot be written is counted
        as dropped."""
        self.flush(force=True)

    def _convert(self) -> None:
        taken: list[Answered] = []
        try:
            while True:  # popleft is atomic: requests append meanwhile
                taken.append(self.pending.popleft())
        except IndexError:
            pass
        if not taken:
            return
        # Column by column with comprehensions, and Arrow for the rest (NaN -> null, the timestamps): a few
        # microseconds a trip on the writer's thread, which holds the interpreter meanwhile.
        repeats = [len(request.trips) for request in taken]
        positions = _positions(repeats)  # each request's row, once per trip
        trip_columns = RequestTrips.joined([request.trips for request in taken]).columns
        probabilities = np.concatenate([request.probabilities for request in taken])
        shadow_versions = [None if request.shadow is None else request.shadow["version"] for request in taken]
        shadow_probabilities = [
            probability
            for request in taken
            for probability in (request.shadow["probabilities"] if request.shadow else [None] * len(request.trips))
        ]
        columns: dict[str, Any] = {
            "request_id": pa.array([request.request_id for request in taken], pa.string()).take(positions),
            "answered_at": pa.array(
                (np.repeat([request.answered_at for request in taken], repeats) * 1e6).astype("int64")
            ),
            "trip_id": [None if trip_id is None else str(trip_id) for trip_id in trip_columns["trip_id"]],
            "model_name": pa.array([request.model_name for request in taken], pa.string()).take(positions),
            "model_version": pa.array([request.model_version for request in taken], pa.string()).take(positions),
            "proba": percent(probabilities),  # as answered
            "member_probability": probabilities,
            "membership": membership(probabilities).tolist(),
            "shadow_model_version": pa.array(shadow_versions, pa.string()).take(positions),
            "shadow_proba": [None if value is None else trip_percent(value) for value in shadow_probabilities],
            "shadow_member_probability": shadow_probabilities,
        }
        for name in TRIP_COLUMNS:
            columns[name] = pa.array(trip_columns[name], SCHEMA.field(name).type, from_pandas=True)
        columns["answered_at"] = columns["answered_at"].cast(SCHEMA.field("answered_at").type)
        batch = pa.RecordBatch.from_pydict({name: columns[name] for name in SCHEMA.names}, schema=SCHEMA)
        self.batches.append(batch)
        self.held_rows += batch.num_rows
        if self.oldest is None:
            self.oldest = time.monotonic()

    def _write_held(self, give_up: bool) -> None:
        table = pa.Table.from_batches(self.batches, SCHEMA)
        dates = pc.strftime(table["answered_at"], format="%Y-%m-%d")
        done: list[str] = []
        try:
            for date in pc.unique(dates).to_pylist():
                part = table.filter(pc.equal(dates, date))
                self._write_file(date, part)
                done.append(date)
                WRITTEN.inc(part.num_rows)
                self.released += part.num_rows
        except Exception as error:  # OSError, boto3's errors, ...: whatever the destination raises
            self._failed(error, table.filter(pc.invert(pc.is_in(dates, pa.array(done, pa.string())))), give_up)
            return
        if self.failures:
            log.info("prediction log: writing to %s again after %d failed attempts", self.location, self.failures)
        self.batches, self.held_rows, self.oldest = [], 0, None
        self.failures, self.retry_at = 0, 0.0

    def _failed(self, error: Exception, rest: pa.Table, give_up: bool) -> None:
        self.failures += 1
        if give_up:
            log.error("prediction log: %d answered trips not written to %s: %s", rest.num_rows, self.location, error)
            self._given_up(rest.num_rows)
            self.batches, self.held_rows, self.oldest = [], 0, None
            return
        self.batches, self.held_rows = rest.to_batches(), rest.num_rows
        wait = RETRY_SECONDS[min(self.failures, len(RETRY_SECONDS)) - 1]
        self.retry_at = time.monotonic() + wait
        if self.failures == 1 or self.failures % 20 == 0:
            log.warning(
                "prediction log: cannot write to %s (attempt %d; holding %d trips, retrying in %.0fs): %s",
                self.location,
                self.failures,
                self.held_rows,
                wait,
                error,
            )

    def _given_up(self, rows: int) -> None:
        DROPPED.inc(rows)
        self.released += rows

    def _write_file(self, date: str, table: pa.Table) -> None:
        self.sequence += 1
        name = f"date={date}/part-{os.getpid()}-{self.sequence:06d}-{self.token}.parquet"
        destination = storage.inside(self.location, name)
        if storage.is_s3(destination):
            bucket, key = storage.split_s3(destination)
            with tempfile.TemporaryDirectory(prefix="bikeshare-predictions-") as folder:
                path = Path(folder) / "part.parquet"
                pq.write_table(table, path)
                storage.s3_client(self.settings).upload_file(str(path), bucket, key)
            return
        with storage.atomic_path(Path(destination)) as partial:
            pq.write_table(table, partial)
