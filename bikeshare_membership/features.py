"""The model's features, defined once: `trip_features` computes them from the typed trip columns, and
`FittedFeatures` applies them with a fitted model's stations and holidays. The pipeline's first step
(`TripFeatures`, feature_step.py) and the fast form (fast_pipeline.py) both compute through it; this module
needs no scikit-learn, so a process that serves a saved fast form never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import date
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

# --- Features ---------------------------------------------------------------------------------------

# Trips as the model takes them: `MODEL_INPUT_COLUMNS` as a DataFrame's columns, or as arrays by name.
TripColumns = pd.DataFrame | Mapping[str, Any]

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


def _is_in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """`np.isin` for a sorted array of candidates, through a binary search: far cheaper on a request's few
    hundred values, where `np.isin` spends its time sorting or hashing (docs/performance.md)."""
    if not len(sorted_values):
        return np.zeros(np.shape(values), dtype=bool)
    position = np.minimum(sorted_values.searchsorted(values), len(sorted_values) - 1)
    return sorted_values[position] == values


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
    is_in=_is_in_sorted,
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


class FittedFeatures:
    """The features a fitted model computes (`features`, a subset of FEATURE_CATALOGUE), from the station
    coordinates and the holiday calendar it was fitted with. Stations stay as ids (`route` is from * 10000 + to);
    the pipeline's encoder turns them into numbers."""

    def __init__(
        self,
        features: tuple[str, ...],
        station_ids: np.ndarray,
        station_coordinates: np.ndarray,
        holiday_days: np.ndarray,
    ) -> None:
        self.features = features
        self.station_ids_ = station_ids  # sorted, float64
        self.station_coordinates_ = station_coordinates  # (n, 2) latitude, longitude in radians
        self.holiday_days_ = holiday_days  # sorted day numbers since 1970-01-01

    def _coordinates(self, station_ids: np.ndarray) -> np.ndarray:
        """(n, 2) latitude/longitude in radians; NaN for an unknown station."""
        position = np.minimum(self.station_ids_.searchsorted(station_ids), len(self.station_ids_) - 1)
        known = self.station_ids_[position] == station_ids
        return np.where(known[:, None], self.station_coordinates_[position], np.nan)

    @property
    def positions(self) -> list[int]:
        """Where each of `features` stands in FEATURE_CATALOGUE."""
        return [FEATURE_CATALOGUE.index(name) for name in self.features]

    def catalogue_matrix(self, trips: TripColumns) -> np.ndarray:
        """The (n, len(FEATURE_CATALOGUE)) float64 features of `MODEL_INPUT_COLUMNS` given as columns."""
        return np.column_stack(self.catalogue_columns(trips))

    def catalogue_columns(self, trips: TripColumns) -> list[np.ndarray]:
        """`catalogue_matrix`'s columns, each its own float64 array (no matrix to build and slice again)."""
        seconds = np.asarray(trips["trip_start_time"], dtype="datetime64[s]").astype("int64")
        duration = np.asarray(trips["trip_duration_seconds"], dtype="float64").clip(0, MAX_DURATION_SECONDS)
        from_id = np.asarray(trips["from_station_id"], dtype="float64")
        to_id = np.asarray(trips["to_station_id"], dtype="float64")
        ends = self._coordinates(np.concatenate([from_id, to_id]))
        origin, destination = ends[: len(from_id)], ends[len(from_id) :]
        values = trip_features(seconds, duration, from_id, to_id, origin.T, destination.T, self.holiday_days_)
        return [np.asarray(value, dtype="float64") for value in values]

    def feature_matrix(self, trips: TripColumns) -> np.ndarray:
        """The (n, len(features)) float64 features of `MODEL_INPUT_COLUMNS` given as columns."""
        return self.catalogue_matrix(trips)[:, self.positions]
