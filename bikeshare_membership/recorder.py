"""Per request: an id, metrics and one JSON log line, as WSGI middleware around the Flask app.

Every request gets an id (a safe `X-Request-ID` it came with, else a new one), returned in `X-Request-ID`.
Once its response is sent, the request is kept as a record: its metrics (metrics.py) and its JSON line
(jsonlog.py) are written in batches, every FLUSH_SECONDS by a thread in each server process, or at once where
no thread was started (in-process tests). Written per request they delayed the client's next request even
though they ran after the answer was sent: the worker kept the core the client needed next (the figures are in
docs/performance.md). Batched, the request path only appends a record, and a batch takes one metrics write per
series and bucket and one write per 4 kB of lines.

A record not yet written when its process is killed (SIGKILL) is lost; a worker that exits (SIGTERM,
max_requests) writes its records first (gunicorn.conf.py `worker_exit`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from bikeshare_membership import jsonlog, metrics

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from bikeshare_membership.model_holder import ModelHolder
    from bikeshare_membership.model_store import LoadedModel
    from bikeshare_membership.prediction_log import PredictionLog
    from bikeshare_membership.schema import RequestTrips
    from bikeshare_membership.shadow import ShadowScores

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"  # the header as WSGI passes it; replaced by the id the request got
# POST /predict's (model, validated trips, their probabilities), in the answers' order: for the prediction metrics,
# the shadow and the prediction log
SCORED_ENVIRON = "bikeshare.scored"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_LOGGED_PATH = 256
# Beyond this many records waiting (the thread cannot write: stderr blocked, say), a request writes them itself
# and waits as it would without batching, rather than the records growing without bound.
MAX_PENDING = 10_000
# Short: a batch holds the interpreter while it is written, and a request arriving meanwhile waits for it.
FLUSH_SECONDS = 0.02

log = logging.getLogger(__name__)


class Record(NamedTuple):
    """A request once its response is sent: when, its log line, and for POST /predict the model that answered
    with each validated trip and its probability (SCORED_ENVIRON)."""

    created: float
    line: dict[str, Any]
    scored: tuple[LoadedModel, RequestTrips, list[float]] | None


class Answered(NamedTuple):
    """A POST /predict that answered trips, as the shadow and the prediction log take it."""

    request_id: str
    created: float
    model: LoadedModel
    trips: RequestTrips
    probabilities: list[float]


class RequestRecorder:
    """The middleware (`app.wsgi_app = RequestRecorder(app.wsgi_app, holder)`): ids and records."""

    def __init__(
        self, wsgi_app: WSGIApplication, holder: ModelHolder, prediction_log: PredictionLog | None = None
    ) -> None:
        self.wsgi_app, self.holder, self.prediction_log = wsgi_app, holder, prediction_log
        self.pending: deque[Record] = deque()
        self.flushing = False
        # One batch written at a time: a worker exiting waits for the batch the thread has taken and is writing,
        # which the exit would otherwise cut off, then writes what is left.
        self.writing = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        given = environ.get(REQUEST_ID_ENVIRON)
        request_id = given if given is not None and SAFE_REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
        environ[REQUEST_ID_ENVIRON] = request_id  # for the app's own log lines
        line = {"request_id": request_id, "method": environ["REQUEST_METHOD"]}
        line["path"] = environ.get("PATH_INFO", "")[:MAX_LOGGED_PATH]

        def start_with_id(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # Flask starts the response while its request is current: the route it matched, if any.
            routed = environ.get("werkzeug.request")
            line["endpoint"] = routed.url_rule.rule if routed and routed.url_rule else "unmatched"
            line["status"], line["seconds"] = int(status[:3]), time.perf_counter() - started
            headers.append((REQUEST_ID_HEADER, request_id))
            return start_response(status, headers, exc_info)

        body = self.wsgi_app(environ, start_with_id)
        return RecordedBody(body, functools.partial(self.keep, line, environ))

    def keep(self, line: dict[str, Any], environ: WSGIEnvironment) -> None:
        """The request's record, once its response is sent."""
        line["model_version"] = self.holder.model.version
        self.pending.append(Record(time.time(), line, environ.get(SCORED_ENVIRON)))
        if not self.flushing or len(self.pending) > MAX_PENDING:
            self.flush()

    def start_flushing(self) -> None:
        """Write the records every FLUSH_SECONDS from now on, from a thread of this process (after a fork)."""
        self.flushing = True
        threading.Thread(target=self._flush_forever, name="request-records", daemon=True).start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:  # the thread must outlive one bad batch, or records would pile up unwritten
                log.exception("could not write request records")

    def flush(self) -> None:
        """Write the records kept so far: metrics first, then the lines (a request's line means it is counted)."""
        with self.writing:
            self._write(self._taken())

    def _taken(self) -> list[Record]:
        records = []
        try:
            while True:  # popleft is atomic: requests append meanwhile
                records.append(self.pending.popleft())
        except IndexError:
            return records

    def _write(self, records: list[Record]) -> None:
        if not records:
            return
        metrics.requests_answered(
            [(line["endpoint"], line["method"], line["status"], line["seconds"]) for _, line, _ in records]
        )
        probabilities = [record.scored[2] for record in records if record.scored]
        if probabilities:
            metrics.trips_predicted(np.concatenate(probabilities))
        lines = []
        for created, line, _ in records:
            line["duration_ms"] = round(line.pop("seconds") * 1000, 3)
            lines.append((created, line))
        jsonlog.write_info_lines("predict.requests", "request", lines)
        if self.holder.shadow is None and self.prediction_log is None:
            return
        answered = [Answered(line["request_id"], created, *scored) for created, line, scored in records if scored]
        if answered:
            self._answered(answered)

    def _answered(self, answered: list[Answered]) -> None:
        """The shadow's scores of the answered trips, and their rows of the prediction log."""
        scores: list[ShadowScores] | None = None
        if self.holder.shadow is not None:
            try:
                scores = self.holder.shadow.score([request.trips for request in answered])
            except Exception:  # the prediction log's rows must not go with a shadow's failure
                log.exception("shadow: could not score answered trips")
            if scores is not None:
                metrics.shadow_compared(
                    [(request.model.version, request.probabilities) for request in answered], scores
                )
        if self.prediction_log is not None:
            for index, request in enumerate(answered):
                self.prediction_log.keep(*request, shadow=None if scores is None else scores[index])


class RecordedBody:
    """A response body that calls `sent` when the server closes it, after writing it (PEP 3333 `close`).
    Iterating it iterates the body itself (Werkzeug's ClosingIterator adds a Python call per chunk)."""

    __slots__ = ("body", "sent")

    def __init__(self, body: Iterable[bytes], sent: Callable[[], None]) -> None:
        self.body, self.sent = body, sent

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.sent()
