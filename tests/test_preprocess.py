"""The data contract: every City layout, the date-order rule, station look-up and feature values."""

from __future__ import annotations

import gzip
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from bikeshare_membership import city_files, feature_step, features, schema, stations
from bikeshare_membership.city_files import read_trips
from bikeshare_membership.schema import InvalidTrip, parse_request_trip

# Real 2017 Q1 rows as the City wrote them (day-first; 10/1/2017 is 10 January), plus one from Q1's
# second half whose day (18) shows the order.
Q1_2017 = """trip_id,trip_start_time,trip_stop_time,trip_duration_seconds,from_station_id,from_station_name,to_station_id,to_station_name,user_type
712382,1/1/2017 0:00,1/1/2017 0:03,223,7051,Wellesley St E / Yonge St Green P,7089,Church St  / Wood St,Member
712441,10/1/2017 0:03,10/1/2017 0:18,890,7143,Kendal Ave / Bernard Ave,7154,Bathurst Subway Station,Member
790000,18/01/2017 22:16,18/01/2017 22:30,846,7077,College Park South,7010,King St W / Spadina Ave,Casual
"""
Q2_2017 = """trip_id,trip_start_time,trip_stop_time,trip_duration_seconds,from_station_id,from_station_name,to_station_id,to_station_name,user_type
1000001,10/6/2017 18:16,10/6/2017 18:30,840,7113,Parliament St / Aberdeen Ave,7199,College St W / Markham St,Member
1000002,27/05/2017 21:17,27/05/2017 21:40,1380,7079,McGill St / Church St,7047,University Ave / Gerrard St W,Casual
"""
# Q3: seven columns, no station ids, month-first: 7/10/2017 is 10 July.
Q3_2017 = """trip_id,trip_start_time,trip_stop_time,trip_duration_seconds,from_station_name,to_station_name,user_type
1500000,7/10/2017 0:00,7/10/2017 0:15,900,Union Station,Front St / Yonge St (Hockey Hall of Fame),Casual
1500001,9/30/2017 23:50,10/1/2017 0:05,900,Queen St E / Berkely St,424 Wellington St. W,Member
1500002,8/1/2017 12:00,8/1/2017 12:20,1200,Base Station,Fringe Next Stage - 7219,Casual
"""
# Q4: month-first, two-digit years, seconds; a sub-minute trip and the NULLNULL row with no stop.
Q4_2017 = """trip_id,trip_start_time,trip_stop_time,trip_duration_seconds,from_station_name,to_station_name,user_type
2383640,12/31/17 23:46:27,1/01/18 00:11:40,1513,Church St  / Wood St,Union Station,Member
2383641,10/01/17 00:00:01,10/01/17 00:00:27,26,Union Station,Union Station,Casual
2302635,11/29/17 05:53:54,NULLNULL,0,Seaton St / Dundas St E,NULL,Casual
"""
Y2018 = """trip_id,trip_duration_seconds,from_station_id,trip_start_time,from_station_name,trip_stop_time,to_station_id,to_station_name,user_type
2383648,393,7018,1/1/2018 0:47,Bremner Blvd / Rees St,1/1/2018 0:54,7176,Bathurst St / Fort York Blvd,Annual Member
2383649,625,7184,1/2/2018 0:52,Ossington Ave / College St,1/2/2018 1:03,7191,Central Tech  (Harbord St),Casual Member
"""
# Real 2023 rows (2019-2024 header, double space in "Trip  Duration", NULL names, a NULL end id).
Y2023 = """\ufeffTrip Id,Trip  Duration,Start Station Id,Start Time,Start Station Name,End Station Id,End Time,End Station Name,Bike Id,User Type
21248760,262,7030,05/01/2023 00:07,Bay St / Wellesley St W,7389,05/01/2023 00:11,College Park- Gerrard Entrance,5575,Casual Member
21248818,1753,7720,05/01/2023 00:25,NULL,7175,05/01/2023 00:54,HTO Park (Queens Quay W),3816,Casual Member
20354845,567,7102,02/01/2023 00:09,Nelson St / Duncan St,NULL,02/01/2023 00:18,NULL,6279,Annual Member
"""
Y2025 = """Trip_Id,Trip_Duration,Start_Station_Id,Start_Time,Start_Station_Name,End_Station_Id,End_Time,End_Station_Name,Bike_Id,User_Type,Bike_Model
30000001,600,7033,2025-06-14T13:05:10,Union Station,7076,2025-06-14T13:15:10,York St / Queens Quay W,1234,Casual,ICONIC
30000002,300,7006,2025-06-16 08:01:00,Bay St / College St (East Side),7033,2025-06-16 08:06:00,Union Station,4321,Member,EFIT
"""


def write(tmp_path: Path, text: str, name: str = "trips.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_2017_q1_is_day_first(tmp_path: Path) -> None:
    parsed = read_trips(write(tmp_path, Q1_2017))
    assert parsed.date_order == "DMY"
    assert list(parsed.trips["trip_start_time"]) == [
        datetime(2017, 1, 1, 0, 0),
        datetime(2017, 1, 10, 0, 3),
        datetime(2017, 1, 18, 22, 16),
    ]
    assert list(parsed.trips["from_station_id"]) == [7051, 7143, 7077]
    assert list(parsed.trips["user_type"]) == ["Member", "Member", "Casual"]
    assert parsed.rejects.empty


def test_2017_q1_ambiguous_rows_alone_still_read_day_first(tmp_path: Path) -> None:
    """A chunk of Q1 with only days 1-12 shows no order; the Q1/Q2 layout's default is day-first."""
    parsed = read_trips(write(tmp_path, Q1_2017.rsplit("\n", 2)[0] + "\n"))
    assert parsed.date_order == "DMY"
    assert parsed.trips["trip_start_time"].iloc[1] == datetime(2017, 1, 10, 0, 3)


def test_2017_q2_is_day_first(tmp_path: Path) -> None:
    parsed = read_trips(write(tmp_path, Q2_2017))
    assert list(parsed.trips["trip_start_time"]) == [datetime(2017, 6, 10, 18, 16), datetime(2017, 5, 27, 21, 17)]


def test_2017_q3_is_month_first_and_stations_are_found_by_name(tmp_path: Path) -> None:
    parsed = read_trips(write(tmp_path, Q3_2017))
    trips = parsed.trips
    assert parsed.date_order == "MDY"
    assert trips["trip_start_time"].iloc[0] == datetime(2017, 7, 10, 0, 0)
    assert trips["trip_stop_time"].iloc[1] == datetime(2017, 10, 1, 0, 5)
    # Spelling drifts: "Front St" for "Front St W", "Berkely" for "Berkeley", "St." for "St".
    assert list(trips["from_station_id"].iloc[:2]) == [7033, 7110]
    assert list(trips["to_station_id"].iloc[:2]) == [7048, 7123]
    # Pseudo-stations are unknown, not errors: the trip is kept with no id.
    assert trips["from_station_id"].isna().iloc[2] and trips["to_station_id"].isna().iloc[2]


def test_2017_q4_two_digit_years_seconds_and_the_nullnull_row(tmp_path: Path) -> None:
    parsed = read_trips(write(tmp_path, Q4_2017))
    trips = parsed.trips
    assert list(trips["trip_start_time"]) == [datetime(2017, 12, 31, 23, 46, 27), datetime(2017, 10, 1, 0, 0, 1)]
    assert trips["trip_stop_time"].iloc[0] == datetime(2018, 1, 1, 0, 11, 40)
    assert list(trips["from_station_id"]) == [7089, 7033]
    assert trips["trip_duration_seconds"].iloc[1] == 26
    assert parsed.rejects.to_dict("records") == [
        {"trip_id": "2302635", "reason": "trip_stop_time: missing or not a date-time"}
    ]


def test_2018_reordered_columns_and_labels(tmp_path: Path) -> None:
    parsed = read_trips(write(tmp_path, Y2018))
    assert city_files.detect_layout(Y2018.splitlines()[0].split(",")).name.startswith("2018")
    assert list(parsed.trips["trip_start_time"]) == [datetime(2018, 1, 1, 0, 47), datetime(2018, 1, 2, 0, 52)]
    assert list(parsed.trips["trip_duration_seconds"]) == [393, 625]
    assert list(parsed.trips["user_type"]) == ["Member", "Casual"]


def test_2019_2024_layout_gzip_bom_and_nulls(tmp_path: Path) -> None:
    path = tmp_path / "2023.csv.gz"
    path.write_bytes(gzip.compress(Y2023.encode("utf-8")))
    parsed = read_trips(path)
    trips = parsed.trips
    assert list(trips["trip_id"]) == ["21248760", "21248818", "20354845"]
    assert trips["trip_start_time"].iloc[2] == datetime(2023, 2, 1, 0, 9)
    assert trips["from_station_name"].iloc[1] is None and trips["from_station_id"].iloc[1] == 7720
    assert math.isnan(trips["to_station_id"].iloc[2])
    assert list(trips["user_type"]) == ["Casual", "Casual", "Member"]


def test_2025_layout_iso_timestamps(tmp_path: Path) -> None:
    parsed = read_trips(write(tmp_path, Y2025))
    assert list(parsed.trips["trip_start_time"]) == [datetime(2025, 6, 14, 13, 5, 10), datetime(2025, 6, 16, 8, 1)]
    assert list(parsed.trips["to_station_id"]) == [7076, 7033]


def test_unknown_layout_is_refused_with_the_missing_column() -> None:
    with pytest.raises(ValueError, match="trip_start_time"):
        city_files.detect_layout(["id", "start", "stop"])


def test_bundled_training_files_parse_without_rejects() -> None:
    for path in sorted(stations.DATA_DIR.glob("bikeshare-ridership-2023-*.csv.gz")):
        parsed = read_trips(path)
        assert parsed.rejects.empty and len(parsed.trips) > 8000
        assert parsed.trips["trip_start_time"].dt.year.eq(2023).all()


@pytest.mark.parametrize(
    "texts",
    [
        ["10/1/2017 0:03", "18/01/2017 22:16", "31/2/2017 0:00", "NULLNULL", "", None],  # day-first evident
        ["12/31/17 23:46:27", "1/01/18 00:11:40", "1/1/2017 24:00", "1/1/2017 0:60", " 7/10/2017 0:00 "],  # month-first
        ["1/10/2017 0:03", "2/3/0000 1:00", "5/6/2024T08:15"],  # nothing evident: the default decides
        ["13/1/2017 0:00", "1/13/2017 0:00", "13/13/2017 0:00"],  # contradicting: the default decides
        ["2017-07-10T12:15:00Z", "2017-01-10T13:03:00+00:00", "2025-06-16 08:01:00", "2017-02-30T10:00:00", "x-y"],
    ],
)
def test_file_columns_read_timestamps_by_the_request_rule(texts: list[str | None]) -> None:
    """The vectorised reader of a file's columns agrees with `parse_timestamps`, text by text."""
    for default in schema.DATE_ORDERS:
        expected, expected_order = schema.parse_timestamps(texts, default)
        half = len(texts) // 2
        columns = [pd.Series(texts[:half], dtype=object), pd.Series(texts[half:], dtype="str")]
        (first, second), evidence = schema.parse_timestamp_columns(columns, default)
        order = schema.order_from_evidence(*evidence, default)
        assert order == expected_order
        assert [None if pd.isna(moment) else moment.to_pydatetime() for moment in [*first, *second]] == expected


def test_columns_held_in_several_arrow_chunks_parse_like_one(tmp_path: Path) -> None:
    """pandas holds a large file's columns as several Arrow chunks (as it does rows put together here)."""
    raw = pd.read_csv(write(tmp_path, Y2018), dtype=str, keep_default_na=False)
    chunked = pd.concat([raw.iloc[:1], raw.iloc[1:]])
    assert pa.array(chunked["trip_id"]).num_chunks == 2
    layout = city_files.detect_layout(list(raw.columns))
    pd.testing.assert_frame_equal(
        city_files.parse_frame(chunked, layout).trips, city_files.parse_frame(raw, layout).trips
    )


def test_numbers_in_files_are_finite_decimals() -> None:
    values = pd.Series([" 223 ", "7030.0", "1e3", "-5", ".5", "NULL", "", None, "inf", "1e999", "0x10", "1,234"])
    parsed = city_files.parse_numbers(values)
    assert parsed[:5].tolist() == [223, 7030, 1000, -5, 0.5]
    assert np.isnan(parsed[5:]).all()


# --- requests: the date-order rule -------------------------------------------------------------------

TRIP = {
    "trip_start_time": "1/10/2017 0:03",
    "trip_stop_time": "1/10/2017 0:18",
    "trip_duration_seconds": 890,
    "from_station_id": 7143,
    "to_station_id": 7154,
}


def test_ambiguous_request_date_is_month_first_by_default() -> None:
    assert parse_request_trip(TRIP)["trip_start_time"] == datetime(2017, 1, 10, 0, 3)


def test_ambiguous_request_date_can_be_read_day_first() -> None:
    assert parse_request_trip(TRIP, date_order="DMY")["trip_start_time"] == datetime(2017, 10, 1, 0, 3)


def test_evidence_in_either_timestamp_decides_both() -> None:
    trip = {**TRIP, "trip_start_time": "12/1/2017 23:55", "trip_stop_time": "13/1/2017 0:10"}
    parsed = parse_request_trip(trip)  # the stop's 13 shows day-first; the start follows it
    assert parsed["trip_start_time"] == datetime(2017, 1, 12, 23, 55)
    assert parsed["trip_stop_time"] == datetime(2017, 1, 13, 0, 10)


def test_each_2017_quarter_format_and_iso_in_requests() -> None:
    cases = {
        "18/04/2017 17:15": datetime(2017, 4, 18, 17, 15),  # Q2, day-first, evident
        "7/10/2017 0:00": datetime(2017, 7, 10, 0, 0),  # Q3, month-first
        "10/01/17 00:00:01": datetime(2017, 10, 1, 0, 0, 1),  # Q4, two-digit year
        "2017-07-10T08:15:00": datetime(2017, 7, 10, 8, 15),  # ISO, Toronto time
        "2017-07-10T12:15:00Z": datetime(2017, 7, 10, 8, 15),  # ISO in UTC -> Toronto (EDT)
        "2017-01-10T13:03:00+00:00": datetime(2017, 1, 10, 8, 3),  # ISO in UTC -> Toronto (EST)
    }
    for text, expected in cases.items():
        parsed = parse_request_trip({**TRIP, "trip_start_time": text, "trip_stop_time": text})
        assert parsed["trip_start_time"] == expected, text


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"trip_start_time": None}, "trip_start_time", "is required"),
        ({"trip_start_time": 20170110}, "trip_start_time", "must be a string"),
        (
            {"trip_start_time": "31/2/2017 0:00", "trip_stop_time": "31/2/2017 0:10"},
            "trip_start_time",
            "not a valid date-time",
        ),
        ({"trip_stop_time": "yesterday"}, "trip_stop_time", "not a valid date-time"),
        ({"trip_stop_time": "1/9/2017 0:00"}, "trip_stop_time", "before trip_start_time"),
        ({"trip_duration_seconds": -5}, "trip_duration_seconds", "must not be negative"),
        ({"trip_duration_seconds": "890"}, "trip_duration_seconds", "must be a number"),
        ({"trip_duration_seconds": True}, "trip_duration_seconds", "must be a number"),
        ({"trip_duration_seconds": float("nan")}, "trip_duration_seconds", "must be a number"),
        ({"from_station_id": "seventy"}, "from_station_id", "whole number"),
        ({"to_station_name": 7154}, "to_station_name", "must be a string"),
        ({"user_type": "Tourist"}, "user_type", "Member, Casual"),
        ({"trip_id": [1]}, "trip_id", "must be a whole number, a string or null"),
        ({"trip_id": 712382.5}, "trip_id", "must be a whole number"),
        ({"from_station_id": "\u00b2"}, "from_station_id", "whole number"),  # str.isdigit() says yes; int() no
        ({"to_station_id": "9" * 400}, "to_station_id", "at most 18 digits"),
        ({"trip_start_time": "0001-01-01T00:00:00+05:00"}, "trip_start_time", "not a valid date-time"),
        ({"trip_stop_time": "9999-12-31T23:59:59-05:00"}, "trip_stop_time", "not a valid date-time"),
    ],
)
def test_invalid_request_trips_name_the_field(change: dict, field: str, message: str) -> None:
    with pytest.raises(InvalidTrip) as raised:
        parse_request_trip({**TRIP, **change}, item=3)
    assert raised.value.field == field and message in raised.value.message and raised.value.item == 3


def test_station_names_resolve_through_spacing_and_spelling_drifts() -> None:
    index = stations.station_index()
    assert index.id_for("Church St / Wood St") == index.id_for("Church St  / Wood St") == 7089
    assert index.id_for("Wellesley St E / Yonge St (Green P)") == index.id_for("Wellesley St E / Yonge St Green P")
    assert index.id_for("College St W / Markham St") == 7199
    assert index.id_for("Nowhere Rd / Imaginary Ave") is None
    assert index.id_for("NULL") is None


# --- features ----------------------------------------------------------------------------------------


def test_features_match_hand_computed_values() -> None:
    # Union Station (7033) 43.645609,-79.380386 -> York St / Queens Quay W (7076) 43.640132,-79.380464,
    # on Saturday 2017-07-15 at 14:30, for 600 s.
    trips = schema.RequestTrips.of(
        [
            parse_request_trip(
                {
                    **TRIP,
                    "trip_start_time": "2017-07-15T14:30:00",
                    "trip_stop_time": "2017-07-15T14:40:00",
                    "trip_duration_seconds": 600,
                    "from_station_id": 7033,
                    "to_station_id": 7076,
                }
            ),
            parse_request_trip({**TRIP, "from_station_id": None, "to_station_id": None}),
            # Good Friday 2023, a Friday and an Ontario statutory holiday; the Monday after New Year's Day 2017 (a
            # Sunday), the day it was observed; a plain Tuesday.
            parse_request_trip({**TRIP, "trip_start_time": "4/7/2023 9:00", "trip_stop_time": "4/7/2023 9:10"}),
            parse_request_trip({**TRIP, "trip_start_time": "1/2/2017 9:00", "trip_stop_time": "1/2/2017 9:10"}),
            parse_request_trip({**TRIP, "trip_start_time": "1/3/2017 9:00", "trip_stop_time": "1/3/2017 9:10"}),
        ]
    ).model_input()
    computed = feature_step.TripFeatures(features.FEATURE_CATALOGUE).fit(trips).transform(trips)
    first = computed.iloc[0]
    distance = 6371.0 * math.radians(43.645609 - 43.640132)  # due south, so the arc is the latitude difference
    assert first["duration_log"] == pytest.approx(math.log(601))
    assert first["start_hour"] == pytest.approx(14.5)
    assert first["weekday"] == 5 and first["month"] == 7 and first["round_trip"] == 0
    assert (first["holiday"], first["free_day"]) == (0, 1)  # a Saturday
    assert first["distance_km"] == pytest.approx(distance, rel=1e-3)
    assert first["speed_kmh"] == pytest.approx(distance / (600 / 3600), rel=1e-3)
    assert (first["from_station"], first["to_station"], first["route"]) == (7033, 7076, 7033 * 10000 + 7076)
    assert (first["from_lat"], first["to_lon"]) == pytest.approx((math.radians(43.645609), math.radians(-79.380464)))
    unknown = computed.iloc[1]
    assert np.isnan([unknown["distance_km"], unknown["from_station"], unknown["round_trip"], unknown["route"]]).all()
    assert np.isnan([unknown["from_lat"], unknown["from_lon"], unknown["to_lat"], unknown["to_lon"]]).all()
    good_friday, observed, tuesday = computed.iloc[2], computed.iloc[3], computed.iloc[4]
    assert (good_friday["weekday"], good_friday["holiday"], good_friday["free_day"]) == (4, 1, 1)
    assert (observed["weekday"], observed["holiday"], observed["free_day"]) == (0, 1, 1)
    assert (tuesday["weekday"], tuesday["holiday"], tuesday["free_day"]) == (1, 0, 0)
    assert list(computed.columns) == list(features.FEATURE_CATALOGUE)


def test_features_of_a_moved_station_use_the_place_the_trips_knew_and_none_for_an_unconfirmed_one() -> None:
    """7322 was `King St W / Brant St` in 2023 and names another place in the 2025 snapshot: its features use
    the 2019 coordinates, whose name agrees; 7492 (`324 Cherry St`) is confirmed by no snapshot: no place."""
    trips = schema.RequestTrips.of(
        [parse_request_trip({**TRIP, "from_station_id": 7322, "to_station_id": 7492, "to_station_name": None})]
    ).model_input()
    computed = feature_step.TripFeatures(features.FEATURE_CATALOGUE).fit(trips).transform(trips).iloc[0]
    assert (computed["from_lat"], computed["from_lon"]) == pytest.approx(
        (math.radians(43.6446926), math.radians(-79.3986795))
    )
    assert np.isnan([computed["to_lat"], computed["distance_km"], computed["speed_kmh"]]).all()
    assert (computed["from_station"], computed["to_station"], computed["round_trip"]) == (7322, 7492, 0)


def test_a_model_chooses_its_features_and_a_model_from_before_that_keeps_its_own() -> None:
    trips = schema.RequestTrips.of([parse_request_trip(TRIP)]).model_input()
    chosen = feature_step.TripFeatures(("duration_log", "holiday", "route")).fit(trips)
    assert list(chosen.transform(trips).columns) == ["duration_log", "holiday", "route"]
    with pytest.raises(ValueError, match="unknown features \\['speed'\\]"):
        feature_step.TripFeatures(("speed",)).fit(trips)
    # A step pickled by an earlier release has no `features` and no holiday calendar: it computes the ten
    # features that release computed, so the pipeline it belongs to loads and scores as it did.
    legacy = feature_step.TripFeatures.__new__(feature_step.TripFeatures)
    fitted = feature_step.TripFeatures().fit(trips)
    legacy.__setstate__({"station_ids_": fitted.station_ids_, "station_coordinates_": fitted.station_coordinates_})
    assert list(legacy.transform(trips).columns) == list(features.LEGACY_FEATURES)
    assert "month" in features.LEGACY_FEATURES and "month" not in features.DEFAULT_FEATURES


def test_features_of_a_file_and_of_requests_agree(tmp_path: Path) -> None:
    """The same trips through the file path and the request path give identical features."""
    parsed = read_trips(write(tmp_path, Q3_2017)).trips
    records = [
        {
            "trip_start_time": "7/10/2017 0:00",
            "trip_stop_time": "7/10/2017 0:15",
            "trip_duration_seconds": 900,
            "from_station_name": "Union Station",
            "to_station_name": "Front St / Yonge St (Hockey Hall of Fame)",
        },
        {
            "trip_start_time": "9/30/2017 23:50",
            "trip_stop_time": "10/1/2017 0:05",
            "trip_duration_seconds": 900,
            "from_station_name": "Queen St E / Berkely St",
            "to_station_name": "424 Wellington St. W",
        },
        {
            "trip_start_time": "8/1/2017 12:00",
            "trip_stop_time": "8/1/2017 12:20",
            "trip_duration_seconds": 1200,
            "from_station_name": "Base Station",
            "to_station_name": "Fringe Next Stage - 7219",
        },
    ]
    requested = schema.RequestTrips.of([parse_request_trip(record) for record in records]).model_input()
    step = feature_step.TripFeatures().fit(parsed)
    pd.testing.assert_frame_equal(step.transform(parsed).reset_index(drop=True), step.transform(requested))


def test_percent_rounds_arrays_as_python_rounds_each_probability() -> None:
    """Lists, batch files and Spark answer `percent` of arrays; a single trip `trip_percent` of its float. Random
    probabilities, and the ones next to every half-hundredth of a percent (where the scaled product may round
    across the half): the same doubles."""
    halves = (np.arange(20_000) + 0.5) / 1_000_000
    probabilities = np.concatenate(
        [
            np.random.default_rng(7).random(200_000),
            halves,
            np.nextafter(halves, 0),
            np.nextafter(halves, 1),
            [0.0, 1.0, 0.125, 0.00005, 0.99995, 5e-324],
        ]
    )
    expected = [schema.trip_percent(value) for value in probabilities.tolist()]
    assert schema.percent(probabilities).tolist() == expected
    assert np.round(probabilities * 100, 2).tolist() != expected  # what the near halves are there for
