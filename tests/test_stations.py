"""`data/stations.csv` locates a 2023 station with a snapshot only where that snapshot still names it."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from bikeshare_membership import stations
from bikeshare_membership.city_files import read_trips

_spec = importlib.util.spec_from_file_location("build_stations", stations.DATA_DIR / "build_stations.py")
assert _spec is not None and _spec.loader is not None
build_stations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_stations)


def snapshot_place(file_name: str, station_id: int) -> tuple[float, float]:
    snapshot = pd.read_csv(stations.DATA_DIR / file_name, index_col="station_id")
    return float(snapshot["lat"][station_id]), float(snapshot["lon"][station_id])


@pytest.mark.parametrize(
    ("name_2023", "name_2025"),
    [
        ("Gould St / Yonge St (Ryerson University)", "Gould St / Yonge St (TMU)"),
        ("Essex St / Christie St - SMART", "Essex St / Christie St"),
        ("Bridgeman Ave / Kendal Ave", "Bridgman Ave / Kendal Ave"),
        ("Hayter St / Laplante Ave", "Hayter St / La Plante Ave"),
        ("Queen St W / York St (City Hall)", "York St / Queen St W (City Hall)"),
        ("Lundy Ave / Etienne Brule Park", "Lundy Ave / Étienne Brûlé Park"),
    ],
)
def test_renames_and_spellings_name_the_same_place(name_2023: str, name_2025: str) -> None:
    assert build_stations.names_agree(name_2023, name_2025)


@pytest.mark.parametrize(
    ("name_2023", "name_2025"),
    [
        ("King St W / Brant St", "East Liberty St / Western Battery Rd"),
        ("324 Cherry St", "Cherry St / Lake Shore Blvd E"),
        ("Queen St W / Gladstone Ave", "Dufferin St / Queen St W"),
        ("424 Wellington St W", "420 Wellington St W"),
    ],
)
def test_another_cross_street_or_number_is_another_place(name_2023: str, name_2025: str) -> None:
    assert not build_stations.names_agree(name_2023, name_2025)


def test_a_station_opened_after_2019_takes_the_2025_coordinates() -> None:
    index = stations.station_index()
    # `St Clair W Subway - Heath Entrance` in the 2023 trips, `St Clair West Subway Station - ...` in 2025.
    assert index.coordinates[7650] == snapshot_place("stations-gbfs-2025-07-07.csv", 7650)
    # The 2019 snapshot names another corner (`Victoria St / Gould St`); 2025 the 2023 one, renamed `(TMU)`.
    assert index.coordinates[7164] == snapshot_place("stations-gbfs-2025-07-07.csv", 7164)
    assert index.id_for("Gould St / Yonge St (TMU)") == 7164


def test_an_id_given_to_another_place_keeps_the_place_its_2023_name_has() -> None:
    index = stations.station_index()
    # 7322 is `King St W / Brant St` in 2019 and 2023, `East Liberty St / Western Battery Rd` in 2025.
    assert index.coordinates[7322] == snapshot_place("stations-gbfs-2019-02-22.csv", 7322)
    assert index.id_for("East Liberty St / Western Battery Rd") is None
    # 7492 is `324 Cherry St` in 2023, `Cherry St / Lake Shore Blvd E` in 2025, and not in 2019.
    assert 7492 not in index.coordinates


def test_a_station_no_snapshot_has_is_not_located() -> None:
    coordinates = stations.station_index().coordinates
    assert 7406 not in coordinates  # `Victoria St / Queen St E`: in the 2023 trips, in neither snapshot
    assert 99_999 not in coordinates


def test_nearly_every_bundled_trip_end_is_located() -> None:
    trips = pd.concat([read_trips(path).trips for path in sorted(stations.DATA_DIR.glob("*.csv.gz"))])
    located = list(stations.station_index().coordinates)
    ends = pd.concat([trips["from_station_id"], trips["to_station_id"]])
    assert ends.isin(located).mean() >= 0.96  # 96.7 % measured, see data/README.md
