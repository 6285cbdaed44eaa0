"""The City's trip files: every layout they have had, mapped onto the request schema, and read in chunks.

A file is CSV (plain, gzip, or a zip of CSVs as the City publishes a year) or Parquet, in any layout that
`detect_layout` knows; each CSV in a zip is read as a file of its own, with its own layout. Every chunk goes
through `parse_frame`, so training, batch scoring and the Spark job read trips alike, and the date order one
chunk showed is carried into the next (see schema.py). Rows that cannot be scored come back as rejects with
the reason, CSV rows with the wrong number of fields included: none is dropped.

A Spark job reads a file in parts (spark_scoring.py): `read_csv_bytes` reads a part of a CSV held in memory, and
`read_file_bytes` a whole Parquet file or zip, with the same code, under the date order `DateEvidence` gathered
over the whole file decides.

CSV columns are read as bytes with pyarrow's multi-threaded reader and decoded per chunk: as UTF-8, or as
cp1252 where a column is not valid UTF-8 (some of the City's monthly files are cp1252).
"""

from __future__ import annotations

import csv
import gzip
import io
import operator
import zipfile
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import reduce
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from bikeshare_membership.schema import (
    LABELS,
    MISSING_TEXT,
    REQUIRED_FIELDS,
    TRIP_FIELDS,
    DateOrder,
    arrow_text,
    order_from_evidence,
    parse_timestamp_columns,
    slash_date_evidence,
)
from bikeshare_membership.stations import station_index

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


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
    date_order: DateOrder  # the order the slash dates were read in
    date_evidence: DateEvidence  # what they show, whatever order they were read in


_DECIMAL_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def parse_numbers(values: pd.Series) -> np.ndarray:
    """Finite decimal numbers as float64; NaN where a text is missing or not a number."""
    text = pc.utf8_trim_whitespace(arrow_text(values))
    numbers = pc.cast(pc.if_else(pc.match_substring_regex(text, _DECIMAL_NUMBER), text, None), pa.float64())
    result = numbers.to_numpy(zero_copy_only=False)
    return np.where(np.isfinite(result), result, np.nan)


def _distinct_texts(values: pd.Series) -> tuple[np.ndarray, list[str | None]]:
    """Each row's position in the column's distinct stripped texts; the last one, None, stands for missing.

    `NULL`, `NULLNULL`, blanks and the like are missing. Files repeat a few hundred station names and two
    labels over every row, so working on the distinct texts keeps a chunk's text handling cheap.
    """
    text = pc.utf8_trim_whitespace(arrow_text(values))
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


def _schema_frame(raw: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """A raw City frame's columns under the schema's names, in its order (missing ones empty)."""
    raw = raw.rename(columns=lambda name: name.strip().lstrip("\ufeff"))
    return raw.rename(columns=layout.columns).reindex(columns=list(TRIP_FIELDS))


@dataclass(frozen=True)
class DateEvidence:
    """What a file's slash dates show: some first number over 12 (day-first), some second one (month-first).

    Gathered over the parts of a file and or-ed, it decides the file's date order as one chunk's dates decide the
    chunk's (schema.py's rule): the order shown, or the layout's when the dates show neither or both.
    """

    day_first: bool = False
    month_first: bool = False

    def __or__(self, other: DateEvidence) -> DateEvidence:
        return DateEvidence(self.day_first or other.day_first, self.month_first or other.month_first)

    def order(self, layout: Layout) -> DateOrder:
        return order_from_evidence(self.day_first, self.month_first, layout.date_order)


def parse_frame(raw: pd.DataFrame, layout: Layout, date_order: DateOrder | None = None) -> ParsedTrips:
    """Map a raw City frame (all columns as read) to the schema, rejecting rows that cannot be scored.

    `date_order` overrides the layout's default, for a chunk of a file whose earlier chunks showed it.
    """
    frame = _schema_frame(raw, layout)
    default_order = date_order or layout.date_order
    (start, stop), evidence = parse_timestamp_columns(
        [frame["trip_start_time"], frame["trip_stop_time"]], default_order
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
    return ParsedTrips(
        trips=trips[~bad],
        rejects=rejects,
        date_order=order_from_evidence(*evidence, default_order),
        date_evidence=DateEvidence(*evidence),
    )


CHUNK_ROWS = 131_072  # trips parsed and scored at a time: large enough to be cheap per trip, small in memory
# pyarrow's unit of reading (about 8,000 trips); it reads ahead several, so a larger one costs memory, not time.
CSV_BLOCK_BYTES = 1 << 20
INPUT_SUFFIXES = (".csv.gz", ".csv", ".zip", ".parquet")
MAX_HEADER_BYTES = 1 << 20


def input_suffix(name: str) -> str | None:
    """The readable suffix `name` ends with (case aside), or None."""
    return next((suffix for suffix in INPUT_SUFFIXES if name.lower().endswith(suffix)), None)


@dataclass(frozen=True)
class TripChunk:
    source: str  # the file, or the CSV inside a zip, the rows come from
    parsed: ParsedTrips
    bytes_read: int  # how far into the input file reading has got, for a progress bar


class _CountingReader(io.RawIOBase):
    """A binary file that counts the bytes read through it: the progress of a pass over a file."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        self.file, self.bytes_read = file, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        count = self.file.readinto(buffer)
        self.bytes_read += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


def read_chunks(path: Path, chunk_rows: int = CHUNK_ROWS) -> Generator[TripChunk, None, None]:
    """The trips of a local file, chunk by chunk; raises ValueError for a file it cannot read at all."""
    suffix = input_suffix(path.name)
    if suffix is None:
        raise ValueError(f"{path.name}: not a trip file (expected one of {', '.join(INPUT_SUFFIXES)})")
    with open(path, "rb") as file:
        counted = _CountingReader(file)
        if suffix == ".parquet":
            yield from _parquet_chunks(counted, path.name, chunk_rows)
        elif suffix == ".zip":
            yield from _zip_chunks(counted, counted, chunk_rows)
        else:
            gzipped = suffix == ".csv.gz"
            with gzip.open(path) if gzipped else open(path, "rb") as start:
                header = _read_header(start)
            data = pa.PythonFile(counted, mode="r")
            stream = pa.CompressedInputStream(data, "gzip") if gzipped else data
            yield from _csv_chunks(header, stream, path.name, counted, chunk_rows)


def _zip_chunks(
    file: IO[bytes] | io.RawIOBase, counted: _CountingReader | None, chunk_rows: int
) -> Iterator[TripChunk]:
    """Each CSV of the zip `file` read as a file of its own (its own layout and date order), in name order."""
    with zipfile.ZipFile(file) as archive:
        members = sorted(name for name in archive.namelist() if _is_zipped_csv(name))
        if not members:
            raise ValueError("the zip holds no CSV file")
        for member in members:
            with archive.open(member) as start:
                header = _read_header(start)
            with archive.open(member) as data:
                yield from _csv_chunks(header, pa.PythonFile(data, mode="r"), member, counted, chunk_rows)


def _is_zipped_csv(name: str) -> bool:
    """A CSV in a zip, not a folder nor the metadata macOS adds (`__MACOSX/`, `._name`)."""
    return name.lower().endswith(".csv") and not name.startswith("__MACOSX/") and not Path(name).name.startswith(".")


def _read_header(stream: IO[bytes] | io.BufferedIOBase) -> list[str]:
    return header_names(stream.readline(MAX_HEADER_BYTES))


def header_names(line: bytes) -> list[str]:
    """The column names of a CSV header line (a UTF-8 byte order mark and the line's end left out)."""
    text = line.decode("utf-8-sig", errors="replace")
    return next(csv.reader([text.rstrip("\r\n")]), [])


def _open_csv(
    header: list[str], data: pa.NativeFile, columns: list[str], malformed: list[pa_csv.InvalidRow]
) -> pa_csv.CSVStreamingReader:
    """pyarrow's reader of `columns` as bytes; rows with the wrong number of fields go to `malformed`."""

    def skip_malformed(row: pa_csv.InvalidRow) -> str:
        malformed.append(row)
        return "skip"

    return pa_csv.open_csv(
        data,
        read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        parse_options=pa_csv.ParseOptions(invalid_row_handler=skip_malformed),
        convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.large_binary() for name in header}, include_columns=columns
        ),
    )


def _csv_chunks(
    header: list[str],
    data: pa.NativeFile,
    source: str,
    counted: _CountingReader | None,
    chunk_rows: int,
    date_order: DateOrder | None = None,
) -> Iterator[TripChunk]:
    layout = detect_layout(header)
    wanted = [name for name in header if name.strip() in layout.columns]
    trip_id_at = next((i for i, name in enumerate(header) if layout.columns.get(name.strip()) == "trip_id"), None)
    malformed: list[pa_csv.InvalidRow] = []
    reader = _open_csv(header, data, wanted, malformed)
    for table in _regrouped(reader, reader.schema, chunk_rows):
        parsed = parse_frame(_text_frame(table), layout, date_order)
        date_order = parsed.date_order
        yield TripChunk(source, _with_malformed(parsed, malformed, trip_id_at), _bytes_read(counted))
    if malformed:  # rows of a last block that held nothing else
        empty = pa.Table.from_batches([], schema=reader.schema)
        parsed = parse_frame(_text_frame(empty), layout, date_order)
        yield TripChunk(source, _with_malformed(parsed, malformed, trip_id_at), _bytes_read(counted))


def _bytes_read(counted: _CountingReader | None) -> int:
    return counted.bytes_read if counted is not None else 0


def _regrouped(batches: Iterator[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    """pyarrow's small batches as tables of `rows` rows (the last one shorter)."""
    pending = pa.Table.from_batches([], schema=schema)
    for batch in batches:
        pending = pa.concat_tables([pending, pa.Table.from_batches([batch])])
        while pending.num_rows >= rows:
            yield pending.slice(0, rows)
            pending = pending.slice(rows)
    if pending.num_rows:
        yield pending


def _with_malformed(parsed: ParsedTrips, malformed: list[pa_csv.InvalidRow], trip_id_at: int | None) -> ParsedTrips:
    """Add the CSV rows pyarrow skipped since the last chunk to the chunk's rejects."""
    if not malformed:
        return parsed
    rows, malformed[:] = list(malformed), []
    trip_ids = []
    for row in rows:
        fields = next(csv.reader([row.text]), [])
        trip_ids.append(fields[trip_id_at] if trip_id_at is not None and trip_id_at < len(fields) else None)
    reasons = [f"malformed CSV row: {row.actual_columns} fields, expected {row.expected_columns}" for row in rows]
    skipped = pd.DataFrame({"trip_id": pd.Series(trip_ids, dtype="str"), "reason": reasons})
    return replace(parsed, rejects=pd.concat([parsed.rejects, skipped], ignore_index=True))


def _parquet_chunks(
    counted: _CountingReader | pa.NativeFile,
    source: str,
    chunk_rows: int,
    date_order: DateOrder | None = None,
    whole_file_order: bool = False,
) -> Iterator[TripChunk]:
    """A Parquet file's trips; with `whole_file_order`, under the date order its two timestamp columns show over
    the whole file (read first, alone), as a Spark job decides a file's order."""
    parquet = pq.ParquetFile(counted)
    header = parquet.schema_arrow.names
    layout = detect_layout(header)
    wanted = [name for name in header if name.strip() in layout.columns]
    if whole_file_order:
        evidence = DateEvidence()
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=_timestamp_columns(header, layout)):
            evidence |= _evidence(batch)
        date_order = evidence.order(layout)
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=wanted):
        parsed = parse_frame(_text_frame(pa.Table.from_batches([batch])), layout, date_order)
        date_order = parsed.date_order
        yield TripChunk(source, parsed, counted.bytes_read if isinstance(counted, _CountingReader) else 0)


def _text_frame(table: pa.Table) -> pd.DataFrame:
    """A table as the all-text frame `parse_frame` reads."""
    columns = [_as_text(column.combine_chunks()) for column in table.columns]
    return pa.Table.from_arrays(columns, names=table.schema.names).to_pandas()


def _as_text(column: pa.Array) -> pa.Array:
    """A column as text: bytes decoded as UTF-8 (cp1252 if that fails), anything else formatted."""
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return column.cast(pa.large_string())
    try:
        return column.cast(pa.large_string())
    except pa.ArrowInvalid:  # not UTF-8: decode value by value
        return pa.array([_decode(value) for value in column.to_pylist()], pa.large_string())


def _decode(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("cp1252", errors="replace")


# --- Parts of a file held in memory (a Spark job's) ------------------------------------------------------


def read_csv_bytes(
    data: bytes, source: str, date_order: DateOrder | None = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[ParsedTrips]:
    """The trips of CSV text in memory, its header line first (a Spark task's lines of one file with the file's
    header put back), read as `read_chunks` reads a file, under `date_order` (the file's) from the first row."""
    header = header_names(data[: data.find(b"\n") + 1 or len(data)])
    for chunk in _csv_chunks(header, pa.BufferReader(data), source, None, chunk_rows, date_order):
        yield chunk.parsed


def _timestamp_columns(header: Sequence[str], layout: Layout) -> list[str]:
    return [name for name in header if layout.columns.get(name.strip()) in ("trip_start_time", "trip_stop_time")]


def _evidence(batch: pa.RecordBatch) -> DateEvidence:
    """The date evidence of a batch of a file's timestamp columns, as read (text, bytes, or typed)."""
    return DateEvidence(*slash_date_evidence([_as_text(column) for column in batch.columns]))


def read_file_bytes(content: bytes | pa.Buffer, source: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[TripChunk]:
    """The trips of a whole Parquet file or zip in memory (`source` names it), as `read_chunks` reads the file,
    except that a Parquet file's order is the one its whole file shows: each chunk's source is the file, or the
    CSV inside the zip."""
    if input_suffix(source) == ".zip":
        yield from _zip_chunks(io.BytesIO(content), None, chunk_rows)
    else:
        yield from _parquet_chunks(pa.BufferReader(content), source, chunk_rows, whole_file_order=True)


def read_trips(path: str | Path) -> ParsedTrips:
    """A whole City trip file of any layout and format, through the chunked reader, as one ParsedTrips."""
    chunks = [chunk.parsed for chunk in read_chunks(Path(path))]
    return ParsedTrips(
        trips=pd.concat([parsed.trips for parsed in chunks], ignore_index=True),
        rejects=pd.concat([parsed.rejects for parsed in chunks], ignore_index=True),
        date_order=chunks[-1].date_order,
        date_evidence=reduce(operator.or_, (parsed.date_evidence for parsed in chunks), DateEvidence()),
    )
