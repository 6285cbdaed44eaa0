"""Log records as JSON lines on stderr, one object per line: the service's own logs, Gunicorn's and MLflow's, in
every entry point (`configure`).

A record's `fields` (passed as `extra={"fields": {...}}`) become top-level keys. The line logged for every
request (recorder.py) is written by `write_info_lines`, in the same shape, without logging's machinery.
"""

from __future__ import annotations

import logging
import logging.config
import os
import select
from datetime import UTC, datetime
from typing import Any

import orjson

STDERR = 2  # the file descriptor, also when sys.stderr is replaced (tests capture it)
# For logging.config.dictConfig, and Gunicorn's `logconfig_dict` (gunicorn.conf.py).
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "bikeshare_membership.jsonlog.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {"gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False}},
}
# Loggers that MLflow, when imported, gives a handler of its own (its text format on stderr, not propagated).
MLFLOW_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")


def entry(created: float, level: str, logger: str, message: str, pid: int | None) -> dict[str, Any]:
    """The keys every line starts with."""
    return {
        "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": logger,
        "message": message,
        "pid": pid,
    }


class JsonFormatter(logging.Formatter):
    """time (UTC, ISO 8601), level, logger, message, pid, then the record's fields and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = entry(record.created, record.levelname, record.name, record.getMessage(), record.process)
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def write_info_lines(logger: str, message: str, lines: list[tuple[float, dict[str, Any]]]) -> None:
    """INFO lines, each (time created, fields), straight to stderr in the same shape as the records: for the
    lines logged per request, where logging's record, handler and lock would cost twice the line itself.

    Written in pieces of whole lines, each piece at most PIPE_BUF bytes where the lines allow: a pipe (a
    container's log driver) writes such a piece in one go, so lines of several workers never interleave.
    """
    pid, piece = os.getpid(), bytearray()
    for created, fields in lines:
        data = orjson.dumps(entry(created, "INFO", logger, message, pid) | fields, default=str) + b"\n"
        if piece and len(piece) + len(data) > select.PIPE_BUF:
            _write_all(piece)
            piece.clear()
        piece += data
    _write_all(piece)


def _write_all(data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(STDERR, view) :]


def configure() -> None:
    """JSON lines for every logger, Python's warnings included (as records of `py.warnings`). MLflow's handlers
    (imported before this runs, in every entry point) keep their levels and filters and write JSON lines too."""
    logging.config.dictConfig(LOGGING)
    logging.captureWarnings(True)
    for name in MLFLOW_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(JsonFormatter())
