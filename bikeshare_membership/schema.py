"""The request schema and its validation: the 2017 export's nine fields, their types and texts, and how a
timestamp is read.

`REQUEST_SCHEMA` is the one definition of a trip: the service validates requests against it
(`parse_request_trip`), the API document describes it (openapi.py), and City files are mapped onto it
(city_files.py). The model takes the typed columns in `MODEL_INPUT_COLUMNS` (features.py).

How a slash date is read (`M/D/YYYY`, `D/M/YYYY`, `M/DD/YY ...`): the order a date shows is the order used.
A date whose first number is over 12 is day-first and one whose second number is over 12 is month-first.
For a trip, evidence from either of its two timestamps decides both; for a file, evidence from the whole
column decides every row. Only when nothing shows the order is a default used: for a request, the
`date_order` the client gives (`MDY` unless told `DMY`); for a file, its layout's (day-first for the 2017
Q1/Q2 layout, month-first for every later one). ISO 8601 is never ambiguous; a timestamp with a UTC offset
is converted to Toronto time, a naive one is taken as Toronto time already.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal, Union, cast
from zoneinfo import ZoneInfo

import msgspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ConfigDict, Field, with_config

from bikeshare_membership.stations import station_index

TORONTO = ZoneInfo("America/Toronto")

JsonType = Literal["integer", "number", "string", "null"]
_PYTHON_TYPES: Mapping[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
    "null": (type(None),),
}
_TYPE_PHRASES: Mapping[str, str] = {
    "integer": "a whole number",
    "number": "a number",
    "string": "a string",
    "null": "null",
}


MEMBER: Final = "Member"
CASUAL: Final = "Casual"
Membership = Literal["Member", "Casual"]  # a prediction's answer
# P(Member) at or above this is answered `Member`: proba is calibrated, so 0.5 means "more likely than not".
DECISION_THRESHOLD = 0.5


def membership(member_probability: np.ndarray) -> np.ndarray:
    """`Member` or `Casual` for each probability, at `DECISION_THRESHOLD`."""
    return np.where(member_probability >= DECISION_THRESHOLD, MEMBER, CASUAL)


def trip_membership(member_probability: float) -> Membership:
    """`membership` of one probability, without an array."""
    return MEMBER if member_probability >= DECISION_THRESHOLD else CASUAL


# Hundredths this close to a half may be a half that `percent * 100` rounded away: those are rounded by Python.
_NEAR_HALF = 1e-6


def percent(member_probability: np.ndarray) -> np.ndarray:
    """Each probability in percent, 2 decimals: `trip_percent` of each, bit for bit, as arrays.

    `rint(percent * 100) / 100` is that value wherever the product's rounding error cannot cross a half (IEEE
    division gives the double nearest to the hundredths, as Python's `round` does); the rare values near a half
    are rounded by Python itself. numpy's own `round` scales and rounds the same way without that care, so it
    differs in the last digit now and then.
    """
    percents = member_probability * 100
    hundredths = percents * 100
    rounded = np.rint(hundredths) / 100
    for index in (np.abs(hundredths - np.floor(hundredths) - 0.5) <= _NEAR_HALF).nonzero()[0]:
        rounded[index] = trip_percent(float(member_probability[index]))
    return rounded


def trip_percent(member_probability: float) -> float:
    """One probability in percent, 2 decimals, as the service answers it (Python's `round`)."""
    return round(member_probability * 100, 2)


LABELS = {
    "member": MEMBER,
    "annual member": MEMBER,
    "casual": CASUAL,
    "casual member": CASUAL,
}
MISSING_TEXT = {"", "null", "nullnull", "nan", "none"}

# --- The texts a request's strings may be, for the validator and for the API document ----------------

# One pattern for both readers: Python's `re` for a request's two texts, Arrow's RE2 for a file's columns.
_SLASH_TIMESTAMP_PATTERN = (
    r"^\s*(?P<first>\d{1,2})/(?P<second>\d{1,2})/(?P<year>\d{4}|\d{2})"
    r"[ T]+(?P<hour>\d{1,2}):(?P<minute>\d{2})(?::(?P<second_of_minute>\d{2}))?\s*$"
)
# The ISO 8601 forms the API document lists, all of which `datetime.fromisoformat` reads; it reads more (years
# 1 to 9999, week dates, other separators), but from 1000 to 2999 no UTC offset takes a time out of range.
_ISO_TIMESTAMP_PATTERN = (
    r"[12][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?)?"
)
_STATION_ID_TEXT = re.compile(r"[0-9]{1,18}")
_ASCII_SPACE = r"[ \t\n\v\f\r]"  # `\s` under re.ASCII; ECMA-262's `\s` is Unicode's
# The whole numbers the service's JSON reader (orjson) reads as integers; it reads larger ones as floats.
JSON_INTEGERS = (-(2**63), 2**64 - 1)


def any_case(word: str) -> str:
    """A pattern matching `word` (letters, spaces, dots) in any case, as `[Mm][Dd][Yy]`: JSON Schema's patterns
    take no flags."""
    return "".join(f"[{''.join(dict.fromkeys((character.upper(), character.lower())))}]" for character in word)


def _json_schema_pattern(pattern: str) -> str:
    r"""One of this module's patterns (Python's `re`, ASCII) in JSON Schema's dialect (ECMA-262), read alike
    by both: its groups unnamed, `\d` and `\s` spelled as the ASCII classes they stand for here."""
    return re.sub(r"\(\?P<\w+>", "(", pattern).replace(r"\d", "[0-9]").replace(r"\s", _ASCII_SPACE)


def _whole_text(*alternatives: str) -> str:
    """A JSON Schema pattern for a text that is one of `alternatives`, with spaces around it (stripped)."""
    return f"^{_ASCII_SPACE}*({'|'.join(alternatives)}){_ASCII_SPACE}*$"


_MISSING_WORDS = [any_case(text) for text in sorted(MISSING_TEXT)]
TIMESTAMP_PATTERN = f"{_whole_text(_ISO_TIMESTAMP_PATTERN)}|{_json_schema_pattern(_SLASH_TIMESTAMP_PATTERN)}"
STATION_ID_PATTERN = _whole_text(_STATION_ID_TEXT.pattern, *_MISSING_WORDS)
LABEL_PATTERN = _whole_text(*(any_case(label) for label in LABELS), *_MISSING_WORDS)


@dataclass(frozen=True)
class TripField:
    """One field of a request trip, declared once as data.

    `parse_request_trip` checks presence, JSON type and sign from these objects and openapi.py describes the
    request from them, so the validator and the API document cannot disagree. A required field is never
    nullable and an optional one always is: a missing field and a null are the same thing to the service.
    `pattern` and `min_length` show the document's readers the text a string value may be; they are built from
    the patterns and words the validator reads that text with, so it does not check them a second time.
    """

    name: str
    types: tuple[JsonType, ...]  # the JSON types accepted (booleans never are)
    description: str
    example: Any
    required: bool = False
    non_negative: bool = False
    pattern: str | None = None  # in JSON Schema's dialect (ECMA-262)
    min_length: int | None = None
    python_types: tuple[type, ...] = dc_field(init=False, repr=False, compare=False)
    type_error: str = dc_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.required == ("null" in self.types):
            raise ValueError(f"{self.name}: a required field must not be nullable, an optional one must be")
        phrases = [_TYPE_PHRASES[kind] for kind in self.types]
        listed = phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} or {phrases[-1]}"
        object.__setattr__(self, "python_types", tuple(t for kind in self.types for t in _PYTHON_TYPES[kind]))
        object.__setattr__(self, "type_error", f"must be {listed}, such as {self.example!r}")

    def json_schema(self) -> dict[str, Any]:
        """The field as a JSON Schema (OpenAPI 3.1) property."""
        schema: dict[str, Any] = {
            "type": list(self.types) if len(self.types) > 1 else self.types[0],
            "description": self.description,
            "examples": [self.example],
        }
        if "integer" in self.types:
            schema["minimum"], schema["maximum"] = JSON_INTEGERS
        if self.non_negative:
            schema["minimum"] = 0
        if self.pattern is not None:
            schema["pattern"] = self.pattern
        if self.min_length is not None:
            schema["minLength"] = self.min_length
        return schema


_MISSING_NOTE = "Blank, `NULL`, `NaN` or `None` text counts as missing."
# The request schema: the 2017 export's nine fields, in its column order. Unknown fields are ignored.
REQUEST_SCHEMA = (
    TripField("trip_id", ("integer", "string", "null"), "The trip's id, echoed back in the answer.", 712382),
    TripField(
        "trip_start_time",
        ("string",),
        "When the trip started, Toronto time: ISO 8601 (`2017-01-01T00:00:00`; with an offset, converted to "
        "Toronto time) or the City's slash forms `M/D/YYYY H:MM`, `D/M/YYYY H:MM`, `M/DD/YY HH:MM:SS`; a real "
        "date and time, which the pattern alone cannot say (it lets `2/30/2017 0:00` through). An ambiguous "
        "slash date follows what either timestamp of the trip shows, else `date_order`. The pattern lists ISO "
        "dates from year 1000 to 2999; the service reads the others too.",
        "1/1/2017 0:00",
        required=True,
        pattern=TIMESTAMP_PATTERN,
        min_length=len("2017-01-01"),  # the shortest form: an ISO date alone
    ),
    TripField(
        "trip_stop_time",
        ("string",),
        "When the trip ended, in the same forms as `trip_start_time`; not before it.",
        "1/1/2017 0:03",
        required=True,
        pattern=TIMESTAMP_PATTERN,
        min_length=len("2017-01-01"),
    ),
    TripField("trip_duration_seconds", ("number",), "The trip's length in seconds.", 223, True, True),
    TripField(
        "from_station_id",
        ("integer", "string", "null"),
        f"The start station's id (a whole number or a string of at most 18 digits); when missing, looked up by "
        f"`from_station_name`. An unknown station is predicted as one, never refused. {_MISSING_NOTE}",
        7051,
        pattern=STATION_ID_PATTERN,
    ),
    TripField(
        "from_station_name",
        ("string", "null"),
        f"The start station's name, forgiving doubled spaces and the City's spelling drifts. {_MISSING_NOTE}",
        "Wellesley St E / Yonge St Green P",
    ),
    TripField(
        "to_station_id",
        ("integer", "string", "null"),
        f"The end station's id, as `from_station_id`. {_MISSING_NOTE}",
        7089,
        pattern=STATION_ID_PATTERN,
    ),
    TripField(
        "to_station_name", ("string", "null"), f"The end station's name. {_MISSING_NOTE}", "Church St  / Wood St"
    ),
    TripField(
        "user_type",
        ("string", "null"),
        f"The rider's label if known: `Member`, `Casual`, `Annual Member` or `Casual Member` (any case); not "
        f"used for the prediction. {_MISSING_NOTE}",
        "Member",
        pattern=LABEL_PATTERN,
    ),
)
TRIP_FIELDS = tuple(trip_field.name for trip_field in REQUEST_SCHEMA)
# The first trip of the 2017 Q1 export, as the City wrote it: the API document's example, test_pred.py's trip.
EXAMPLE_TRIP = {trip_field.name: trip_field.example for trip_field in REQUEST_SCHEMA}
REQUIRED_FIELDS = tuple(trip_field.name for trip_field in REQUEST_SCHEMA if trip_field.required)
MODEL_INPUT_COLUMNS = ["trip_start_time", "trip_duration_seconds", "from_station_id", "to_station_id"]

UNIX_EPOCH = datetime(1970, 1, 1)  # naive, like the trips' Toronto wall-clock times
ONE_SECOND = timedelta(seconds=1)


def _decoded_type(trip_field: TripField) -> Any:
    """A field's JSON types as msgspec checks them while it decodes: integers within int64 (orjson reads every one
    of those exactly), numbers as floats (an integer too, as `float` would convert it), non-negative where the field
    must be."""
    kinds: dict[JsonType, Any] = {
        "integer": Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
        "number": Annotated[float, msgspec.Meta(ge=0)] if trip_field.non_negative else float,
        "string": str,
        "null": None,
    }
    return Union[tuple(kinds[kind] for kind in trip_field.types)]  # noqa: UP007 (the types are data here)


# A trip whose fields all have their JSON types, as msgspec decodes it: REQUEST_SCHEMA's fields in its order, a
# missing optional field None. Any other field makes the body go the way of `parse_request_trip`'s checks
# (`typed_trips`): msgspec would skip its value unread, where orjson refuses some (`1e999`, a lone surrogate).
TypedTrip = msgspec.defstruct(
    "TypedTrip",
    [
        (trip_field.name, _decoded_type(trip_field))
        if trip_field.required
        else (trip_field.name, _decoded_type(trip_field), None)
        for trip_field in REQUEST_SCHEMA
    ],
    kw_only=True,
    forbid_unknown_fields=True,
    gc=False,  # strings and numbers only: no cycle to collect
)
_TRIPS_BODY = msgspec.json.Decoder(Union[list[TypedTrip], TypedTrip])  # type: ignore[valid-type]  # noqa: UP007


def typed_trips(body: bytes) -> Any:
    """A /predict body decoded by msgspec in C, each trip a `TypedTrip` (a list of them, or one), when every trip has
    REQUEST_SCHEMA's fields only, each of its JSON types; else None, and the caller reads the body with orjson and
    validates it field by field (`parse_request_trip`), which names the problem.

    What msgspec accepts here orjson reads to the same values (tests/test_service.py), so the answer does not depend
    on the way a body took; only its cost does: no dict per trip, no type check in Python."""
    try:
        return _TRIPS_BODY.decode(body)
    except msgspec.DecodeError:  # msgspec.ValidationError is one
        return None


DateOrder = Literal["MDY", "DMY"]
DATE_ORDERS: tuple[DateOrder, ...] = ("MDY", "DMY")
DEFAULT_REQUEST_DATE_ORDER: DateOrder = "MDY"

# --- How an answer's shape is declared -------------------------------------------------------------------
# Every JSON object the service answers with is declared once, as a TypedDict where it is built, and openapi.py
# generates its schema in the API document from that declaration (with pydantic): `Annotated[T, Field(...)]`
# gives a key its description and constraints, `NotRequired` marks a key that may be left out, and `@closed`
# says that no other key appears (`additionalProperties: false`). TypedDict comes from typing_extensions: pydantic
# refuses typing's before Python 3.12. A TypedDict's `__required_keys__` is wrong here (Python 3.11 cannot see
# `NotRequired` in the string annotations `from __future__ import annotations` makes); pydantic and mypy are not.

closed = with_config(ConfigDict(extra="forbid"))
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]  # ISO 8601 with the offset, UTC
TRIP_ID = next(trip_field for trip_field in REQUEST_SCHEMA if trip_field.name == "trip_id")


class InvalidTrip(ValueError):
    """A trip that cannot be scored, naming the field, the problem and (in a list) the item."""

    def __init__(self, field: str | None, message: str, item: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.item = item


# --- Timestamps -------------------------------------------------------------------------------------

_SLASH_TIMESTAMP = re.compile(_SLASH_TIMESTAMP_PATTERN, re.ASCII)
SlashParts = tuple[int, int, int, int, int, int]


def _slash_parts(text: str) -> SlashParts | None:
    """The six numbers of a slash timestamp, first and second date fields in the order written."""
    match = _SLASH_TIMESTAMP.match(text)
    if match is None:
        return None
    first, second, year, hour, minute, second_of_minute = match.groups()
    full_year = int(year) + 2000 if len(year) == 2 else int(year)
    return int(first), int(second), full_year, int(hour), int(minute), int(second_of_minute or 0)


def evident_date_order(parts: Iterable[SlashParts]) -> DateOrder | None:
    """The date order the timestamps show on their own, or None when they do not (or contradict)."""
    day_first = month_first = False
    for first, second, *_ in parts:
        day_first |= first > 12
        month_first |= second > 12
    if day_first == month_first:
        return None
    return "DMY" if day_first else "MDY"


def order_from_evidence(day_first: bool, month_first: bool, default_order: DateOrder) -> DateOrder:
    """The order slash dates show (some first number over 12: day-first; some second one: month-first), or
    `default_order` when they show neither or both: the rule for a trip, a chunk and a whole file alike."""
    if day_first == month_first:
        return default_order
    return "DMY" if day_first else "MDY"


def _from_parts(parts: SlashParts, order: DateOrder) -> datetime | None:
    first, second, year, hour, minute, seconds = parts
    month, day = (first, second) if order == "MDY" else (second, first)
    try:
        return datetime(year, month, day, hour, minute, seconds)
    except ValueError:
        return None


def _from_iso(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is not None:
        try:
            moment = moment.astimezone(TORONTO).replace(tzinfo=None)
        except OverflowError:  # year 1 or 9999 shifted out of range
            return None
    return moment


def parse_timestamps(texts: Sequence[str | None], default_order: DateOrder) -> tuple[list[datetime | None], DateOrder]:
    """Parse timestamps that belong together (one trip, or a file's columns) under one date order.

    Returns the datetimes (None where a text is not a valid timestamp) and the date order used.
    """
    slash = {text: _slash_parts(text) for text in texts if text is not None}
    order = evident_date_order(parts for parts in slash.values() if parts is not None) or default_order
    return [None if text is None else _read_timestamp(text, slash[text], order) for text in texts], order


def _read_timestamp(text: str, parts: SlashParts | None, order: DateOrder) -> datetime | None:
    """A timestamp's text (its slash parts, if it has them) under a date order; None if it is not valid."""
    if parts is not None:
        return _from_parts(parts, order)
    return _from_iso(text) if "-" in text else None


def arrow_text(values: pd.Series) -> pa.Array:
    """A column as one Arrow text array (null where missing), sharing the memory of pandas' str columns."""
    text = pa.array(values.astype("str"), type=pa.large_string(), from_pandas=True)
    return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text  # a large file is read in chunks


def _field_numbers(parts: pa.StructArray, name: str) -> np.ndarray:
    """One captured group of `_SLASH_TIMESTAMP_PATTERN` as integers, 0 where it did not match."""
    field = pc.fill_null(parts.field(name), "")
    return pc.cast(pc.if_else(pc.equal(field, ""), "0", field), pa.int64()).to_numpy()


def _slash_evidence(first: np.ndarray, second: np.ndarray, slash: np.ndarray) -> tuple[bool, bool]:
    """(day_first, month_first) of slash timestamps' first and second date numbers."""
    return bool((first[slash] > 12).any()), bool((second[slash] > 12).any())


def slash_date_evidence(columns: Sequence[pa.Array]) -> tuple[bool, bool]:
    """(day_first, month_first): whether any slash date in the text columns has its first, or its second, number
    over 12. What a file's date order is decided from (`order_from_evidence`) when its rows are read in parts, as
    a Spark job reads a file: the evidence of the parts, or-ed, is the file's. Each distinct text is read once."""
    texts = pc.unique(pa.concat_arrays([column.cast(pa.large_string()) for column in columns]))
    parts = pc.extract_regex(texts, _SLASH_TIMESTAMP_PATTERN)
    slash = parts.is_valid().to_numpy(zero_copy_only=False)
    return _slash_evidence(_field_numbers(parts, "first"), _field_numbers(parts, "second"), slash)


def _parse_distinct_timestamps(texts: pa.Array, default_order: DateOrder) -> tuple[np.ndarray, tuple[bool, bool]]:
    """`parse_timestamps` over distinct texts, in Arrow and numpy: datetime64[s], NaT where not valid; and the
    slash dates' evidence (day_first, month_first), which decided the order they were read in."""
    parts = pc.extract_regex(texts, _SLASH_TIMESTAMP_PATTERN)
    slash = parts.is_valid().to_numpy(zero_copy_only=False)
    first, second = _field_numbers(parts, "first"), _field_numbers(parts, "second")
    hour, minute = _field_numbers(parts, "hour"), _field_numbers(parts, "minute")
    seconds = _field_numbers(parts, "second_of_minute")
    two_digit_year = pc.equal(pc.utf8_length(pc.fill_null(parts.field("year"), "")), 2).to_numpy(zero_copy_only=False)
    year = _field_numbers(parts, "year") + np.where(two_digit_year, 2000, 0)

    evidence = _slash_evidence(first, second, slash)
    month, day = (first, second) if order_from_evidence(*evidence, default_order) == "MDY" else (second, first)

    valid = slash & (year >= 1) & (month >= 1) & (month <= 12) & (day >= 1) & (hour < 24) & (minute < 60)
    valid &= seconds < 60
    month_start = ((np.where(valid, year, 1970) - 1970) * 12 + np.where(valid, month, 1) - 1).astype("datetime64[M]")
    first_day = month_start.astype("datetime64[D]")
    valid &= day <= ((month_start + 1).astype("datetime64[D]") - first_day).astype("int64")
    moments = (first_day + (day - 1)).astype("datetime64[s]") + (hour * 3600 + minute * 60 + seconds)
    moments[~valid] = np.datetime64("NaT")

    iso = ~slash & pc.fill_null(pc.match_substring(texts, "-"), False).to_numpy(zero_copy_only=False)
    if iso.any():
        positions = np.flatnonzero(iso)
        parsed = [_from_iso(text) for text in texts.take(positions).to_pylist()]
        moments[positions] = np.array(parsed, dtype="datetime64[s]")
    return moments, evidence


def parse_timestamp_columns(
    columns: Sequence[pd.Series], default_order: DateOrder
) -> tuple[list[pd.Series], tuple[bool, bool]]:
    """`parse_timestamps` for file columns, vectorised: each distinct text is parsed once. With the columns, the
    slash dates' evidence (day_first, month_first): they were read in `order_from_evidence(*evidence,
    default_order)`.

    A file's chunk has a few thousand distinct minutes among a hundred thousand timestamps, so the texts
    are dictionary-encoded in Arrow and only the dictionary is parsed.
    """
    encoded = pc.dictionary_encode(pa.concat_arrays([arrow_text(column) for column in columns]))
    moments, evidence = _parse_distinct_timestamps(encoded.dictionary, default_order)
    lookup = np.append(moments, np.datetime64("NaT"))  # a missing text picks the trailing NaT
    values = lookup[pc.fill_null(encoded.indices, len(moments)).to_numpy()]
    results, start = [], 0
    for column in columns:
        results.append(pd.Series(values[start : start + len(column)], index=column.index))
        start += len(column)
    return results, evidence


def _checked_values(record: Mapping[str, Any], item: int | None) -> list[Any]:
    """The values of REQUEST_SCHEMA's fields in its order, each present if required, of its JSON type."""
    values = []
    for trip_field in REQUEST_SCHEMA:
        value = record.get(trip_field.name)
        if value is None:
            if trip_field.required:
                raise InvalidTrip(trip_field.name, "is required", item)
        elif (
            type(value) is bool
            or not isinstance(value, trip_field.python_types)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            if not ("integer" in trip_field.types and _is_whole_float(value)):
                raise InvalidTrip(trip_field.name, trip_field.type_error, item)
            value = int(value)
        elif trip_field.non_negative and cast(float, value) < 0:  # a number: its type was checked
            raise InvalidTrip(trip_field.name, "must not be negative", item)
        values.append(value)
    return values


def _is_whole_float(value: Any) -> bool:
    """Whether a float is an integer to JSON Schema (`7051.0`, as writers that know only floats send 7051) in the
    JSON reader's range; strictly inside it, as an integer beyond either end is read as the float at that end."""
    return isinstance(value, float) and value.is_integer() and JSON_INTEGERS[0] < value < JSON_INTEGERS[1]


def _text(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() in MISSING_TEXT else value


def _station_id(value: int | str | None, field: str, item: int | None) -> float:
    if isinstance(value, int):
        return float(value)
    text = _text(value)
    if text is None:
        return math.nan
    if not _STATION_ID_TEXT.fullmatch(text.strip()):
        raise InvalidTrip(field, "must be a whole number, a string of at most 18 digits, or null", item)
    return float(text)


def parse_request_trip(record: Any, date_order: DateOrder | None = None, item: int | None = None) -> dict[str, Any]:
    """Validate one trip as sent to the service (REQUEST_SCHEMA: parsed JSON, or a `TypedTrip`) and return it in the
    schema's types.

    Raises InvalidTrip naming the field (and `item`, its position in a list): first the schema's presence and
    type checks in field order, then the values: dates, their order, labels and station ids.
    """
    values: Sequence[Any]
    if type(record) is TypedTrip:  # its types were checked as it was decoded
        values = msgspec.structs.astuple(record)
    elif isinstance(record, Mapping):
        values = _checked_values(record, item)
    else:
        raise InvalidTrip(None, "a trip must be a JSON object", item)
    trip_id, start_text, stop_text, duration, from_id, from_name, to_id, to_name, user_type = values
    (start, stop), _ = parse_timestamps([start_text, stop_text], date_order or DEFAULT_REQUEST_DATE_ORDER)
    if start is None or stop is None:
        field = "trip_start_time" if start is None else "trip_stop_time"
        raise InvalidTrip(field, "is not a valid date-time: use ISO 8601 or M/D/YYYY H:MM[:SS]", item)
    if stop < start:
        raise InvalidTrip("trip_stop_time", "is before trip_start_time", item)
    label = _text(user_type)
    if label is not None and label.strip().lower() not in LABELS:
        raise InvalidTrip("user_type", "must be Member, Casual, Annual Member, Casual Member or null", item)

    index = station_index()
    ends: dict[str, float | str | None] = {}
    for end, station_id, name in (("from", from_id, _text(from_name)), ("to", to_id, _text(to_name))):
        resolved = _station_id(station_id, f"{end}_station_id", item)
        if math.isnan(resolved) and name is not None:
            found = index.id_for(name)
            resolved = math.nan if found is None else float(found)
        ends[f"{end}_station_id"], ends[f"{end}_station_name"] = resolved, name
    return {
        "trip_id": trip_id,
        "trip_start_time": start,
        "trip_stop_time": stop,
        "trip_duration_seconds": float(duration),
        **ends,
        "user_type": LABELS[label.strip().lower()] if label else None,
    }


class RequestTrips:
    """A request's validated trips as columns: each REQUEST_SCHEMA field a list, in the request's order, of the
    values `parse_request_trip` gives. The request path reads the columns (`model_input`, the trip ids); a trip
    as a dict (`trips[i]`) is built only where one is asked for."""

    __slots__ = ("columns",)

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        self.columns = columns  # by field name, in TRIP_FIELDS order

    @classmethod
    def of(cls, trips: Iterable[Mapping[str, Any]]) -> RequestTrips:
        """The columns of trips validated one by one (`parse_request_trip`'s dicts)."""
        trips = list(trips)
        return cls({name: [trip[name] for trip in trips] for name in TRIP_FIELDS})

    @classmethod
    def one(cls, trip: Mapping[str, Any]) -> RequestTrips:
        """`of` a single trip, in a third of its time (the single-trip request's path)."""
        return cls({name: [trip[name]] for name in TRIP_FIELDS})

    @classmethod
    def joined(cls, parts: Sequence[RequestTrips]) -> RequestTrips:
        """Several requests' trips, one after another."""
        return cls({name: [value for part in parts for value in part.columns[name]] for name in TRIP_FIELDS})

    def __len__(self) -> int:
        return len(self.columns["trip_id"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: column[index] for name, column in self.columns.items()}

    def records(self) -> list[dict[str, Any]]:
        """Each trip as `parse_request_trip` gives it."""
        return [self[index] for index in range(len(self))]

    def model_input(self) -> dict[str, np.ndarray]:
        """The columns the model takes (`MODEL_INPUT_COLUMNS`), as arrays, without pandas."""
        starts = self.columns["trip_start_time"]
        # Seconds in Python, then one cast: numpy converts datetime objects one by one, several times slower. Once per
        # distinct start: a list's trips share their starts' minutes (and the validated columns, their objects).
        seconds = {moment: (moment - UNIX_EPOCH) // ONE_SECOND for moment in set(starts)}
        return {
            "trip_start_time": np.fromiter(map(seconds.__getitem__, starts), "int64", len(starts)).astype(
                "datetime64[s]"
            ),
            "trip_duration_seconds": np.array(self.columns["trip_duration_seconds"], dtype="float64"),
            "from_station_id": np.array(self.columns["from_station_id"], dtype="float64"),
            "to_station_id": np.array(self.columns["to_station_id"], dtype="float64"),
        }


def parse_request_trips(records: Sequence[Any], date_order: DateOrder | None = None) -> RequestTrips:
    """`parse_request_trip` of each trip of a list (`item`: its position), validated as columns: each field
    across the trips in one pass, each distinct text (timestamp, station id, name, label) read once. A list of
    `TypedTrip`s skips the type checks.

    The columns vouch only for trips in the usual forms. Any other trip (one with a problem, or a rarer form
    such as a station id sent as `7051.0`) is validated alone by `parse_request_trip`, in list order, so the
    first bad trip is refused exactly as it would be alone, with the same field, item and message.
    """
    doubtful: set[int] = set()
    record_types = set(map(type, records))
    if record_types == {TypedTrip}:  # types checked as they were decoded
        trip_ids, starts, stops, durations, sent_from_ids, from_names, sent_to_ids, to_names, user_types = (
            list(column) for column in zip(*map(msgspec.structs.astuple, records), strict=True)
        )
    elif record_types <= {dict}:
        trip_ids, starts, stops, durations, sent_from_ids, from_names, sent_to_ids, to_names, user_types = (
            [record.get(name) for record in records] for name in TRIP_FIELDS
        )
        doubtful.update(item for item, value in enumerate(trip_ids) if type(value) not in _ID_TYPES)
        doubtful.update(
            item
            for item, value in enumerate(durations)
            if type(value) not in _NUMBER_TYPES or not 0 <= value < math.inf
        )
        for column in (starts, stops):
            doubtful.update(item for item, value in enumerate(column) if type(value) is not str)
        for column in (from_names, to_names, user_types):
            doubtful.update(item for item, value in enumerate(column) if value is not None and type(value) is not str)
        # As floats, as a typed trip's are already (NaN for a doubtful trip: it is validated alone below).
        durations = [float(seconds) if type(seconds) in _NUMBER_TYPES else math.nan for seconds in durations]
    else:
        return RequestTrips.of(parse_request_trip(record, date_order, item) for item, record in enumerate(records))
    # Each check below scans the trips in Python only when a look at the whole column (in C) finds a problem.
    label_by_text = _read_distinct_texts(user_types, _label)
    labels = _looked_up(user_types, label_by_text)
    if _INVALID in label_by_text.values():
        doubtful.update(item for item, label in enumerate(labels) if label is _INVALID)
    from_ids, to_ids = _station_ids(sent_from_ids, from_names), _station_ids(sent_to_ids, to_names)
    for resolved in (from_ids, to_ids):
        if None in resolved:
            doubtful.update(item for item, value in enumerate(resolved) if value is None)
    begins, ends = _trip_moments(starts, stops, date_order or DEFAULT_REQUEST_DATE_ORDER)
    ends_begins = cast("tuple[list[datetime], list[datetime]]", (ends, begins))  # datetimes where no None is found
    if None in begins or None in ends or any(map(operator.lt, *ends_begins)):
        doubtful.update(
            item
            for item, (begin, end) in enumerate(zip(begins, ends, strict=True))
            if begin is None or end is None or end < begin
        )

    columns: dict[str, list[Any]] = dict(
        zip(
            TRIP_FIELDS,
            (
                trip_ids,
                begins,
                ends,
                durations,
                from_ids,
                _read_texts(from_names, _text),
                to_ids,
                _read_texts(to_names, _text),
                labels,
            ),
            strict=True,
        )
    )
    for item in sorted(doubtful):
        for name, value in parse_request_trip(records[item], date_order, item).items():
            columns[name][item] = value
    return RequestTrips(columns)


def _read_texts(column: list[Any], read: Callable[[str], Any]) -> list[Any]:
    """`read` of each text in the column, each distinct text read once; None for any other value."""
    return _looked_up(column, _read_distinct_texts(column, read))


def _read_distinct_texts(column: list[Any], read: Callable[[str], Any]) -> dict[str, Any]:
    """`read` of each distinct text in the column, by text."""
    return {text: read(text) for text in _distinct_texts(column)}


# A typed body's columns hold texts, numbers and None, so these take a set and a map in C; a parsed body may also
# hold arrays and objects, which cannot be hashed (TypeError), and then they look at each value's type in Python.


def _distinct_texts(column: list[Any]) -> set[str]:
    try:
        distinct = set(column)
    except TypeError:
        return {value for value in column if type(value) is str}
    return {value for value in distinct if type(value) is str}


def _looked_up(column: list[Any], by_text: dict[str, Any]) -> list[Any]:
    """Each text's value in `by_text` (which has every text of the column), None for any other value."""
    try:
        return list(map(by_text.get, column))  # only texts are keys, and no other value equals a text
    except TypeError:
        return [by_text[value] if type(value) is str else None for value in column]


_ID_TYPES = (int, str, type(None))  # exact types: a bool is an int to isinstance
_NUMBER_TYPES = (int, float)
_INVALID = object()  # a text `parse_request_trip` refuses


def _station_id_text(text: str) -> float | None:
    """A station id sent as text, as `_station_id` reads it (NaN when missing), or None where it refuses it."""
    if _text(text) is None:
        return math.nan
    return float(text) if _STATION_ID_TEXT.fullmatch(text.strip()) else None


def _label(text: str) -> str | object | None:
    """The label a user_type text stands for (None when missing), or _INVALID."""
    label = _text(text)
    return None if label is None else LABELS.get(label.strip().lower(), _INVALID)


def _station_ids(ids: list[Any], names: list[Any]) -> list[float | None]:
    """One end's station ids as `parse_request_trip` resolves them (by name when the id is missing); None
    where the columns do not vouch for the trip."""
    if set(map(type, ids)) <= {int}:  # the usual column: whole numbers, none missing
        return list(map(float, ids))
    texts = _read_distinct_texts(ids, _station_id_text)
    resolved = [
        float(value)
        if type(value) is int
        else texts[value]
        if type(value) is str
        else math.nan
        if value is None
        else None  # neither a whole number, text nor missing: not vouched for
        for value in ids
    ]
    index = station_index()
    found: dict[str, float] = {}
    for item in [item for item, value in enumerate(resolved) if value != value]:  # NaN: missing, looked up by name
        name = names[item]
        if type(name) is str and _text(name) is not None:
            if name not in found:
                station = index.id_for(_text(name))
                found[name] = math.nan if station is None else float(station)
            resolved[item] = found[name]
    return resolved


def _trip_moments(
    starts: list[Any], stops: list[Any], default_order: DateOrder
) -> tuple[list[datetime | None], list[datetime | None]]:
    """Each trip's start and stop as `parse_timestamps` reads a trip's pair: in the order either text shows, else
    `default_order`. Each distinct text is matched once and read in `default_order` once; only a trip whose texts
    show the other order is read again, in it. None where a text is not a valid timestamp (or not a text)."""
    parts = {text: _slash_parts(text) for text in _distinct_texts(starts) | _distinct_texts(stops)}
    shows = {text: 0 if found is None else (found[0] > 12) | (found[1] > 12) << 1 for text, found in parts.items()}
    read = {text: _read_timestamp(text, found, default_order) for text, found in parts.items()}
    begins, ends = _looked_up(starts, read), _looked_up(stops, read)
    if any(shows.values()):  # some text shows its order: the trips whose pair shows the other one are read in it
        for item, (start, stop) in enumerate(zip(starts, stops, strict=True)):
            shown = (shows[start] if type(start) is str else 0) | (shows[stop] if type(stop) is str else 0)
            order = _ORDER_SHOWN.get(shown, default_order)
            if order != default_order:
                begins[item], ends[item] = (
                    None if type(text) is not str else _read_timestamp(text, parts[text], order)
                    for text in (start, stop)
                )
    return begins, ends


# What a trip's two slash timestamps show (bit 1: a first number over 12, bit 2: a second number over 12):
# one of the two decides the order; neither or both leave the default (evident_date_order's rule).
_ORDER_SHOWN: dict[int, DateOrder] = {1: "DMY", 2: "MDY"}
