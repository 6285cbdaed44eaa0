"""Reading City trip files in chunks of bounded size, for batch scoring.

A file is CSV (plain, gzip, or a zip of CSVs as the City publishes a year) or Parquet, in any layout that
`preprocess.detect_layout` knows; each CSV in a zip is read as a file of its own, with its own layout. Every
chunk goes through `preprocess.parse_frame`, so a batch reads trips exactly as training and the service do,
and the date order one chunk showed is carried into the next (see preprocess.py). Rows that cannot be scored
come back as rejects with the reason, CSV rows with the wrong number of fields included: none is dropped.

CSV columns are read as bytes with pyarrow's multi-threaded reader and decoded per chunk: as UTF-8, or as
cp1252 where a column is not valid UTF-8 (some of the City's monthly files are cp1252).
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

import preprocess

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
    parsed: preprocess.ParsedTrips
    bytes_read: int  # how far into the input file reading has got, for a progress bar


class _CountingReader(io.RawIOBase):
    """A binary file that counts the bytes read through it: the progress of a pass over a file."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.bytes_read = file, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        count = self.file.readinto(buffer)
        self.bytes_read += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


def read_chunks(path: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[TripChunk]:
    """The trips of a local file, chunk by chunk; raises ValueError for a file it cannot read at all."""
    suffix = input_suffix(path.name)
    if suffix is None:
        raise ValueError(f"{path.name}: not a trip file (expected one of {', '.join(INPUT_SUFFIXES)})")
    with open(path, "rb") as file:
        counted = _CountingReader(file)
        if suffix == ".parquet":
            yield from _parquet_chunks(counted, path.name, chunk_rows)
        elif suffix == ".zip":
            yield from _zip_chunks(counted, chunk_rows)
        else:
            gzipped = suffix == ".csv.gz"
            with gzip.open(path) if gzipped else open(path, "rb") as start:
                header = _read_header(start)
            data = pa.PythonFile(counted, mode="r")
            stream = pa.CompressedInputStream(data, "gzip") if gzipped else data
            yield from _csv_chunks(header, stream, path.name, counted, chunk_rows)


def _zip_chunks(counted: _CountingReader, chunk_rows: int) -> Iterator[TripChunk]:
    with zipfile.ZipFile(counted) as archive:
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


def _read_header(stream: BinaryIO) -> list[str]:
    line = stream.readline(MAX_HEADER_BYTES).decode("utf-8-sig", errors="replace")
    return next(csv.reader([line.rstrip("\r\n")]), [])


def _csv_chunks(
    header: list[str], data: pa.NativeFile, source: str, counted: _CountingReader, chunk_rows: int
) -> Iterator[TripChunk]:
    layout = preprocess.detect_layout(header)
    wanted = [name for name in header if name.strip() in layout.columns]
    trip_id_at = next((i for i, name in enumerate(header) if layout.columns.get(name.strip()) == "trip_id"), None)
    malformed: list[pa_csv.InvalidRow] = []

    def skip_malformed(row: pa_csv.InvalidRow) -> str:
        malformed.append(row)
        return "skip"

    reader = pa_csv.open_csv(
        data,
        read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        parse_options=pa_csv.ParseOptions(invalid_row_handler=skip_malformed),
        convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.large_binary() for name in header}, include_columns=wanted
        ),
    )
    date_order = None
    for table in _regrouped(reader, reader.schema, chunk_rows):
        parsed = preprocess.parse_frame(_text_frame(table), layout, date_order)
        date_order = parsed.date_order
        yield TripChunk(source, _with_malformed(parsed, malformed, trip_id_at), counted.bytes_read)
    if malformed:  # rows of a last block that held nothing else
        empty = pa.Table.from_batches([], schema=reader.schema)
        parsed = preprocess.parse_frame(_text_frame(empty), layout, date_order)
        yield TripChunk(source, _with_malformed(parsed, malformed, trip_id_at), counted.bytes_read)


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


def _with_malformed(
    parsed: preprocess.ParsedTrips, malformed: list[pa_csv.InvalidRow], trip_id_at: int | None
) -> preprocess.ParsedTrips:
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


def _parquet_chunks(counted: _CountingReader, source: str, chunk_rows: int) -> Iterator[TripChunk]:
    parquet = pq.ParquetFile(counted)
    header = parquet.schema_arrow.names
    layout = preprocess.detect_layout(header)
    wanted = [name for name in header if name.strip() in layout.columns]
    date_order = None
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=wanted):
        parsed = preprocess.parse_frame(_text_frame(pa.Table.from_batches([batch])), layout, date_order)
        date_order = parsed.date_order
        yield TripChunk(source, parsed, counted.bytes_read)


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
