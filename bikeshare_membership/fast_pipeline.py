"""An exact, fast evaluation of the fitted membership pipeline, read from it when a version is loaded.

scikit-learn spends milliseconds on one row (pandas, input validation, the boosted trees' thread pool),
while the web service should answer a trip in microseconds. `FastPipeline` evaluates the same fitted
objects directly:

- features: `features.trip_features`, the very definition the pipeline's first step runs (on arrays for
  lists, on Python numbers with math's functions for one trip);
- stations and routes: the `TargetEncoder`'s fitted encodings, as dicts for one trip and a compiled binary
  search for columns (unknown -> the target mean);
- the boosted trees: per-feature tables of leaf masks (QuickScorer, `TreeTables`), evaluated row by row by one
  function that Numba compiles to machine code (`_row_score`), for a list's columns and for one trip's floats
  alike (a single trip's call then builds no array); summed in scikit-learn's order, through the same logistic
  link.

The registry's model stays the single source of truth: pipeline_reader.py builds this from the loaded
pipeline and checks it against `pipeline.predict_proba` before it is used. A checked form is saved with the
cached version as plain arrays (`to_arrays`); `from_arrays` rebuilds it and checks it again against the
probabilities scikit-learn gave, so the next load need not unpickle the pipeline, nor import scikit-learn: this
module needs numpy, scipy and Numba only. Anything it cannot evaluate exactly raises `UnsupportedPipeline`, and the
caller keeps the scikit-learn path. That includes a scikit-learn release whose fitted objects differ from what
is read: the boosted trees' private `_predictors`, `_baseline_prediction` and node records, the encoders'
fitted attributes. Reading them is wrapped (`reading`), so a renamed or reshaped attribute costs the speed,
never the service.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import version
from typing import Any, NamedTuple

import numba
import numpy as np
import pandas as pd
from scipy.special import expit

from bikeshare_membership.features import MAX_DURATION_SECONDS, SCALAR_MATH, FittedFeatures, trip_features
from bikeshare_membership.schema import MODEL_INPUT_COLUMNS, ONE_SECOND, UNIX_EPOCH

# Largest probability difference from scikit-learn that the self-check accepts (issue: within 1e-5).
PARITY_TOLERANCE = 1e-9
# Of the check trips, how many the self-check also sends one at a time (the path a single request takes).
SINGLE_TRIP_CHECKS = 300
UNKNOWN_PLACE = (math.nan, math.nan)


# What reading a fitted object's internals raises when they are not what this module expects: a missing or
# renamed attribute or record field (AttributeError, KeyError, ValueError: numpy's "no field of name"), another
# shape or type (IndexError, TypeError, ValueError).
READING_ERRORS: tuple[type[Exception], ...] = (AttributeError, KeyError, IndexError, TypeError, ValueError)


class UnsupportedPipeline(ValueError):
    """The pipeline has a step this module cannot evaluate exactly."""


@contextmanager
def reading(what: str, *also: type[Exception]) -> Iterator[None]:
    """Turn a failure to read `what` (READING_ERRORS, and `also`) into UnsupportedPipeline naming it; an
    UnsupportedPipeline raised inside passes unchanged."""
    caught = READING_ERRORS + also
    try:
        yield
    except UnsupportedPipeline:
        raise
    except caught as error:
        raise UnsupportedPipeline(
            f"cannot read {what} of scikit-learn {version('scikit-learn')}: {type(error).__name__}: {error}"
        ) from error


class StationEncoding:
    """A fitted binary `TargetEncoder` column as a dict look-up."""

    def __init__(self, categories: np.ndarray, encodings: np.ndarray, missing: float, unknown: float) -> None:
        """`categories`: the known station ids, sorted, with their `encodings`; `missing` for NaN, `unknown` for
        any other id."""
        self.categories, self.encodings = categories, encodings
        self.by_category = dict(zip(categories.tolist(), encodings.tolist(), strict=True))
        self.missing, self.unknown = missing, unknown

    @classmethod
    def from_fitted(cls, categories: np.ndarray, encodings: np.ndarray, target_mean: float) -> StationEncoding:
        """From one column of a fitted encoder, whose categories may include NaN (missing stations seen in fit)."""
        known = ~np.isnan(categories)
        missing = float(encodings[~known][0]) if (~known).any() else target_mean
        order = np.argsort(categories[known])
        return cls(categories[known][order], encodings[known][order], missing, target_mean)

    def encode(self, value: float) -> float:
        return self.missing if value != value else self.by_category.get(value, self.unknown)  # NaN != NaN

    def encode_column(self, values: np.ndarray) -> np.ndarray:
        """`encode` of each value of a float64 column, as one array."""
        return _encoded(values, self.categories, self.encodings, self.missing, self.unknown)


@numba.njit(cache=True)
def _encoded(
    values: np.ndarray, categories: np.ndarray, encodings: np.ndarray, missing: float, unknown: float
) -> np.ndarray:
    """`StationEncoding.encode_column`, compiled: a binary search among the sorted categories for each value (one
    call, where numpy took eight for a column)."""
    encoded = np.empty(len(values))
    for row in range(len(values)):
        value = values[row]
        if value != value:
            encoded[row] = missing
            continue
        found = _first_not_below(categories, value, 0, len(categories))
        encoded[row] = encodings[found] if found < len(categories) and categories[found] == value else unknown
    return encoded


@numba.njit(cache=True)
def _first_not_below(sorted_values: np.ndarray, value: float, low: int, high: int) -> int:
    """The first position in `sorted_values[low:high]` whose value is not below `value` (`high` if none): the rule
    of `np.searchsorted`, side left, for a value that is not NaN."""
    while low < high:
        middle = (low + high) >> 1
        if sorted_values[middle] < value:
            low = middle + 1
        else:
            high = middle
    return low


class BoostedTrees(NamedTuple):
    """A fitted binary classifier's trees: node records (scikit-learn's), in the order it adds them, and the
    baseline raw score they add to."""

    nodes: list[np.ndarray]
    baseline: float


class Split(NamedTuple):
    """One split of a tree, as `TreeTables` reads it."""

    feature: int
    threshold: float
    tree: int
    left_leaves: int  # the bits of the leaves under its left child
    missing_go_to_left: bool


def _number_leaves(nodes: np.ndarray, index: int, leaf_values: list[float], splits: list[Split], tree: int) -> int:
    """Number the leaves under node `index` left to right (their values appended to `leaf_values`) and return
    their bits; append each split under it to `splits`, with the bits of its left subtree's leaves."""
    node = nodes[index]
    if node["is_leaf"]:
        leaf_values.append(float(node["value"]))
        return 1 << (len(leaf_values) - 1)
    left = _number_leaves(nodes, int(node["left"]), leaf_values, splits, tree)
    right = _number_leaves(nodes, int(node["right"]), leaf_values, splits, tree)
    feature, threshold = int(node["feature_idx"]), float(node["num_threshold"])
    splits.append(Split(feature, threshold, tree, left, bool(node["missing_go_to_left"])))
    return left | right


# The position of a 64-bit word's lowest set bit, by De Bruijn multiplication (Leiserson, Prokop and Randall, 1998):
# the isolated bit times DE_BRUIJN_64 has a distinct top 6 bits for each position.
DE_BRUIJN_64 = np.uint64(0x03F79D71B4CB0A89)
LOWEST_BIT_POSITION = np.zeros(64, dtype=np.int64)
LOWEST_BIT_POSITION[[((int(DE_BRUIJN_64) << position) % 2**64) >> 58 for position in range(64)]] = np.arange(64)


# The trees' tables as the compiled functions take them, one argument: table_columns, thresholds, table_starts,
# masks, all_leaves, leaf_values (arrays) and the baseline (`TreeTables._compiled_tables`).
Tables = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]


@numba.njit(cache=True)
def _row_score(row: Any, tables: Tables, reachable: np.ndarray) -> float:
    """One row's raw score, its values by model column in `row` (an array's column, or a tuple of floats), with
    `reachable` holding every tree's leaves (overwritten): per table, a binary search (`np.searchsorted`, side left;
    NaN takes the last row) and one AND of its row of masks; then each tree's exit leaf, added in scikit-learn's
    order."""
    table_columns, thresholds, table_starts, masks, _, leaf_values, baseline = tables
    for table in range(len(table_columns)):
        value = row[table_columns[table]]
        first, nan_row = table_starts[table], table_starts[table + 1] - 1
        # NaN takes its own row; any other value stops at the inf before it at the latest
        found = nan_row if value != value else _first_not_below(thresholds, value, first, nan_row - 1)
        reachable &= masks[found]
    score = baseline
    for tree in range(len(reachable)):
        leaves = np.uint64(reachable[tree])
        lowest = leaves & (~leaves + np.uint64(1))
        score += leaf_values[tree, LOWEST_BIT_POSITION[(lowest * DE_BRUIJN_64) >> np.uint64(58)]]
    return score


@numba.njit(cache=True)
def _raw_scores(columns: np.ndarray, tables: Tables) -> np.ndarray:
    """`TreeTables.raw_scores`: `_row_score` of each row."""
    all_leaves = tables[4]
    scores = np.empty(columns.shape[1])
    reachable = np.empty_like(all_leaves)
    for row in range(columns.shape[1]):
        reachable[:] = all_leaves
        scores[row] = _row_score(columns[:, row], tables, reachable)
    return scores


@numba.njit(cache=True)
def _one_row_score(tables: Tables, *row: float) -> float:
    """`TreeTables.row_score`: the row as floats, the score as a float, so the call builds no array on either side."""
    return _row_score(row, tables, tables[4].copy())


class TreeTables:
    """The boosted trees' raw scores, exactly: QuickScorer's idea (Lucchese et al., 2015), with no walk down a
    tree, so its cost does not grow with the trees' depth, and no branch per split for the CPU to mispredict.

    Number each tree's leaves left to right. Where a row's value fails a split's test (`x <= threshold`, NaN as
    `missing_go_to_left` says) the row goes right, so no leaf of the split's left subtree can be its exit; the
    exit is the leftmost leaf no failed test rules out. For one feature, the splits a value fails are those with
    a threshold below it (the first ones, in the order of their thresholds) or, for NaN, those sending missing
    values right: so a table per feature holds, for each count of thresholds below a value, every tree's leaves
    as bits with those splits' left subtrees cleared. A row's tables, ANDed, leave each tree's exit as its
    lowest bit; its leaf values are added to the baseline tree by tree, in scikit-learn's order.

    The tables are flat arrays (the features' tables one after another) for `_raw_scores` and `_one_row_score`,
    which Numba compiles on their first call (the self-check's, at load time) and caches beside this module or in
    NUMBA_CACHE_DIR.
    """

    def __init__(self, boosted: BoostedTrees, n_features: int) -> None:
        """Raises UnsupportedPipeline for a tree of more than 64 leaves."""
        trees, baseline = boosted
        width = max(int(nodes["is_leaf"].sum()) for nodes in trees)
        if width > 64:
            raise UnsupportedPipeline(f"a tree with {width} leaves; the tables take at most 64")
        self.mask_type = np.uint32 if width <= 32 else np.uint64
        self.all_leaves = np.full(len(trees), np.iinfo(self.mask_type).max, dtype=self.mask_type)
        self.leaf_values = np.zeros((len(trees), width))
        splits: list[Split] = []
        for tree, nodes in enumerate(trees):
            values: list[float] = []
            _number_leaves(nodes, 0, values, splits, tree)
            self.leaf_values[tree, : len(values)] = values
        self.baseline = baseline
        tables = [(feature, self._feature_table(feature, splits)) for feature in range(n_features)]
        used = [(feature, table) for feature, table in tables if table is not None]
        self.table_columns = np.array([feature for feature, _ in used], dtype=np.int64)  # the column each reads
        self.thresholds = np.concatenate([np.empty(0)] + [thresholds for _, (thresholds, _) in used])
        self.table_starts = np.cumsum([0] + [len(thresholds) for _, (thresholds, _) in used], dtype=np.int64)
        self.masks = np.concatenate([np.empty((0, len(trees)), self.mask_type)] + [masks for _, (_, masks) in used])

    def _feature_table(self, feature: int, splits: list[Split]) -> tuple[np.ndarray, np.ndarray] | None:
        """The feature's sorted thresholds followed by inf and NaN (a search then counts the thresholds below a
        value, and gives NaN the last row), and its table: a row per count, then NaN's row."""
        mine = sorted((split for split in splits if split.feature == feature), key=lambda split: split.threshold)
        if not mine:
            return None
        all_leaves = self.all_leaves[0]
        thresholds = np.array([split.threshold for split in mine] + [math.inf, math.nan])
        table = np.full((len(mine) + 2, len(self.all_leaves)), all_leaves)
        for count, split in enumerate(mine, start=1):
            table[count, split.tree] = all_leaves ^ self.mask_type(split.left_leaves)
        np.bitwise_and.accumulate(table[:-1], axis=0, out=table[:-1])
        for split in mine:
            if not split.missing_go_to_left:
                table[-1, split.tree] &= all_leaves ^ self.mask_type(split.left_leaves)
        return thresholds, table

    def raw_scores(self, columns: np.ndarray) -> np.ndarray:
        """The raw score (log-odds of class 1) of each row of the model's columns, a C-ordered (columns, rows)
        float64 array."""
        return _raw_scores(columns, self._compiled_tables())

    def row_score(self, row: Sequence[float]) -> float:
        """`raw_scores` of one row, given as its floats by model column."""
        return _one_row_score(self._compiled_tables(), *row)

    def _compiled_tables(self) -> Tables:
        """The tables as `_raw_scores` and `_one_row_score` take them."""
        return (
            self.table_columns,
            self.thresholds,
            self.table_starts,
            self.masks,
            self.all_leaves,
            self.leaf_values,
            self.baseline,
        )


class FastPipeline:
    """`member_probability(trips)` equal to the pipeline's `predict_proba(trips)[:, 1]`."""

    def __init__(
        self, features: FittedFeatures, columns: list[tuple[int, StationEncoding | None]], boosted: BoostedTrees
    ) -> None:
        """Unchecked until `verify`; raises UnsupportedPipeline for trees or features it cannot read."""
        self.features = features
        self.columns = columns  # per model column: its feature's place in FEATURE_CATALOGUE, and its encoding
        self.boosted = boosted
        with reading("the boosted trees' nodes"):
            self.tables = TreeTables(boosted, len(columns))
        with reading("the features' fitted stations and holidays"):
            # For one trip's features: (latitude, longitude) in radians by station id, and the holidays as a set.
            self.places = dict(
                zip(features.station_ids_.tolist(), map(tuple, features.station_coordinates_.tolist()), strict=True)
            )
            self.holidays = frozenset(features.holiday_days_.tolist())
        self.verified_against: np.ndarray | None = None  # scikit-learn's P(Member) of the check trips, once verified

    def verify(self, check_trips: dict[str, Any], expected: np.ndarray) -> None:
        """Check this form against `expected`, scikit-learn's P(Member) of `check_trips` (`parity_check_trips`:
        every one as columns, the first SINGLE_TRIP_CHECKS also one at a time); raises UnsupportedPipeline past
        PARITY_TOLERANCE, else keeps `expected` as what it was verified against."""
        # Numba compiles on this first call: a compiler that fails on some platform costs the speed, not the service.
        with reading("evaluating the check trips", numba.core.errors.NumbaError):
            singles = (check_trips[column][:SINGLE_TRIP_CHECKS].tolist() for column in MODEL_INPUT_COLUMNS)
            one_by_one = np.array([self.trip_probability(*trip) for trip in zip(*singles, strict=True)])
            in_arrays = self.member_probability(check_trips)
            difference = max(
                float(np.max(np.abs(in_arrays - expected))),
                float(np.max(np.abs(one_by_one - expected[:SINGLE_TRIP_CHECKS]))),
            )
        if not difference <= PARITY_TOLERANCE:  # NaN too
            raise UnsupportedPipeline(f"differs from scikit-learn by {difference:.3g} on the check trips")
        self.verified_against = expected

    def to_arrays(self) -> dict[str, np.ndarray]:
        """What this verified form is built from (the fitted numbers of the pipeline's three steps) and what it was
        verified against, as arrays `np.savez` stores without pickle: `from_arrays` builds the same form back."""
        if self.verified_against is None:
            raise ValueError("only a verified fast form is saved")
        encoded = [(column, encoding) for column, (_, encoding) in enumerate(self.columns) if encoding is not None]
        arrays = {
            "features": np.array(self.features.features, dtype=str),
            "station_ids": self.features.station_ids_,
            "station_coordinates": self.features.station_coordinates_,
            "holiday_days": self.features.holiday_days_,
            "column_positions": np.array([position for position, _ in self.columns], dtype="int64"),
            "encoded_columns": np.array([column for column, _ in encoded], dtype="int64"),
            "encoding_defaults": np.array([[encoding.missing, encoding.unknown] for _, encoding in encoded]),
            "tree_nodes": np.concatenate(self.boosted.nodes),
            "tree_sizes": np.array([len(nodes) for nodes in self.boosted.nodes], dtype="int64"),
            "baseline": np.array(self.boosted.baseline),
            "verified_against": self.verified_against,
        }
        for column, encoding in encoded:
            arrays[f"categories_{column}"], arrays[f"encodings_{column}"] = encoding.categories, encoding.encodings
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FastPipeline:
        """The form `to_arrays` gave, verified again against the same probabilities (so what was checked against
        scikit-learn is what serves); raises UnsupportedPipeline for arrays it cannot read or that disagree."""
        with reading("the saved fast form"):
            features = FittedFeatures(
                tuple(arrays["features"].tolist()),
                arrays["station_ids"],
                arrays["station_coordinates"],
                arrays["holiday_days"],
            )
            encodings = {
                int(column): StationEncoding(
                    arrays[f"categories_{column}"], arrays[f"encodings_{column}"], float(missing), float(unknown)
                )
                for column, (missing, unknown) in zip(
                    arrays["encoded_columns"], arrays["encoding_defaults"], strict=True
                )
            }
            columns = [
                (int(position), encodings.get(column)) for column, position in enumerate(arrays["column_positions"])
            ]
            nodes = np.split(arrays["tree_nodes"], np.cumsum(arrays["tree_sizes"])[:-1])
            fast = cls(features, columns, BoostedTrees(nodes, float(arrays["baseline"])))
            check_trips = parity_check_trips(features, columns)
        fast.verify(check_trips, arrays["verified_against"])
        return fast

    def trip_probability(self, start: datetime, duration: float, from_id: float, to_id: float) -> float:
        """P(Member) of one trip given as Python values, equal to its `member_probability` without the array
        machinery: the path of a single-trip request, where each numpy call costs about a microsecond."""
        seconds = (start - UNIX_EPOCH) // ONE_SECOND
        duration = min(max(duration, 0.0), MAX_DURATION_SECONDS)
        origin, destination = self.places.get(from_id, UNKNOWN_PLACE), self.places.get(to_id, UNKNOWN_PLACE)
        features = trip_features(seconds, duration, from_id, to_id, origin, destination, self.holidays, SCALAR_MATH)
        raw = self.row_score([float(value) for value in features])
        try:
            return 1.0 / (1.0 + math.exp(-raw))  # scipy's `expit`, bit for bit
        except OverflowError:  # exp(-raw) beyond the largest float, where expit answers 0
            return 0.0

    def member_probability(self, trips: pd.DataFrame | Mapping[str, Any]) -> np.ndarray:
        """P(Member) for trips given as columns (a DataFrame, or arrays): features and encodings as arrays, then
        the trees."""
        catalogue = self.features.catalogue_columns(trips)
        columns = [
            encoding.encode_column(catalogue[position]) if encoding else catalogue[position]
            for position, encoding in self.columns
        ]
        return expit(self.tables.raw_scores(np.array(columns)))  # the link scikit-learn's binomial loss uses

    def row_score(self, row: list[float]) -> float:
        """The raw score of one trip's features (FEATURE_CATALOGUE order): stations encoded, then the trees."""
        return self.tables.row_score(
            [encoding.encode(row[position]) if encoding else row[position] for position, encoding in self.columns]
        )


def parity_check_trips(features: FittedFeatures, columns: list[tuple[int, StationEncoding | None]]) -> dict[str, Any]:
    """Trips that reach every kind of input: known, unknown and missing stations, round trips, every hour
    and weekday, durations from 0 s to beyond the cap. Drawn with a fixed seed, so a check is repeatable."""
    rng = np.random.default_rng(2017)
    size = 2000
    encoded = [encoding for _, encoding in columns if encoding is not None]
    known = np.array(sorted(set(features.station_ids_.tolist()) | set(encoded[0].by_category)), dtype="float64")
    stations = np.concatenate([known, [np.nan, 99_999.0]])
    from_id = rng.choice(stations, size)
    to_id = np.where(rng.random(size) < 0.1, from_id, rng.choice(stations, size))
    start = np.datetime64("2017-01-01T00:00:00") + rng.integers(0, 3 * 365 * 86_400, size).astype("timedelta64[s]")
    duration = np.concatenate([[0.0, 59.0, 60.0, 8 * 86_400.0], rng.lognormal(6.5, 1.0, size - 4)])
    return {
        "trip_start_time": start,
        "trip_duration_seconds": duration,
        "from_station_id": from_id,
        "to_station_id": to_id,
    }
