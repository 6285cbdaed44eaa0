"""The API contract: the OpenAPI document against the live service under Gunicorn, fuzzed by schemathesis."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NotRequired, Required

import jsonschema_rs
import orjson
import pytest
import requests
from conftest import service_env
from harness import start_gunicorn, stop
from test_preprocess import Y2023
from typing_extensions import is_typeddict

from bikeshare_membership import app as service_app
from bikeshare_membership import batch_jobs, docs_page, openapi, schema
from bikeshare_membership.config import Settings
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.schema import EXAMPLE_TRIP

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = "all"  # every check schemathesis has; CONFIG says where one is told more than the document, and why
# Every phase. The stateful one follows the document's links; its one link (a started job to its state) stays
# unfollowed, as the batch root is empty: fuzzing starts no job (each is a process), so no two runs differ by
# when a job slot frees. test_batch_job_states_match_the_document follows it instead.
PHASES = "examples,coverage,fuzzing,stateful"
MAX_EXAMPLES_PER_OPERATION = 100
SEED = 7
# GET /docs: Swagger UI's options that matter here, the types of its files, and hosts that serve such files.
SWAGGER_UI_OPTIONS = {"url": '"/openapi.json"', "tryItOutEnabled": "true", "validatorUrl": "null"}
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}
CDN = r"(https?:)?//[\w.-]*(cdn|unpkg|googleapis|gstatic|cloudflare|fastly|akamai)[\w.-]*"
ADMIN_TOKEN = "contract-admin-token"
CONFIG = f"""
# A trip's rules that JSON Schema cannot state (a real date, the slash dates' order, stop not before start):
# the refusals of schema-valid trips they explain are dropped, and only those (see the module).
hooks = "{Path(__file__).parent / "contract_hooks.py"}"

# POST /admin/reload gets the token, so that ignored_auth sees it refuse a request without it, or with a wrong
# one; with no token at all it would answer only 401, and positive data would never reach it.
[auth.openapi.adminToken]
bearer = "{ADMIN_TOKEN}"

# Schemathesis' statuses for refused invalid input, plus 413: a list over maxItems is refused as too large.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""


@pytest.fixture(scope="module")
def service(settings: Settings, trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Gunicorn as deployed, with an empty batch root and no S3 prefix: fuzzing can start no job anywhere. With
    ADMIN_TOKEN set, so that POST /admin/reload is in the document and fuzzed too."""
    work = tmp_path_factory.mktemp("contract")
    (work / "root").mkdir()
    env = service_env(
        settings, BATCH_ROOT=str(work / "root"), BATCH_STATE_DIR=str(work / "state"), ADMIN_TOKEN=ADMIN_TOKEN
    )
    process, url = start_gunicorn(env, work / "gunicorn.log")
    try:
        yield url, work
    finally:
        stop(process)


@pytest.fixture(scope="module")
def document(service: tuple[str, Path]) -> dict[str, Any]:
    response = requests.get(f"{service[0]}/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    return response.json()


def validator(document: dict[str, Any], name: str) -> Any:
    """A JSON Schema validator of one of the document's component schemas, its references resolved."""
    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **document})


def test_schemathesis_finds_no_contract_violation(
    service: tuple[str, Path], document: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url, work = service
    report = work / "schemathesis.json"
    (work / "schemathesis.toml").write_text(CONFIG)
    command = [
        str(SCHEMATHESIS),
        "--no-color",
        "--config-file",
        str(work / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        CHECKS,
    ]
    command += ["--max-examples", str(MAX_EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--workers", "1"]
    command += ["--phases", PHASES, "--request-timeout", "10", "--generation-database", "none"]
    command += ["--report", "json", "--report-json-path", str(report)]
    started = time.monotonic()
    run = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    summary = json.loads(report.read_text())

    cases = summary["test_cases"]
    line = (
        f"schemathesis: {cases['generated']} cases over {summary['operations']['tested']} operations in "
        f"{seconds:.1f}s (seed {SEED}, checks {CHECKS}, phases {PHASES}): {cases['with_failures']} failing, "
        f"{cases['errored']} errored, {summary['filtered']} refusals for a trip's rules beyond JSON Schema"
    )
    with capsys.disabled():  # the count shows in every run's output, not only with -s
        print(f"\n{line}")
    assert run.returncode == 0 and not summary["failures"] and not summary["errors"], f"{line}\n{run.stdout[-6000:]}"
    # Every operation but GET /openapi.json, which schemathesis leaves out as the document it was given.
    operations = sum(len(item) for path, item in document["paths"].items() if path != "/openapi.json")
    assert summary["operations"]["tested"] == operations, line
    assert cases["generated"] >= 4 * operations, line
    assert {phase: state["status"] for phase, state in summary["phases"].items()} == dict.fromkeys(
        PHASES.split(","), "success"
    ), line


def test_the_document_describes_what_the_validator_checks(document: dict[str, Any]) -> None:
    trip = document["components"]["schemas"]["Trip"]
    assert (
        trip["required"]
        == list(schema.REQUIRED_FIELDS)
        == [
            "trip_start_time",
            "trip_stop_time",
            "trip_duration_seconds",
        ]
    )
    assert list(trip["properties"]) == list(schema.TRIP_FIELDS)
    for trip_field in schema.REQUEST_SCHEMA:
        types = trip["properties"][trip_field.name]["type"]
        assert set(types if isinstance(types, list) else [types]) == set(trip_field.types)
    assert trip["examples"] == [EXAMPLE_TRIP] and schema.parse_request_trip(EXAMPLE_TRIP)
    body = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["examples"]["trip"]["value"] == EXAMPLE_TRIP
    assert validator(document, "Trip").is_valid(EXAMPLE_TRIP)
    assert not validator(document, "Trip").is_valid({**EXAMPLE_TRIP, "trip_duration_seconds": -1})
    assert document["components"]["schemas"]["Trips"]["maxItems"] == Settings().max_trips_per_request


# Values the document and the validator agree on, as JSON text read as the service reads it: True where both
# take it, False where both refuse it. A timestamp is sent as both the start and the stop.
AGREED = [
    ("trip_start_time", '"2017-07-10T08:15:00"', True),
    ("trip_start_time", '"2017-07-10 08:15"', True),
    ("trip_start_time", '"2017-07-10"', True),
    ("trip_start_time", '"2017-07-10T08:15:00.123456-04:00"', True),
    ("trip_start_time", '"2017-07-10T12:15Z"', True),
    ("trip_start_time", '" 10/7/2017 8:15\\t"', True),
    ("trip_start_time", '"7/10/17 08:15:00"', True),
    ("trip_start_time", '""', False),
    ("trip_start_time", '"   "', False),
    ("trip_start_time", '"2017-07-10T24:00"', False),
    ("trip_start_time", '"2017/07/10 08:15"', False),
    ("trip_start_time", '"\\u0661/1/2017 0:00"', False),  # an Arabic-Indic digit, a `\d` beyond ASCII
    ("trip_start_time", '"\\u00a01/1/2017 0:00"', False),  # a no-break space, ECMA-262's `\s` but not the reader's
    ("from_station_id", '" 7051 "', True),
    ("from_station_id", '"NULL"', True),
    ("from_station_id", '""', True),
    ("from_station_id", "-1", True),
    ("from_station_id", "7051.0", True),  # an integer to JSON Schema, as writers that know only floats send it
    ("from_station_id", "18446744073709551615", True),
    ("from_station_id", "18446744073709551616", False),  # past the JSON reader's integers: read as a float
    ("from_station_id", "-9223372036854775809", False),
    ("from_station_id", "7051.5", False),
    ("from_station_id", '"70.51"', False),
    ("from_station_id", '"9999999999999999999"', False),
    ("from_station_id", "true", False),
    ("trip_id", "712382.0", True),
    ("trip_duration_seconds", "0", True),
    ("trip_duration_seconds", "-0.5", False),
    ("user_type", '" casual MEMBER\\n"', True),
    ("user_type", '"nan"', True),
    ("user_type", '"Tourist"', False),
    ("user_type", '"Member*"', False),
]
# Values the validator takes and the document leaves out, as its descriptions say.
STRICTER = [
    ("trip_start_time", '"2017-W28-1"'),  # an ISO week date
    ("trip_start_time", '"0999-12-31T23:00"'),  # a year before 1000
    ("user_type", '"\\u00a0Member"'),  # whitespace beyond ASCII's, which the service strips too
]


def _trip_with(field: str, text: str) -> dict[str, Any]:
    value = orjson.loads(text)
    timestamps = dict.fromkeys(("trip_start_time", "trip_stop_time"), value) if field == "trip_start_time" else {}
    return {**EXAMPLE_TRIP, field: value, **timestamps}


def _service_takes(trip: dict[str, Any]) -> bool:
    try:
        schema.parse_request_trip(trip)
    except schema.InvalidTrip:
        return False
    return True


@pytest.mark.parametrize(("field", "text", "valid"), AGREED)
def test_the_document_and_the_validator_agree_on_a_trip_field(
    document: dict[str, Any], field: str, text: str, valid: bool
) -> None:
    trip = _trip_with(field, text)
    assert validator(document, "Trip").is_valid(trip) == _service_takes(trip) == valid


@pytest.mark.parametrize(("field", "text"), STRICTER)
def test_the_document_leaves_out_trip_values_only_where_it_says(
    document: dict[str, Any], field: str, text: str
) -> None:
    trip = _trip_with(field, text)
    assert _service_takes(trip) and not validator(document, "Trip").is_valid(trip)


# Batch locations, sent to a service whose root holds trips.csv and which may run no job (MAX_BATCH_JOBS=0):
# a location it takes gets 404, 403 or 503, never 400. (field, location, whether the document and it take it).
LOCATIONS = [
    ("input", "trips.csv", True),
    ("input", "sub/missing.CSV.GZ", True),
    ("input", "/elsewhere/trips.parquet", True),
    ("input", "s3://bucket/in//trips.zip", True),
    ("input", "", False),
    ("input", "   ", False),
    ("input", "notes.txt", False),
    ("input", "trips.csv ", False),
    ("input", "file:///trips.csv", False),
    ("input", "S3://bucket/trips.csv", False),
    ("input", "s3:///trips.csv", False),
    ("input", "s3://bucket/../trips.csv", False),
    ("input", "trips\x00.csv", False),
    ("output", "scores.parquet", True),
    ("output", "scores/", True),
    ("output", "s3://bucket/out/", True),
    ("output", "scores.zip", False),
    ("output", "s3://bucket/", False),
]
LOCATIONS_STRICTER = [("input", "a:b.csv"), ("input", "s3://bucket/.in/trips.csv"), ("output", "folder")]


@pytest.fixture(scope="module")
def batch_client(model, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("locations")
    (root / "trips.csv").write_text(Y2023)
    (root / "folder").mkdir()
    settings = Settings(batch_root=str(root), batch_state_dir=str(root / "state"), max_batch_jobs=0)
    return service_app.create_app(settings, ModelHolder(None, model)).test_client()


def _location_answer(batch_client: Any, field: str, location: str) -> int:
    body = {"input": location} if field == "input" else {"input": "trips.csv", "output": location}
    return batch_client.post("/predict/batch", json=body).status_code


@pytest.mark.parametrize(("field", "location", "valid"), LOCATIONS)
def test_the_document_and_the_service_agree_on_a_batch_location(
    document: dict[str, Any], batch_client: Any, field: str, location: str, valid: bool
) -> None:
    status = _location_answer(batch_client, field, location)
    assert status in (400, 403, 404, 503)
    body = {"input": "trips.csv", field: location}
    assert validator(document, "BatchRequest").is_valid(body) == (status != 400) == valid


@pytest.mark.parametrize(("field", "location"), LOCATIONS_STRICTER)
def test_the_document_leaves_out_locations_only_where_it_says(
    document: dict[str, Any], batch_client: Any, field: str, location: str
) -> None:
    body = {"input": "trips.csv", field: location}
    assert _location_answer(batch_client, field, location) != 400 and not validator(document, "BatchRequest").is_valid(
        body
    )


def test_a_field_cannot_be_required_and_nullable() -> None:
    with pytest.raises(ValueError, match="required"):
        schema.TripField("trip_id", ("integer", "null"), "an id", 1, required=True)
    with pytest.raises(ValueError, match="optional"):
        schema.TripField("user_type", ("string",), "a label", "Member")


def _declarations(shape: Any, found: dict[str, Any]) -> dict[str, Any]:
    """`shape` and every TypedDict its keys hold (inside lists, dicts and unions too), by name."""
    if is_typeddict(shape):
        found[shape.__name__] = shape
        for value in typing.get_type_hints(shape).values():
            _declarations(value, found)
    for argument in typing.get_args(shape):
        _declarations(argument, found)
    return found


def _required_keys(shape: Any) -> set[str]:
    """The keys a TypedDict requires, read from its annotations (its `__required_keys__` takes a `NotRequired`
    written under `from __future__ import annotations` for required on Python 3.11). No declaration here mixes
    total and non-total bases, so the class's own totality holds for every key."""
    hints = typing.get_type_hints(shape, include_extras=True)
    origins = {name: typing.get_origin(hint) for name, hint in hints.items()}
    return {
        name
        for name, origin in origins.items()
        if origin is Required or (shape.__total__ and origin is not NotRequired)
    }


@pytest.mark.parametrize("admin", [False, True])
def test_every_answer_schema_has_the_keys_of_its_declaration(admin: bool) -> None:
    """The document's schemas are the TypedDicts', key for key: changing an answer is one edit, where it is built."""
    components = openapi.document(100, 1 << 20, service_app.ANSWERS, admin)["components"]["schemas"]
    declared: dict[str, Any] = {}
    for shape in openapi.answer_shapes(service_app.ANSWERS, admin):
        _declarations(shape, declared)
    assert set(components) == {"Trip", "Trips", *declared}
    assert {"Prediction", "Predictions", "ModelRef", "Error", "Health", "ModelInfo", "BatchRequest"} <= set(declared)
    assert {"BatchJob", "BatchSummary"} <= set(declared) and ("Reloaded" in declared) == admin
    for name, shape in declared.items():
        component = components[name]
        assert list(component["properties"]) == list(typing.get_type_hints(shape)), name
        assert set(component.get("required", [])) == _required_keys(shape), name
        assert component["additionalProperties"] is False, name


@pytest.mark.parametrize("admin_token", ["", "a-token"])
def test_every_route_is_documented(settings: Settings, model, admin_token: str) -> None:
    """With and without the admin operations: the app's routes are exactly the paths its document lists."""
    app = service_app.create_app(dataclasses.replace(settings, admin_token=admin_token), ModelHolder(None, model))
    routes = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint.rpartition(".")[2] != "static"  # files: Flask's, Swagger UI's (docs_page.py)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    served = app.test_client().get("/openapi.json").get_json()
    assert routes == {(path, method) for path, item in served["paths"].items() for method in item}
    assert ("/admin/reload", "post") in routes if admin_token else ("/admin/reload", "post") not in routes


def test_docs_page_is_swagger_ui_from_the_services_own_files(service: tuple[str, Path]) -> None:
    """The page and every file it loads come from the service: no other host named, nothing from a CDN. The
    browser test (tests/browser) runs it; this checks what is served."""
    url = service[0]
    response = requests.get(f"{url}/docs", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = response.text
    assert not re.search(r"https?:|//[\w.-]+\.\w", page)
    loaded = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assets = {f"{docs_page.ASSETS_PATH}/{name}" for name in docs_page.ASSETS}
    assert loaded == assets | {"/openapi.json"} and "swagger-ui-bundle.js" in docs_page.ASSETS
    assert all(f'"{option}":{value}' in page for option, value in SWAGGER_UI_OPTIONS.items())
    policy = response.headers["Content-Security-Policy"].split("; ")
    assert {"default-src 'none'", "connect-src 'self'", "img-src 'self' data:"} <= set(policy)
    for path in sorted(assets):
        asset = requests.get(f"{url}{path}", timeout=10)
        assert asset.status_code == 200 and asset.headers["Content-Type"] == ASSET_TYPES[Path(path).suffix]
        assert asset.content == (docs_page.DIST / Path(path).name).read_bytes()
        assert asset.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        if Path(path).suffix != ".png":
            assert not re.search(CDN, asset.text, re.IGNORECASE), path
        again = requests.get(f"{url}{path}", headers={"If-None-Match": asset.headers["ETag"]}, timeout=10)
        assert again.status_code == 304 and not again.content
    for elsewhere in ("swagger-ui.js", "oauth2-redirect.html", "..%2Fflask_swagger_ui.py", "VERSION"):
        refused = requests.get(f"{url}{docs_page.ASSETS_PATH}/{elsewhere}", timeout=10)
        assert refused.status_code == 404 and refused.headers["Content-Type"] == "application/json", elsewhere
        assert refused.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("trips", [1, 1001, Settings().max_trips_per_request])
def test_answers_match_the_document_under_gunicorn(
    service: tuple[str, Path], document: dict[str, Any], trips: int
) -> None:
    """Lists over the fast path's 1,000 rows go through scikit-learn: under Gunicorn they once hung a worker."""
    body = EXAMPLE_TRIP if trips == 1 else [EXAMPLE_TRIP] * trips
    response = requests.post(f"{service[0]}/predict", json=body, timeout=60)
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    component = "Prediction" if trips == 1 else "Predictions"
    assert validator(document, component).is_valid(answer), answer if trips == 1 else answer["model"]
    assert trips == 1 or len(answer["predictions"]) == trips


def test_batch_job_states_match_the_document(service: tuple[str, Path], document: dict[str, Any]) -> None:
    url, work = service
    (work / "root" / "contract-job.csv").write_text(Y2023)
    (work / "root" / "contract-unreadable.csv").write_text("id,start,stop\n1,2,3\n")
    job_schema = validator(document, "BatchJob")
    finished = {}
    for name in ("contract-job.csv", "contract-unreadable.csv"):
        submitted = requests.post(f"{url}/predict/batch", json={"input": name}, timeout=10)
        assert submitted.status_code == 202, submitted.text
        states = [submitted.json()]
        deadline = time.monotonic() + 120
        while states[-1]["status"] not in batch_jobs.FINISHED:
            assert time.monotonic() < deadline, states[-1]
            time.sleep(0.2)
            states.append(requests.get(f"{url}/predict/batch/{states[-1]['job_id']}", timeout=10).json())
        for state in states:
            assert job_schema.is_valid(state), (state, list(job_schema.iter_errors(state))[:3])
        finished[name] = states[-1]
    assert finished["contract-job.csv"]["status"] == "succeeded"
    assert finished["contract-unreadable.csv"]["status"] == "failed"
    for route, component in (("/health", "Health"), ("/model", "ModelInfo")):
        answer = requests.get(f"{url}{route}", timeout=10).json()
        assert validator(document, component).is_valid(answer), list(validator(document, component).iter_errors(answer))
