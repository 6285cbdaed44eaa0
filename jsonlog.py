"""Log records as JSON lines, one object per line, for the service's own logs and Gunicorn's.

A record's `fields` (passed as `extra={"fields": {...}}`) become top-level keys: the per-request line
(predict.py) carries its request id, route, status and duration that way.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson


class JsonFormatter(logging.Formatter):
    """time (UTC, ISO 8601), level, logger, message, pid, then the record's fields and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: int = logging.INFO) -> None:
    """JSON lines on stderr for every logger, unless logging is configured already (Gunicorn's logconfig_dict)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)  # Python's warnings too, as log records
