"""The Flask app through its test client, with the Production model of the test registry."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient
from harness import ROOT
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import (
    HTTPException,
    MethodNotAllowed,
    RequestEntityTooLarge,
    TooManyRequests,
    Unauthorized,
)

from bikeshare_membership import app as service_app
from bikeshare_membership import stations
from bikeshare_membership.config import Settings
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import LoadedModel
from bikeshare_membership.schema import EXAMPLE_TRIP as TRIP
from bikeshare_membership.schema import (
    REQUEST_SCHEMA,
    TRIP_FIELDS,
    InvalidTrip,
    RequestTrips,
    parse_request_trip,
    parse_request_trips,
    typed_trips,
)

ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="module")
def client(settings: Settings, model: LoadedModel) -> FlaskClient:
    return service_app.create_app(settings, ModelHolder(None, model)).test_client()


# Values each field may take in a list, valid and not, in the usual forms and the rarer ones.
FIELD_VARIANTS: dict[str, list[Any]] = {
    "trip_id": [712382, "a-17", None, 7.0, 7.5, True, [1]],
    "trip_start_time": [
        *("1/1/2017 0:00", "13/1/2017 0:00", "1/13/2017 0:00", "2017-01-01T05:00:00Z", "31/2/2017 0:00"),
        *("1/2/17 00:00:01", "yesterday", None, 20170110, "0001-01-01T00:00:00+05:00"),
    ],
    "trip_stop_time": [
        *("1/1/2017 0:03", "13/1/2017 0:10", "1/13/2017 0:10", "2017-01-01T05:03:00Z", "1/1/2016 0:00"),
        *("2/3/2017 0:00", None, "1/1/2017 25:00", ["1/1/2017 0:03"]),
    ],
    "trip_duration_seconds": [223, 223.5, 0, -0.0, -5, "890", True, math.nan, math.inf, None, [223]],
    "from_station_id": [7051, "7051", " 7051 ", "NULL", None, 7051.0, "seventy", "\u00b2", "9" * 400, True, 99999],
    "from_station_name": ["Wellesley St E / Yonge St Green P", "Nowhere", "nan", None, 7154, {"name": "x"}],
    "to_station_id": [7089, "7089", "none", None, 7089.0, 1.5, "12x", [7089]],
    "to_station_name": ["Church St  / Wood St", "Church St / Wood St", "", None, 3],
    "user_type": ["Member", "casual member", " Annual Member ", "NaN", None, "Tourist", 1, ["Member"]],
}


def validated_alone(records: list[Any], date_order: Any) -> list[dict[str, Any]] | tuple[Any, ...]:
    """Each trip through `parse_request_trip`, or the first refusal's (field, message, item)."""
    try:
        return [parse_request_trip(record, date_order, item) for item, record in enumerate(records)]
    except InvalidTrip as error:
        return error.field, error.message, error.item


def validated_as_columns(records: list[Any], date_order: Any) -> list[dict[str, Any]] | tuple[Any, ...]:
    try:
        return parse_request_trips(records, date_order).records()
    except InvalidTrip as error:
        return error.field, error.message, error.item


def comparable(result: list[dict[str, Any]] | tuple[Any, ...]) -> Any:
    """NaN as text, so equal results compare equal, and with each value's type."""
    if isinstance(result, tuple):
        return result
    return [{name: (type(value), repr(value)) for name, value in trip.items()} for trip in result]


@pytest.mark.parametrize("date_order", [None, "DMY"])
def test_lists_validated_as_columns_equal_trip_by_trip_validation(date_order: Any) -> None:
    """Lists mixing valid and invalid trips in every form: the same trips in the same types, or the same first
    refusal (field, message, item)."""
    rng = random.Random(17)
    outcomes = set()
    for _ in range(2000):
        records: list[Any] = []
        for _ in range(rng.choice([1, 2, 3, 8, 30])):
            if rng.random() < 0.02:
                records.append(rng.choice([None, 5, "trip", [TRIP]]))
                continue
            trip = dict(TRIP)
            for name, variants in FIELD_VARIANTS.items():
                if rng.random() < 0.15:
                    value = rng.choice(variants)
                    if value is None and rng.random() < 0.5:
                        del trip[name]
                    else:
                        trip[name] = value
            records.append(trip)
        expected = comparable(validated_alone(records, date_order))
        assert comparable(validated_as_columns(records, date_order)) == expected, records
        outcomes.add("refused" if isinstance(expected, tuple) else "valid")
        # As the service reads the same list sent as JSON: typed by msgspec where it can be, else as orjson reads it.
        body = orjson.dumps(records)
        typed = typed_trips(body)
        if typed is not None:
            sent = orjson.loads(body)
            expected = comparable(validated_alone(sent, date_order))
            assert comparable(validated_as_columns(typed, date_order)) == expected, records
            assert comparable(validated_alone(typed, date_order)) == expected, records
            outcomes.add("typed " + ("refused" if isinstance(expected, tuple) else "valid"))
    assert outcomes == {"refused", "valid", "typed refused", "typed valid"}


# JSON texts a field may be sent as: each type's usual and edge forms, and values of other types.
JSON_VALUES = [
    *("0", "-0", "7051", "-5", "223.5", "-0.0", "1e2", "1E-400", "1e999", "2.5e308", "4.9e-324", "0.1"),
    *(str(2**63 - 1), str(-(2**63)), str(2**63), str(2**64 - 1), str(2**64), "123456789012345678901234567890"),
    *("0.30000000000000004", "9007199254740993", "1.00000000000000011102230246251565404236316680908203125"),
    *('"1/1/2017 0:00"', '"2017-01-01T00:00:00Z"', '" 7051 "', '"NULL"', '"Member"', '""', '"\\u00e9\\t\\""'),
    *('"\\ud83d\\ude00"', '"\\u0000"', '"\\ud800"', '"caf\u00e9"', "true", "false", "null", "[]", "{}", "[1, {}]"),
]


def trip_text(rng: random.Random) -> str:
    """A trip as JSON text: each field sent or left out, as a valid value or any of JSON_VALUES, now and then twice
    (the last one counts) or with a field of another name."""
    members = []
    for trip_field in REQUEST_SCHEMA:
        if rng.random() < 0.1 and not trip_field.required:
            continue
        valid = json.dumps(TRIP[trip_field.name])
        for _ in range(2 if rng.random() < 0.05 else 1):
            members.append(f'"{trip_field.name}": {rng.choice(JSON_VALUES) if rng.random() < 0.3 else valid}')
    if rng.random() < 0.05:
        members.append(f'"bike_id": {rng.choice(JSON_VALUES)}')
    rng.shuffle(members)
    return "{" + ", ".join(members) + "}"


def test_typed_trips_read_the_same_values_as_orjson() -> None:
    """Whatever msgspec decodes as trips, orjson reads as the same trips: each field's value and type (a number's as
    `float` converts it), a missing field as None. Bodies it cannot type are left to orjson (None)."""
    rng = random.Random(2017)
    outcomes = set()
    for _ in range(3000):
        texts = [trip_text(rng) for _ in range(rng.choice([1, 1, 2, 5]))]
        body = (texts[0] if rng.random() < 0.3 else "[" + ", ".join(texts) + "]").encode()
        typed = typed_trips(body)
        outcomes.add(typed is not None)
        if typed is None:
            continue
        sent = orjson.loads(body)
        typed_list, sent_list = (typed, sent) if isinstance(sent, list) else ([typed], [sent])
        for decoded, record in zip(typed_list, sent_list, strict=True):
            for name in TRIP_FIELDS:
                value = record.get(name)
                if name == "trip_duration_seconds":
                    value = float(value)
                assert (type(getattr(decoded, name)), repr(getattr(decoded, name))) == (type(value), repr(value)), body
    assert outcomes == {True, False}


def test_a_body_typed_or_not_gets_the_same_answer(client: FlaskClient, model: LoadedModel) -> None:
    """A list msgspec types and the same list with a field of another name, which it leaves to orjson: the same
    predictions; and a single trip either way."""
    trips = [dict(TRIP, trip_id=item, trip_duration_seconds=60 * item) for item in range(50)]
    untyped = [*trips[:-1], {**trips[-1], "bike_id": 1}]
    assert typed_trips(orjson.dumps(trips)) is not None and typed_trips(orjson.dumps(untyped)) is None
    assert client.post("/predict", json=trips).get_json() == client.post("/predict", json=untyped).get_json()
    assert client.post("/predict", json=TRIP).get_json() == client.post("/predict", json={**TRIP, "x": 1}).get_json()


def test_single_trip_gets_membership_proba_and_model(client: FlaskClient, model: LoadedModel) -> None:
    response = client.post("/predict", json=TRIP)
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    assert body["trip_id"] == 712382
    assert 0 <= body["proba"] <= 100
    assert body["membership"] == ("Member" if body["proba"] >= 50 else "Casual")
    assert body["model"] == {"name": model.name, "version": model.version, "run_id": model.run_id}


def test_proba_is_the_pipelines_probability(client: FlaskClient, model: LoadedModel) -> None:
    expected = model.member_probability(RequestTrips.of([parse_request_trip(TRIP)]).model_input())[0]
    assert client.post("/predict", json=TRIP).get_json()["proba"] == round(expected * 100, 2)


def test_each_quarter_format_iso_and_unknown_stations_are_predicted(client: FlaskClient) -> None:
    trips = [
        {**TRIP, "trip_start_time": "18/04/2017 17:15", "trip_stop_time": "18/04/2017 17:30"},
        {
            **TRIP,
            "trip_start_time": "7/10/2017 0:00",
            "trip_stop_time": "7/10/2017 0:15",
            "from_station_id": None,
            "to_station_id": None,
        },
        {
            **TRIP,
            "trip_start_time": "10/01/17 00:00:01",
            "trip_stop_time": "10/01/17 00:00:27",
            "trip_duration_seconds": 26,
        },
        {**TRIP, "trip_start_time": "2017-07-10T08:15:00", "trip_stop_time": "2017-07-10T08:30:00"},
        {
            **TRIP,
            "from_station_id": 99999,
            "from_station_name": "Nowhere",
            "to_station_id": None,
            "to_station_name": "Base Station",
        },
        {key: TRIP[key] for key in ("trip_start_time", "trip_stop_time", "trip_duration_seconds")},
    ]
    response = client.post("/predict", json=trips)
    assert response.status_code == 200
    body = response.get_json()
    assert len(body["predictions"]) == len(trips)
    assert all(answer["membership"] in ("Member", "Casual") for answer in body["predictions"])
    assert body["model"]["version"]


def test_casual_looking_trip_scores_below_a_commute(client: FlaskClient) -> None:
    """A weekday 8am one-way hop is likelier a Member than a weekend afternoon round trip of two hours."""
    commute = {
        **TRIP,
        "trip_start_time": "2017-05-09T08:05:00",
        "trip_stop_time": "2017-05-09T08:12:00",
        "trip_duration_seconds": 420,
        "from_station_id": 7033,
        "to_station_id": 7006,
    }
    leisure = {
        **TRIP,
        "trip_start_time": "2017-05-13T14:05:00",
        "trip_stop_time": "2017-05-13T16:05:00",
        "trip_duration_seconds": 7200,
        "from_station_id": 7076,
        "to_station_id": 7076,
    }
    commute_proba, leisure_proba = (
        answer["proba"] for answer in client.post("/predict", json=[commute, leisure]).get_json()["predictions"]
    )
    assert commute_proba > leisure_proba


def test_date_order_query_parameter(client: FlaskClient) -> None:
    trip = {**TRIP, "trip_start_time": "1/10/2017 0:03", "trip_stop_time": "1/10/2017 0:18"}
    assert client.post("/predict?date_order=DMY", json=trip).status_code == 200
    response = client.post("/predict?date_order=YMD", json=trip)
    assert response.status_code == 400 and response.get_json()["error"]["field"] == "date_order"


@pytest.mark.parametrize(
    ("body", "status", "code", "field", "item"),
    [
        ({**TRIP, "trip_start_time": None}, 400, "INVALID_PARAMETER_VALUE", "trip_start_time", None),
        (
            {k: v for k, v in TRIP.items() if k != "trip_duration_seconds"},
            400,
            "INVALID_PARAMETER_VALUE",
            "trip_duration_seconds",
            None,
        ),
        ({**TRIP, "trip_duration_seconds": "long"}, 400, "INVALID_PARAMETER_VALUE", "trip_duration_seconds", None),
        ({**TRIP, "trip_duration_seconds": -1}, 400, "INVALID_PARAMETER_VALUE", "trip_duration_seconds", None),
        ({**TRIP, "trip_start_time": "2017-02-30T10:00:00"}, 400, "INVALID_PARAMETER_VALUE", "trip_start_time", None),
        ({**TRIP, "trip_start_time": "13/13/2017 0:00"}, 400, "INVALID_PARAMETER_VALUE", "trip_start_time", None),
        ({**TRIP, "trip_stop_time": "12/31/2016 23:59"}, 400, "INVALID_PARAMETER_VALUE", "trip_stop_time", None),
        ({**TRIP, "from_station_id": {"id": 7051}}, 400, "INVALID_PARAMETER_VALUE", "from_station_id", None),
        ([TRIP, {**TRIP, "trip_stop_time": "soon"}], 400, "INVALID_PARAMETER_VALUE", "trip_stop_time", 1),
        ([TRIP, "not a trip"], 400, "INVALID_PARAMETER_VALUE", None, 1),
        ([], 400, "BAD_REQUEST", None, None),
        ("a string", 400, "BAD_REQUEST", None, None),
        (42, 400, "BAD_REQUEST", None, None),
        (None, 400, "BAD_REQUEST", None, None),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(client: FlaskClient, body, status, code, field, item) -> None:
    response = client.post("/predict", data=json.dumps(body), content_type="application/json")
    assert response.status_code == status and response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert (error["code"], error["field"], error["item"]) == (code, field, item)
    assert error["message"]


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b'{"trip_start_time": ', "application/json", 400, "MALFORMED_REQUEST"),
        (b"\xff\xfe\x00", "application/json", 400, "MALFORMED_REQUEST"),
        (b"[" * 100_000, "application/json", 400, "MALFORMED_REQUEST"),
        (b"trip_id=1", "application/x-www-form-urlencoded", 415, "UNSUPPORTED_MEDIA_TYPE"),
        (b"{}", None, 415, "UNSUPPORTED_MEDIA_TYPE"),
        (b" " * (Settings.max_body_bytes + 1), "application/json", 413, "REQUEST_ENTITY_TOO_LARGE"),
    ],
)
def test_unreadable_bodies_get_a_4xx(client: FlaskClient, data: bytes, content_type, status: int, code: str) -> None:
    response = client.post("/predict", data=data, content_type=content_type)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code


def test_too_many_trips_is_refused(client: FlaskClient) -> None:
    response = client.post("/predict", json=[TRIP] * (Settings.max_trips_per_request + 1))
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "TOO_MANY_TRIPS"
    assert f"at most {Settings.max_trips_per_request} " in response.get_json()["error"]["message"]


def test_limits_come_from_the_environment(model: LoadedModel) -> None:
    settings = Settings.from_env({"MAX_BODY_BYTES": "2000", "MAX_TRIPS_PER_REQUEST": "3"})
    limited = service_app.create_app(settings, ModelHolder(None, model)).test_client()
    assert limited.post("/predict", json=[TRIP] * 3).status_code == 200

    too_many = limited.post("/predict", json=[TRIP] * 4)
    assert too_many.status_code == 413
    assert too_many.get_json()["error"]["message"] == "4 trips; at most 3 per request (MAX_TRIPS_PER_REQUEST)"

    too_large = limited.post("/predict", data=b" " * 2001, content_type="application/json")
    assert too_large.status_code == 413
    error = too_large.get_json()["error"]
    assert error["code"] == "REQUEST_ENTITY_TOO_LARGE" and "over 2000 bytes (MAX_BODY_BYTES)" in error["message"]


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    assert client.get("/nowhere").get_json()["error"]["code"] == "NOT_FOUND"
    response = client.get("/predict")
    assert response.status_code == 405 and response.get_json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_the_station_list_is_read_as_the_app_is_built(model: LoadedModel) -> None:
    """In Gunicorn's preloading master, before the fork: otherwise each worker's first request reads the file."""
    stations.station_index.cache_clear()
    service_app.create_app(Settings(), ModelHolder(None, model))
    assert stations.station_index.cache_info().currsize == 1


def test_health_names_the_loaded_model(client: FlaskClient, model: LoadedModel) -> None:
    body = client.get("/health").get_json()
    assert body["status"] == "ok"
    assert body["model"]["version"] == model.version and body["model"]["name"] == model.name


def test_admin_reload_is_absent_without_a_token(client: FlaskClient) -> None:
    response = client.post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "NOT_FOUND"


@pytest.fixture(scope="module")
def admin_client(model: LoadedModel) -> FlaskClient:
    return service_app.create_app(Settings(admin_token=ADMIN_TOKEN), ModelHolder(None, model)).test_client()


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN}x", ADMIN_TOKEN],
)
def test_admin_reload_refuses_a_missing_or_wrong_token(admin_client: FlaskClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = admin_client.post("/admin/reload", headers=headers)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert response.get_json()["error"]["code"] == "UNAUTHENTICATED"
    assert ADMIN_TOKEN not in response.get_data(as_text=True)


def test_refusals_keep_the_headers_their_status_calls_for(admin_client: FlaskClient) -> None:
    """RFC 9110: a 405 lists the methods the route allows, a 401 names the scheme to authenticate with."""
    not_allowed = admin_client.open("/predict", method="TRACE")
    assert not_allowed.status_code == 405 and not_allowed.get_json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert set(not_allowed.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    assert set(admin_client.delete("/health").headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    too_large = admin_client.post(
        "/predict", data=b" " * (Settings.max_body_bytes + 1), content_type="application/json"
    )
    assert too_large.status_code == 413 and too_large.get_json()["error"]["code"] == "REQUEST_ENTITY_TOO_LARGE"
    unauthenticated = admin_client.post("/admin/reload")
    assert unauthenticated.status_code == 401 and unauthenticated.headers.getlist("WWW-Authenticate") == ["Bearer"]
    for response in (not_allowed, too_large, unauthenticated):
        assert response.headers.getlist("Content-Type") == ["application/json"]


@pytest.mark.parametrize(
    "error",
    [
        MethodNotAllowed(["GET", "HEAD"]),
        RequestEntityTooLarge(),
        Unauthorized(www_authenticate=WWWAuthenticate("basic", {"realm": "bikeshare"})),
        TooManyRequests(retry_after=30),
    ],
)
def test_werkzeug_errors_keep_their_headers_as_json(error: HTTPException) -> None:
    response = service_app.render_http_error(error)
    assert response.status_code == error.code and response.headers.getlist("Content-Type") == ["application/json"]
    carried = [(name, value) for name, value in response.headers if name not in ("Content-Type", "Content-Length")]
    assert carried == [(name, value) for name, value in error.get_headers() if name != "Content-Type"]


def test_admin_reload_with_the_token_answers_the_served_version(admin_client: FlaskClient, model: LoadedModel) -> None:
    response = admin_client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200
    assert response.get_json() == {"reloaded": False, "model": model.describe()}  # a MODEL_PATH-style holder


def test_error_bodies_show_no_trace_and_no_internal_path(model: LoadedModel, tmp_path: Path) -> None:
    """Every kind of refusal, from a service whose batch root and state live under known absolute paths."""
    batch_root = tmp_path / "batch-root"
    batch_root.mkdir()
    (batch_root / "trips.csv").write_text("trip_id\n1\n")
    settings = Settings(batch_root=str(batch_root), batch_state_dir=str(tmp_path / "state"), admin_token=ADMIN_TOKEN)
    client = service_app.create_app(settings, ModelHolder(None, model)).test_client()
    no_root = service_app.create_app(Settings(), ModelHolder(None, model)).test_client()
    answers = {
        "unknown route": client.get("/nowhere"),
        "wrong method": client.get("/predict"),
        "body too large": client.post(
            "/predict", data=b" " * (settings.max_body_bytes + 1), content_type="application/json"
        ),
        "too many trips": client.post("/predict", json=[TRIP] * (settings.max_trips_per_request + 1)),
        "not JSON": client.post("/predict", data=b"trip", content_type="text/plain"),
        "malformed JSON": client.post("/predict", data=b'{"trip_id": ', content_type="application/json"),
        "invalid field": client.post("/predict", json={**TRIP, "trip_start_time": "/work/etc/passwd"}),
        "bad parameter": client.post("/predict?date_order=/etc", json=TRIP),
        "no token": client.post("/admin/reload"),
        "batch outside the root": client.post("/predict/batch", json={"input": "../../../etc/passwd.csv"}),
        "batch absolute path outside": client.post("/predict/batch", json={"input": str(ROOT / "data" / "x.csv")}),
        "batch no such input": client.post("/predict/batch", json={"input": "missing.csv"}),
        "batch bad output": client.post("/predict/batch", json={"input": "trips.csv", "output": "sub/out.txt"}),
        "batch unknown job": client.get("/predict/batch/0123456789abcdef0123456789abcdef"),
        "batch with no root": no_root.post("/predict/batch", json={"input": "trips.csv"}),
    }
    statuses = {kind: response.status_code for kind, response in answers.items()}
    assert all(400 <= status < 500 for status in statuses.values()), statuses
    assert {statuses["batch outside the root"], statuses["batch with no root"], statuses["batch no such input"]} == {
        403,
        404,
    }
    for kind, response in answers.items():
        body = response.get_data(as_text=True)
        assert response.get_json()["error"]["message"], kind
        for secret in ("Traceback", 'File "', str(ROOT), str(tmp_path), str(batch_root), ADMIN_TOKEN):
            assert secret not in body, f"{kind}: {body}"
