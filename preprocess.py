"""The data contract: the trip schema, every City file layout, station look-up and the model's features.

Training, the web service and batch scoring all go through this module, so a trip means the same thing
everywhere. The request schema is the 2017 export's nine fields (`REQUEST_SCHEMA`); the model sees the typed
columns in `MODEL_INPUT_COLUMNS` and turns them into features with `TripFeatures`, which is the first step
of the logged pipeline.

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
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import date, datetime
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.base import BaseEstimator, TransformerMixin

DATA_DIR = Path(__file__).parent / "data"
STATIONS_FILE = DATA_DIR / "stations.csv"
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


MEMBER = "Member"
CASUAL = "Casual"
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
REQUIRED_FIELDS = tuple(trip_field.name for trip_field in REQUEST_SCHEMA if trip_field.required)
MODEL_INPUT_COLUMNS = ["trip_start_time", "trip_duration_seconds", "from_station_id", "to_station_id"]

DateOrder = Literal["MDY", "DMY"]
DATE_ORDERS: tuple[DateOrder, ...] = ("MDY", "DMY")
DEFAULT_REQUEST_DATE_ORDER: DateOrder = "MDY"


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
    parsed: list[datetime | None] = []
    for text in texts:
        parts = slash.get(text) if text is not None else None
        if parts is not None:
            parsed.append(_from_parts(parts, order))
        elif text is not None and "-" in text:
            parsed.append(_from_iso(text))
        else:
            parsed.append(None)
    return parsed, order


def _arrow_text(values: pd.Series) -> pa.Array:
    """A column as one Arrow text array (null where missing), sharing the memory of pandas' str columns."""
    text = pa.array(values.astype("str"), type=pa.large_string(), from_pandas=True)
    return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text  # a large file is read in chunks


def _field_numbers(parts: pa.StructArray, name: str) -> np.ndarray:
    """One captured group of `_SLASH_TIMESTAMP_PATTERN` as integers, 0 where it did not match."""
    field = pc.fill_null(parts.field(name), "")
    return pc.cast(pc.if_else(pc.equal(field, ""), "0", field), pa.int64()).to_numpy()


def _parse_distinct_timestamps(texts: pa.Array, default_order: DateOrder) -> tuple[np.ndarray, DateOrder]:
    """`parse_timestamps` over distinct texts, in Arrow and numpy: datetime64[s], NaT where not valid."""
    parts = pc.extract_regex(texts, _SLASH_TIMESTAMP_PATTERN)
    slash = parts.is_valid().to_numpy(zero_copy_only=False)
    first, second = _field_numbers(parts, "first"), _field_numbers(parts, "second")
    hour, minute = _field_numbers(parts, "hour"), _field_numbers(parts, "minute")
    seconds = _field_numbers(parts, "second_of_minute")
    two_digit_year = pc.equal(pc.utf8_length(pc.fill_null(parts.field("year"), "")), 2).to_numpy(zero_copy_only=False)
    year = _field_numbers(parts, "year") + np.where(two_digit_year, 2000, 0)

    day_first, month_first = bool((first[slash] > 12).any()), bool((second[slash] > 12).any())
    order = default_order if day_first == month_first else ("DMY" if day_first else "MDY")
    month, day = (first, second) if order == "MDY" else (second, first)

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
    return moments, order


def parse_timestamp_columns(
    columns: Sequence[pd.Series], default_order: DateOrder
) -> tuple[list[pd.Series], DateOrder]:
    """`parse_timestamps` for file columns, vectorised: each distinct text is parsed once.

    A file's chunk has a few thousand distinct minutes among a hundred thousand timestamps, so the texts
    are dictionary-encoded in Arrow and only the dictionary is parsed.
    """
    encoded = pc.dictionary_encode(pa.concat_arrays([_arrow_text(column) for column in columns]))
    moments, order = _parse_distinct_timestamps(encoded.dictionary, default_order)
    lookup = np.append(moments, np.datetime64("NaT"))  # a missing text picks the trailing NaT
    values = lookup[pc.fill_null(encoded.indices, len(moments)).to_numpy()]
    results, start = [], 0
    for column in columns:
        results.append(pd.Series(values[start : start + len(column)], index=column.index))
        start += len(column)
    return results, order


# --- Stations ---------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[.,'\u2019()\u2013\u2014\-]+")
_SPELLING_DRIFTS = {"berkely": "berkeley", "av": "ave", "lakeshore": "lake shore", "crt": "ct", "st.": "st"}
_DIRECTIONS = {"w", "e", "n", "s", "west", "east", "north", "south"}


def normalise_station_name(name: str) -> str:
    """A comparison key for station names: case, punctuation, doubled spaces and known spelling drifts."""
    words = _PUNCTUATION.sub(" ", name.lower().replace("/", " / ")).split()
    return " ".join(_SPELLING_DRIFTS.get(word, word) for word in words)


def loose_station_key(name: str) -> str:
    """The normalised name without compass directions (`College St W` vs `College St`)."""
    return " ".join(word for word in normalise_station_name(name).split() if word not in _DIRECTIONS)


@dataclass(frozen=True)
class StationIndex:
    """Station ids by name, and coordinates by id, from the bundled `data/stations.csv`."""

    ids_by_name: Mapping[str, int]
    ids_by_loose_name: Mapping[str, int]
    coordinates: Mapping[int, tuple[float, float]]

    def id_for(self, name: str | None) -> int | None:
        if name is None or normalise_station_name(name) in MISSING_TEXT:
            return None
        key = normalise_station_name(name)
        found = self.ids_by_name.get(key)
        return found if found is not None else self.ids_by_loose_name.get(loose_station_key(key))


@cache
def station_index(path: Path = STATIONS_FILE) -> StationIndex:
    stations = pd.read_csv(path)
    ids_by_name: dict[str, int] = {}
    loose: dict[str, set[int]] = {}
    for station_id, name in zip(stations["station_id"], stations["name"], strict=True):
        key = normalise_station_name(name)
        ids_by_name.setdefault(key, int(station_id))
        loose.setdefault(loose_station_key(key), set()).add(ids_by_name[key])
    located = stations.dropna(subset=["lat", "lon"]).drop_duplicates("station_id")
    return StationIndex(
        ids_by_name=ids_by_name,
        ids_by_loose_name={key: ids.pop() for key, ids in loose.items() if len(ids) == 1},
        coordinates={int(row.station_id): (float(row.lat), float(row.lon)) for row in located.itertuples()},
    )


def resolve_station_ids(ids: pd.Series, names: pd.Series) -> pd.Series:
    """Station ids as floats, looked up by name where the id is missing; NaN for an unknown station."""
    resolved = pd.Series(parse_numbers(ids), index=ids.index)
    missing = resolved.isna() & names.notna()
    if missing.any():
        index = station_index()
        lookup = {name: index.id_for(name) for name in names[missing].unique()}
        resolved[missing] = names[missing].map(lookup).astype("float64")
    return resolved


# --- File layouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One of the City's file layouts: how its columns map to the schema, and its default date order."""

    name: str
    columns: Mapping[str, str]
    date_order: DateOrder


_SCHEMA_NAMES = {field: field for field in TRIP_FIELDS}
_CITY_2019_NAMES = {
    "Trip Id": "trip_id",
    "Trip  Duration": "trip_duration_seconds",
    "Start Station Id": "from_station_id",
    "Start Time": "trip_start_time",
    "Start Station Name": "from_station_name",
    "End Station Id": "to_station_id",
    "End Time": "trip_stop_time",
    "End Station Name": "to_station_name",
    "User Type": "user_type",
}
_CITY_2025_NAMES = {name.replace("  ", " ").replace(" ", "_"): field for name, field in _CITY_2019_NAMES.items()}

LAYOUTS = (
    Layout("2017 Q1/Q2 (request schema)", _SCHEMA_NAMES, "DMY"),
    Layout("2017 Q3/Q4 (no station ids)", _SCHEMA_NAMES, "MDY"),
    Layout("2018 (reordered)", _SCHEMA_NAMES, "MDY"),
    Layout("2019-2024", _CITY_2019_NAMES, "MDY"),
    Layout("2025", _CITY_2025_NAMES, "MDY"),
)


def detect_layout(header: Sequence[str]) -> Layout:
    """The layout of a file from its header; raises ValueError naming what is missing."""
    names = [name.strip().lstrip("\ufeff") for name in header]
    if "Trip  Duration" in names or "Trip Duration" in names:
        return LAYOUTS[3]
    if "Trip_Duration" in names:
        return LAYOUTS[4]
    missing = [field for field in REQUIRED_FIELDS if field not in names]
    if missing:
        raise ValueError(f"unknown file layout: no column {missing[0]!r} in header {names!r}")
    if "from_station_id" not in names:
        return LAYOUTS[1]
    schema_order = [name for name in names if name in TRIP_FIELDS]
    return LAYOUTS[0] if schema_order == list(TRIP_FIELDS[: len(schema_order)]) else LAYOUTS[2]


@dataclass
class ParsedTrips:
    """Trips in the schema's types, and the rows that could not be parsed with the reason."""

    trips: pd.DataFrame
    rejects: pd.DataFrame
    date_order: DateOrder


_DECIMAL_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def parse_numbers(values: pd.Series) -> np.ndarray:
    """Finite decimal numbers as float64; NaN where a text is missing or not a number."""
    text = pc.utf8_trim_whitespace(_arrow_text(values))
    numbers = pc.cast(pc.if_else(pc.match_substring_regex(text, _DECIMAL_NUMBER), text, None), pa.float64())
    result = numbers.to_numpy(zero_copy_only=False)
    return np.where(np.isfinite(result), result, np.nan)


def _distinct_texts(values: pd.Series) -> tuple[np.ndarray, list[str | None]]:
    """Each row's position in the column's distinct stripped texts; the last one, None, stands for missing.

    `NULL`, `NULLNULL`, blanks and the like are missing. Files repeat a few hundred station names and two
    labels over every row, so working on the distinct texts keeps a chunk's text handling cheap.
    """
    text = pc.utf8_trim_whitespace(_arrow_text(values))
    missing = pc.is_in(pc.utf8_lower(text), value_set=pa.array(sorted(MISSING_TEXT), pa.large_string()))
    encoded = pc.dictionary_encode(pc.if_else(missing, None, text))
    distinct = [*encoded.dictionary.to_pylist(), None]
    return pc.fill_null(encoded.indices, len(distinct) - 1).to_numpy(), distinct


def _text_column(values: pd.Series) -> pd.Series:
    """Stripped text, None where the City wrote nothing, `NULL` or the like."""
    codes, distinct = _distinct_texts(values)
    return pd.Series(np.array(distinct, dtype=object)[codes], index=values.index, dtype=object)


def _label_column(values: pd.Series) -> pd.Series:
    """`Member` or `Casual` from any era's label, None where missing or unknown."""
    codes, distinct = _distinct_texts(values)
    labels = [None if text is None else LABELS.get(text.lower()) for text in distinct]
    return pd.Series(np.array(labels, dtype=object)[codes], index=values.index, dtype="str")


def parse_frame(raw: pd.DataFrame, layout: Layout, date_order: DateOrder | None = None) -> ParsedTrips:
    """Map a raw City frame (all columns as read) to the schema, rejecting rows that cannot be scored.

    `date_order` overrides the layout's default, for a chunk of a file whose earlier chunks showed it.
    """
    raw = raw.rename(columns=lambda name: name.strip().lstrip("\ufeff"))
    frame = raw.rename(columns=layout.columns).reindex(columns=list(TRIP_FIELDS))
    (start, stop), order = parse_timestamp_columns(
        [frame["trip_start_time"], frame["trip_stop_time"]], date_order or layout.date_order
    )
    duration = pd.Series(parse_numbers(frame["trip_duration_seconds"]), index=frame.index)
    from_name, to_name = _text_column(frame["from_station_name"]), _text_column(frame["to_station_name"])
    user_type = _label_column(frame["user_type"])

    reasons = pd.Series(None, index=frame.index, dtype=object)
    checks = [
        (stop < start, "trip_stop_time: before trip_start_time"),
        (duration < 0, "trip_duration_seconds: negative"),
        (duration.isna(), "trip_duration_seconds: missing or not a number"),
        (stop.isna(), "trip_stop_time: missing or not a date-time"),
        (start.isna(), "trip_start_time: missing or not a date-time"),
    ]
    for failed, reason in checks:  # the last check that fails names the row's reason
        reasons[failed.to_numpy()] = reason
    bad = reasons.notna()

    trips = pd.DataFrame(
        {
            "trip_id": frame["trip_id"],
            "trip_start_time": start,
            "trip_stop_time": stop,
            "trip_duration_seconds": duration,
            "from_station_id": resolve_station_ids(frame["from_station_id"], from_name),
            "from_station_name": from_name,
            "to_station_id": resolve_station_ids(frame["to_station_id"], to_name),
            "to_station_name": to_name,
            "user_type": user_type,
        }
    )
    rejects = pd.DataFrame({"trip_id": frame["trip_id"][bad], "reason": reasons[bad]})
    return ParsedTrips(trips=trips[~bad], rejects=rejects, date_order=order)


def read_trips(path: str | Path) -> ParsedTrips:
    """Read a whole City trip file (CSV, optionally compressed) of any known layout."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", encoding_errors="replace")
    return parse_frame(raw, detect_layout(list(raw.columns)))


# --- Requests ---------------------------------------------------------------------------------------


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
        elif trip_field.non_negative and value < 0:
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
    """Validate one trip as sent to the service (REQUEST_SCHEMA) and return it in the schema's types.

    Raises InvalidTrip naming the field (and `item`, its position in a list): first the schema's presence and
    type checks in field order, then the values: dates, their order, labels and station ids.
    """
    if not isinstance(record, Mapping):
        raise InvalidTrip(None, "a trip must be a JSON object", item)
    trip_id, start_text, stop_text, duration, from_id, from_name, to_id, to_name, user_type = _checked_values(
        record, item
    )
    (start, stop), _ = parse_timestamps([start_text, stop_text], date_order or DEFAULT_REQUEST_DATE_ORDER)
    for field, moment in (("trip_start_time", start), ("trip_stop_time", stop)):
        if moment is None:
            raise InvalidTrip(field, "is not a valid date-time: use ISO 8601 or M/D/YYYY H:MM[:SS]", item)
    if stop < start:
        raise InvalidTrip("trip_stop_time", "is before trip_start_time", item)
    user_type = _text(user_type)
    if user_type is not None and user_type.strip().lower() not in LABELS:
        raise InvalidTrip("user_type", "must be Member, Casual, Annual Member, Casual Member or null", item)

    index = station_index()
    ends = {}
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
        "user_type": LABELS[user_type.strip().lower()] if user_type else None,
    }


def model_input(trips: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Validated request trips as the columns the model takes (`MODEL_INPUT_COLUMNS`), without pandas."""
    return {
        "trip_start_time": np.array([trip["trip_start_time"] for trip in trips], dtype="datetime64[s]"),
        "trip_duration_seconds": np.array([trip["trip_duration_seconds"] for trip in trips], dtype="float64"),
        "from_station_id": np.array([trip["from_station_id"] for trip in trips], dtype="float64"),
        "to_station_id": np.array([trip["to_station_id"] for trip in trips], dtype="float64"),
    }


# --- Features ---------------------------------------------------------------------------------------

MAX_DURATION_SECONDS = 7 * 24 * 3600
# Every feature `trip_features` computes, in its order. A model uses the subset its `TripFeatures` names: the
# first ten are the features of every model registered before that subset was a parameter (LEGACY_FEATURES).
FEATURE_CATALOGUE = (
    "duration_log",
    "start_hour",
    "weekday",
    "month",
    "round_trip",
    "distance_km",
    "speed_kmh",
    "from_station",
    "to_station",
    "route",
    "holiday",
    "free_day",
    "from_lat",
    "from_lon",
    "to_lat",
    "to_lon",
)
LEGACY_FEATURES = FEATURE_CATALOGUE[:10]
# Station ids and the route, which the pipeline target-encodes; every other feature is a number it passes on.
STATION_FEATURES = ("from_station", "to_station", "route")
# Weekday/weekend and Ontario's statutory holidays are the calendar a rider lives by; `month` is left out: a
# month the model has not seen can only be mapped onto one it has (docs/model.md has the measurements).
DEFAULT_FEATURES = tuple(name for name in FEATURE_CATALOGUE if name != "month")
HOLIDAY_YEARS = range(2014, 2041)  # the City's trip data starts in 2014; a model is retrained long before 2041
EARTH_RADIUS_KM = 6371.0
UNIX_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def _months_of_days(days: Any) -> Any:
    """The calendar month (1-12) of day numbers since 1970-01-01."""
    return np.asarray(days).astype("datetime64[D]").astype("datetime64[M]").astype("int64") % 12 + 1


def _month_of_day(day: int) -> int:
    return date.fromordinal(UNIX_EPOCH_ORDINAL + day).month


def ontario_holidays(years: Iterable[int] = HOLIDAY_YEARS) -> np.ndarray:
    """Ontario's statutory holidays (observed days included) as sorted day numbers since 1970-01-01.

    Only fitting asks the library (imported here: a served model carries its calendar, and the service starts
    without the import)."""
    import holidays

    calendar = holidays.country_holidays("CA", subdiv="ON", years=list(years))
    return np.array(sorted(day.toordinal() - UNIX_EPOCH_ORDINAL for day in calendar), dtype="int64")


# The functions `trip_features` calls, for columns and for one trip's Python numbers. Transcendental functions
# are numpy's in both (libm's may differ in the last bit, enough to cross a split threshold); the exact ones
# (sqrt, comparisons, calendar) are Python's for one trip, where a numpy call costs about a microsecond.
# `is_in(days, holiday_days)` takes a sorted array of day numbers for columns and a set for one trip.
ARRAY_MATH = SimpleNamespace(
    sin=np.sin,
    cos=np.cos,
    arcsin=np.arcsin,
    log1p=np.log1p,
    sqrt=np.sqrt,
    isnan=np.isnan,
    maximum=np.maximum,
    where=np.where,
    month=_months_of_days,
    is_in=np.isin,
)
SCALAR_MATH = SimpleNamespace(
    **{
        **vars(ARRAY_MATH),
        "sqrt": math.sqrt,
        "isnan": math.isnan,
        "maximum": max,
        "where": lambda condition, if_true, if_false: if_true if condition else if_false,
        "month": _month_of_day,
        "is_in": lambda day, days: day in days,
    }
)


def trip_features(
    seconds: Any,
    duration: Any,
    from_id: Any,
    to_id: Any,
    origin: Any,
    destination: Any,
    holiday_days: Any,
    xp: Any = ARRAY_MATH,
) -> tuple[Any, ...]:
    """Every feature, in FEATURE_CATALOGUE order, of trips given as numpy arrays or of one trip given as numbers.

    The one definition: arithmetic operators and the functions of `xp`, ARRAY_MATH for arrays and SCALAR_MATH
    for one trip, so both give the same values. `seconds` is the start in seconds since 1970 (Toronto wall
    clock), `duration` is clipped, `origin` and `destination` are (latitude, longitude) in radians, NaN when
    unknown, and `holiday_days` are the holidays' day numbers (see `ARRAY_MATH`).
    """
    days, second_of_day = divmod(seconds, 86_400)
    hour, minute = divmod(second_of_day // 60, 60)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
    holiday = xp.is_in(days, holiday_days)
    (origin_lat, origin_lon), (destination_lat, destination_lon) = origin, destination
    half_lat, half_lon = xp.sin((destination_lat - origin_lat) / 2), xp.sin((destination_lon - origin_lon) / 2)
    half_chord = half_lat * half_lat + xp.cos(origin_lat) * xp.cos(destination_lat) * (half_lon * half_lon)
    distance_km = 2 * EARTH_RADIUS_KM * xp.arcsin(xp.sqrt(half_chord))
    return (
        xp.log1p(duration),  # duration_log
        hour + minute / 60,  # start_hour
        weekday,
        xp.month(days),  # month
        xp.where(xp.isnan(from_id) | xp.isnan(to_id), math.nan, from_id == to_id),  # round_trip
        distance_km,
        distance_km / (xp.maximum(duration, 60.0) / 3600),  # speed_kmh
        from_id,  # from_station
        to_id,  # to_station
        from_id * 10000 + to_id,  # route
        holiday,
        (weekday >= 5) | holiday,  # free_day: a weekend or a holiday
        origin_lat,  # from_lat (radians)
        origin_lon,  # from_lon
        destination_lat,  # to_lat
        destination_lon,  # to_lon
    )


class TripFeatures(TransformerMixin, BaseEstimator):
    """The features of a trip, computed column-wise from `MODEL_INPUT_COLUMNS`; `features` names which.

    Fitting captures the station coordinates and the holiday calendar, so a logged pipeline carries the ones
    it was trained with. Stations stay as ids (`route` is from * 10000 + to); the pipeline's encoder turns them
    into numbers.
    """

    def __init__(self, features: tuple[str, ...] = DEFAULT_FEATURES) -> None:
        self.features = features

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A model registered before `features` and the holiday calendar existed loads with what it used."""
        state.setdefault("features", LEGACY_FEATURES)
        state.setdefault("holiday_days_", np.empty(0, dtype="int64"))
        super().__setstate__(state)

    def fit(self, trips: pd.DataFrame, target: Any = None) -> TripFeatures:
        unknown = sorted(set(self.features) - set(FEATURE_CATALOGUE))
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {', '.join(FEATURE_CATALOGUE)}")
        coordinates = station_index().coordinates
        self.station_ids_ = np.array(sorted(coordinates), dtype="float64")
        self.station_coordinates_ = np.radians(np.array([coordinates[int(i)] for i in self.station_ids_]))
        self.holiday_days_ = ontario_holidays()
        return self

    def _coordinates(self, station_ids: np.ndarray) -> np.ndarray:
        """(n, 2) latitude/longitude in radians; NaN for an unknown station."""
        position = np.searchsorted(self.station_ids_, station_ids).clip(0, len(self.station_ids_) - 1)
        known = self.station_ids_[position] == station_ids
        return np.where(known[:, None], self.station_coordinates_[position], np.nan)

    @property
    def positions(self) -> list[int]:
        """Where each of `features` stands in FEATURE_CATALOGUE."""
        return [FEATURE_CATALOGUE.index(name) for name in self.features]

    def catalogue_matrix(self, trips: Mapping[str, Any]) -> np.ndarray:
        """The (n, len(FEATURE_CATALOGUE)) float64 features of `MODEL_INPUT_COLUMNS` given as columns."""
        seconds = np.asarray(trips["trip_start_time"], dtype="datetime64[s]").astype("int64")
        duration = np.clip(np.asarray(trips["trip_duration_seconds"], dtype="float64"), 0, MAX_DURATION_SECONDS)
        from_id = np.asarray(trips["from_station_id"], dtype="float64")
        to_id = np.asarray(trips["to_station_id"], dtype="float64")
        ends = self._coordinates(np.concatenate([from_id, to_id]))
        origin, destination = ends[: len(from_id)], ends[len(from_id) :]
        values = trip_features(seconds, duration, from_id, to_id, origin.T, destination.T, self.holiday_days_)
        return np.column_stack(values).astype("float64", copy=False)

    def feature_matrix(self, trips: Mapping[str, Any]) -> np.ndarray:
        """The (n, len(features)) float64 features of `MODEL_INPUT_COLUMNS` given as columns."""
        return self.catalogue_matrix(trips)[:, self.positions]

    def transform(self, trips: Mapping[str, Any]) -> pd.DataFrame:
        index = trips.index if isinstance(trips, pd.DataFrame) else None
        return pd.DataFrame(self.feature_matrix(trips), columns=list(self.features), index=index)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.array(self.features, dtype=object)
