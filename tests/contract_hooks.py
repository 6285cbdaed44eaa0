"""Schemathesis hooks of test_contract.py, loaded by the schemathesis process through its config file.

JSON Schema describes one value at a time and knows no calendar, so three rules of a trip are beyond the Trip
schema; its descriptions state them in words instead:
- a timestamp names a real date and time: a pattern cannot count the days of a month (`2017-02-30`), and the
  slash forms' pattern, the reader's own, takes any one or two digits (`2/30/2017 25:00`);
- a slash date is read in the order either timestamp of the trip shows, else `date_order`: its day and month
  are only known together with the other timestamp (`13/1/2017` is day-first, and then so is `1/2/2017`);
- trip_stop_time is not before trip_start_time.
`positive_data_acceptance` fails a schema-valid trip that POST /predict refuses. A refusal for one of these
rules is dropped: a stop before the start, a slash timestamp not a valid date-time (read by the same pattern,
it was refused for its numbers), an ISO one whose date is not in the calendar. Every other stays a failure.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import schemathesis

TIMESTAMPS = ("trip_start_time", "trip_stop_time")


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Whether a failure stands: all do but a schema-valid trip refused for a rule JSON Schema cannot state."""
    if failure.code != "ST202" or case.operation.label != "POST /predict" or response.status_code != 400:
        return True
    error = response.json()["error"]
    if error["field"] not in TIMESTAMPS:
        return True
    if "is before trip_start_time" in error["message"]:
        return False
    if "is not a valid date-time" not in error["message"]:
        return True
    trip = case.body if error["item"] is None else case.body[error["item"]]
    text = trip[error["field"]].strip()
    return "/" not in text and _in_calendar(text[: len("2017-01-01")])


def _in_calendar(iso_date: str) -> bool:
    """Whether an ISO date (`2017-02-30`, which the pattern lets through) is one of the calendar's."""
    try:
        date.fromisoformat(iso_date)
    except ValueError:
        return False
    return True
