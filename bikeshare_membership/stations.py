"""The station reference: ids by name and coordinates by id, from the bundled `data/stations.csv`.

City files and requests sometimes name a station without its id (2017 Q3/Q4 files, `NULL` ids); the name
is looked up here, tolerant of case, punctuation and known spelling drifts. `data/README.md` says how the
file is built from the City's snapshots.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
STATIONS_FILE = DATA_DIR / "stations.csv"

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
        if name is None:
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
        coordinates={
            int(station_id): (float(lat), float(lon))
            for station_id, lat, lon in zip(located["station_id"], located["lat"], located["lon"], strict=True)
        },
    )
