"""Generated trip files for the benchmarks: the bundled real trips, resampled and moved to other dates."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bikeshare_membership import stations

CITY_TIME_FORMAT = "%m/%d/%Y %H:%M"
BUNDLED = sorted(stations.DATA_DIR.glob("bikeshare-ridership-2023-*.csv.gz"))


def bundled_rows() -> pd.DataFrame:
    """Every bundled trip as the City wrote it (2019-2024 layout, text)."""
    frames = [pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8-sig") for file in BUNDLED]
    return pd.concat(frames, ignore_index=True)


def moved(
    real: pd.DataFrame, rows: int, first_monday: pd.Timestamp, weeks: int, rng: np.random.Generator
) -> pd.DataFrame:
    """`rows` trips drawn from `real`, each moved to the same weekday and time of day (give or take five minutes)
    in one of the `weeks` weeks from `first_monday`, in start order, their end moved with them."""
    trips = real.iloc[rng.integers(0, len(real), rows)].reset_index(drop=True)
    start = pd.to_datetime(trips["Start Time"], format=CITY_TIME_FORMAT)
    stop = pd.to_datetime(trips["End Time"], format=CITY_TIME_FORMAT)
    start_moved = (
        first_monday
        + pd.to_timedelta(rng.integers(0, weeks, rows) * 7 + start.dt.day_of_week, unit="D")
        + (start - start.dt.normalize())
        + pd.to_timedelta(rng.integers(-5, 6, rows), unit="min")
    )
    order = np.argsort(start_moved.to_numpy(), kind="stable")
    trips = trips.iloc[order].reset_index(drop=True)
    trips["Start Time"] = start_moved.iloc[order].dt.strftime(CITY_TIME_FORMAT).to_numpy()
    trips["End Time"] = (start_moved + (stop - start)).iloc[order].dt.strftime(CITY_TIME_FORMAT).to_numpy()
    return trips
