"""Scoring a file of trips: one prediction per trip out, the rows it could not read in a rejects file.

`score_file` writes `trip_id, membership, proba, model_name, model_version` (proba in percent, as the service
answers) as CSV or Parquet by the output's suffix, by default beside the input as `<name>.predictions.csv`
(`.parquet` for a Parquet input), and the rows it could not read, with the reason, to `<output
name>.rejects.csv` beside it. Every input row is in exactly one of the two. A thread reads and parses the
file in chunks (city_files.py) while two others score the chunks before it, so memory stays bounded whatever
the file's size and both cores stay busy.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic import Field
from threadpoolctl import threadpool_limits
from typing_extensions import TypedDict

from bikeshare_membership import city_files, storage
from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import LoadedModel, ModelRef
from bikeshare_membership.schema import MEMBER, closed, membership, percent

OUTPUT_SUFFIXES = (".csv.gz", ".csv", ".parquet")
OUTPUT_RULE = f"must end with {', '.join(OUTPUT_SUFFIXES)} (or / for a folder)"
PREDICTIONS_TAG = ".predictions"
REJECTS_SUFFIX = ".rejects.csv"
PREDICTION_SCHEMA = pa.schema(
    [
        ("trip_id", pa.large_string()),
        ("membership", pa.string()),
        ("proba", pa.float64()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
    ]
)
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("trip_id", pa.large_string()), ("reason", pa.string())])


# --- Scoring a file ---------------------------------------------------------------------------------


def output_suffix(name: str) -> str | None:
    """The output format `name` asks for by its suffix (case aside), or None."""
    return next((suffix for suffix in OUTPUT_SUFFIXES if name.lower().endswith(suffix)), None)


def default_output_name(input_location: str) -> str:
    """`<name>.predictions.csv` for `<name>.csv[.gz]` or `<name>.zip`; `.parquet` for a Parquet input."""
    name = storage.name_of(input_location)
    suffix = city_files.input_suffix(name) or ""
    result_suffix = ".parquet" if suffix == ".parquet" else ".csv"
    return f"{name[: len(name) - len(suffix)]}{PREDICTIONS_TAG}{result_suffix}"


def resolve_output(input_location: str, output: str | None) -> str:
    """Where results go: `output`, or the default name in `output` if it is a folder (ends with /), or beside
    the input."""
    if output is None:
        return storage.sibling(input_location, default_output_name(input_location))
    if output.endswith("/") or (not storage.is_s3(output) and os.path.isdir(output)):  # False for a name too long
        return storage.inside(output, default_output_name(input_location))
    if output_suffix(output) is None:
        raise ValueError(f"{output}: the output {OUTPUT_RULE}")
    return output


def rejects_location(output: str) -> str:
    """The rejects file beside an output: its name with `.rejects.csv` for the format's suffix."""
    name = storage.name_of(output)
    suffix = output_suffix(name) or ""
    return storage.sibling(output, f"{name[: len(name) - len(suffix)]}{REJECTS_SUFFIX}")


def is_batch_output(name: str) -> bool:
    """Whether a file is one `score` wrote (so `watch` does not take it for an input)."""
    return PREDICTIONS_TAG + "." in name or name.endswith(REJECTS_SUFFIX)


@closed
class BatchSummary(TypedDict):
    """A scored file: where its predictions and rejects went, and how many of each."""

    input: str
    output: str
    rejects: str
    rows: int
    scored: int
    rejected: int
    rejected_by_reason: dict[str, int]
    member_share: Annotated[float, Field(description="The share of scored trips predicted Member.")]
    seconds: float
    model: ModelRef
    rows_per_s: float


@dataclass(frozen=True)
class ScoreSummary:
    """What `score_file` did: `as_dict` is its JSON form (a job's `summary`), `line` its line for a person."""

    input: str
    output: str
    rejects: str
    rows: int
    scored: int
    rejected: int
    rejected_by_reason: dict[str, int]
    member_share: float  # of the scored trips, predicted Member at the shared threshold
    seconds: float
    model: ModelRef

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary a person reads at the end of a run."""
        reasons = ", ".join(f"{count:,} {reason}" for reason, count in self.rejected_by_reason.items())
        rejected = f"{self.rejected:,} rejected ({reasons}) -> {self.rejects}" if self.rejected else "0 rejected"
        return (
            f"{self.rows:,} rows in {self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s): {self.scored:,} scored, "
            f"{self.member_share:.1%} predicted Member -> {self.output}; {rejected}; "
            f"model {self.model['name']} version {self.model['version']}"
        )

    def as_dict(self) -> BatchSummary:
        return {
            "input": self.input,
            "output": self.output,
            "rejects": self.rejects,
            "rows": self.rows,
            "scored": self.scored,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "member_share": self.member_share,
            "seconds": self.seconds,
            "model": ModelRef(**self.model),
            "rows_per_s": round(self.rows_per_s, 1),
        }


Progress = Callable[[int, int, int], None]  # (rows so far, input bytes read, input size)


def score_file(
    settings: Settings,
    input_location: str,
    output: str | None,
    model: LoadedModel,
    on_progress: Progress | None = None,
    chunk_rows: int = city_files.CHUNK_ROWS,
) -> ScoreSummary:
    """Score every trip of a file and write the predictions and the rejects; see the module docstring."""
    output_location = resolve_output(input_location, output)
    rejects_at = rejects_location(output_location)
    started = time.monotonic()
    rows = scored = members = 0
    reasons: Counter[str] = Counter()
    with (
        storage.local_copy(input_location, settings) as path,
        storage.output_file(output_location, settings) as output_path,
        storage.output_file(rejects_at, settings) as rejects_path,
        _table_writer(output_path, output_suffix(output_location), PREDICTION_SCHEMA) as predictions,
        _table_writer(rejects_path, ".csv", REJECT_SCHEMA) as rejects,
        threadpool_limits(limits=1, user_api="openmp"),  # one core per model call: see MODEL_THREADS
    ):
        size = path.stat().st_size
        for chunk, proba in _scored(_read_ahead(city_files.read_chunks(path, chunk_rows)), model):
            trips, rejected = chunk.parsed.trips, chunk.parsed.rejects
            labels = membership(proba)
            predictions.write_table(_prediction_table(trips["trip_id"], labels, proba, model))
            rejects.write_table(_reject_table(chunk.source, rejected))
            rows += len(trips) + len(rejected)
            scored += len(trips)
            members += int((labels == MEMBER).sum())
            reasons.update({str(reason): int(count) for reason, count in rejected["reason"].value_counts().items()})
            if on_progress is not None:
                on_progress(rows, chunk.bytes_read, size)
    return ScoreSummary(
        input=input_location,
        output=output_location,
        rejects=rejects_at,
        rows=rows,
        scored=scored,
        rejected=rows - scored,
        rejected_by_reason=dict(reasons.most_common()),
        member_share=members / scored if scored else 0.0,
        seconds=time.monotonic() - started,
        model=model.describe(),
    )


# Chunks scored at once, each by a thread whose model runs on one core (`threadpool_limits` in `score_file`).
# On this 2-core machine two single-threaded model calls beat one call on two OpenMP threads (whose threads
# wait for each other at every tree), and the reading thread fills the gaps. Each holds one chunk in memory.
MODEL_THREADS = 2


def _scored(
    chunks: Iterator[city_files.TripChunk], model: LoadedModel
) -> Iterator[tuple[city_files.TripChunk, np.ndarray]]:
    """Each chunk with its probabilities, in the file's order; MODEL_THREADS chunks are scored at once."""

    def probabilities(chunk: city_files.TripChunk) -> np.ndarray:
        trips = chunk.parsed.trips
        return model.member_probability(trips) if len(trips) else np.empty(0)

    with ThreadPoolExecutor(max_workers=MODEL_THREADS, thread_name_prefix="model") as pool:
        scoring: deque[tuple[city_files.TripChunk, Future[np.ndarray]]] = deque()
        for chunk in chunks:
            scoring.append((chunk, pool.submit(probabilities, chunk)))
            if len(scoring) == MODEL_THREADS:
                done, future = scoring.popleft()
                yield done, future.result()
        for done, future in scoring:
            yield done, future.result()


def _read_ahead(chunks: Generator[city_files.TripChunk, None, None]) -> Iterator[city_files.TripChunk]:
    """Yield chunks while a thread reads and parses the next one, so reading overlaps the model's work."""
    with closing(chunks), ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as reader:
        upcoming = reader.submit(next, chunks, None)
        while (chunk := upcoming.result()) is not None:
            upcoming = reader.submit(next, chunks, None)
            yield chunk


@contextmanager
def _table_writer(path: Path, suffix: str | None, schema: pa.Schema) -> Iterator[Any]:
    """A streaming CSV (`.csv`, `.csv.gz`) or Parquet (`.parquet`) writer."""
    with pa.OSFile(str(path), "wb") as file:
        sink = pa.CompressedOutputStream(file, "gzip") if suffix == ".csv.gz" else file
        writer = (
            pq.ParquetWriter(sink, schema, compression="zstd")
            if suffix == ".parquet"
            else pa_csv.CSVWriter(sink, schema)
        )
        with closing(sink), closing(writer):  # the writer finishes first
            yield writer


def _prediction_table(trip_ids: pd.Series, labels: np.ndarray, proba: np.ndarray, model: LoadedModel) -> pa.Table:
    count = len(trip_ids)
    return pa.table(
        [
            pa.array(trip_ids.astype("str"), type=pa.large_string(), from_pandas=True),
            pa.array(labels, type=pa.string()),
            pa.array(percent(proba), type=pa.float64()),
            pa.repeat(pa.scalar(model.name), count),
            pa.repeat(pa.scalar(model.version), count),
        ],
        schema=PREDICTION_SCHEMA,
    )


def _reject_table(source: str, rejects: pd.DataFrame) -> pa.Table:
    count = len(rejects)
    return pa.table(
        [
            pa.repeat(pa.scalar(source), count),
            pa.array(rejects["trip_id"].astype("str"), type=pa.large_string(), from_pandas=True),
            pa.array(rejects["reason"].astype("str"), type=pa.string(), from_pandas=True),
        ],
        schema=REJECT_SCHEMA,
    )
