"""The membership prediction web service.

Endpoints:
    POST /predict   a trip (JSON object) or a list of trips -> membership, proba (% that the rider is a
                    Member) and the model version that answered. `?date_order=DMY` reads ambiguous slash
                    dates day-first (see schema.py for the rule).
    GET  /health    200 with the loaded model (name, version, loaded-at, source) and whether the registry
                    answered its last check.
    GET  /model     the loaded model's registry metadata and model card, signature and training metrics.
    POST /predict/batch        {"input": "<path under BATCH_ROOT or s3:// URI>", "output": optional} -> 202
                               and a job scoring that file in the background (batch_jobs.py).
    GET  /predict/batch/<id>   the job's state: starting, running (with progress), succeeded (with the
                               summary) or failed (with the error).
    GET  /openapi.json  the OpenAPI 3.1 document of these endpoints (openapi.py).
    GET  /docs      Swagger UI over that document, "Try it out" included, from files the service serves
                    itself (docs_page.py).
    POST /admin/reload  only when ADMIN_TOKEN is set, with `Authorization: Bearer <ADMIN_TOKEN>`: check the
                        registry now, in this worker and (within a second) in every other one on the host.
    GET  /metrics   Prometheus metrics, summed over the Gunicorn workers (metrics.py).

Every request gets an id (a safe `X-Request-ID` it came with, else a new one), returned in `X-Request-ID`
and written in the one JSON log line logged per request (recorder.py): no other header, no body, no query.

Every error is JSON: `{"error": {"code", "message", "field", "item"}}` with a 4xx status for bad input.

The model is loaded once when the app is created and swapped when a new version is promoted
(model_holder.py); requests never touch the registry. The root module predict.py is what Gunicorn and
`python predict.py` run.
"""

from __future__ import annotations

import hmac
import logging
import sys
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import orjson
from flask import Blueprint, Flask, Response, current_app, request
from gunicorn.http.body import Body, LengthReader
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import Field, WithJsonSchema
from typing_extensions import TypedDict
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_content_length

from bikeshare_membership import batch_jobs, docs_page, jsonlog, metrics, openapi, recorder
from bikeshare_membership.config import Settings, settings_from_env
from bikeshare_membership.errors import Refused
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import (
    LoadedModel,
    ModelMetadata,
    ModelRef,
    ModelUnavailable,
    ServedModel,
)
from bikeshare_membership.prediction_log import PredictionLog
from bikeshare_membership.schema import (
    DATE_ORDERS,
    TRIP_ID,
    DateOrder,
    InvalidTrip,
    Membership,
    RequestTrips,
    TypedTrip,
    closed,
    parse_request_trip,
    parse_request_trips,
    percent,
    trip_membership,
    trip_percent,
    typed_trips,
)
from bikeshare_membership.stations import station_index

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

JSON_CONTENT_TYPE = "application/json"
# How a server process that cannot serve exits: Gunicorn's "worker failed to boot", so that a worker loading the
# app itself (without preload_app) stops its master instead of being forked again and again.
CANNOT_SERVE_STATUS = 3

log = logging.getLogger(__name__)
api = Blueprint("api", __name__)
admin = Blueprint("admin", __name__)


# --- The answers this module builds; openapi.py documents them from these declarations (`ANSWERS`) -------


@closed
class TripPrediction(TypedDict):
    """The prediction for one trip."""

    trip_id: Annotated[
        int | str | None, WithJsonSchema({**TRIP_ID.json_schema(), "description": "The request's trip_id, as sent."})
    ]
    membership: Annotated[Membership, Field(description="`Member` when `proba` is 50 or more.")]
    proba: Annotated[
        float, Field(ge=0, le=100, description="The probability, in percent (2 decimals), that the rider is a Member.")
    ]


@closed
class Prediction(TripPrediction):
    """The answer for one trip."""

    model: ModelRef


@closed
class Predictions(TypedDict):
    """The answer for a list: one prediction per trip, in order."""

    predictions: list[TripPrediction]
    model: ModelRef


@closed
class ModelInfo(ServedModel, ModelMetadata):
    """The model being served: its version, where it came from, the registry's facts, its signature and the
    training run's metrics."""


@closed
class Reloaded(TypedDict):
    """The version this worker serves after checking the registry."""

    reloaded: Annotated[bool, Field(description="Whether this worker swapped to another version.")]
    model: ModelRef


ANSWERS = openapi.WebAnswers(prediction=Prediction, predictions=Predictions, model_info=ModelInfo, reloaded=Reloaded)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status=status, content_type=JSON_CONTENT_TYPE
    )


def _read_json(settings: Settings) -> Any:
    return _parsed_json(_json_body(request.environ, settings))


def _read_trips(environ: WSGIEnvironment, settings: Settings) -> Any:
    """A /predict body: typed by msgspec in C (`typed_trips`) when every trip has its fields' JSON types, else read as
    any JSON body is, for `parse_request_trip` to find the problem."""
    data = _json_body(environ, settings)
    typed = typed_trips(data)
    return _parsed_json(data) if typed is None else typed


def _json_body(environ: WSGIEnvironment, settings: Settings) -> bytes:
    if request.mimetype != JSON_CONTENT_TYPE:
        raise Refused(415, "UNSUPPORTED_MEDIA_TYPE", f"send the trip as JSON with Content-Type: {JSON_CONTENT_TYPE}")
    return _read_body(environ, settings.max_body_bytes)


def _parsed_json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise Refused(400, "MALFORMED_REQUEST", f"the body is not valid JSON: {error}") from None


def _read_body(environ: WSGIEnvironment, limit: int) -> bytes:
    """The body, read from the WSGI input directly (Werkzeug's stream wrapper costs more than the read; see
    docs/performance.md). 413 over `limit` bytes, before reading when the Content-Length says so; 400 when the
    client closed before sending what its Content-Length says."""
    declared = get_content_length(environ)  # None for a chunked body
    if declared is not None and declared > limit:
        raise _body_too_large(limit)
    if declared is None and not environ.get("wsgi.input_terminated"):
        return b""  # no length and no end marked by the server: HTTP says there is no body
    stream = environ["wsgi.input"]
    data = stream.read(limit + 1) if declared is None else _declared_length_reader(stream).read(declared)
    if len(data) > limit:
        raise _body_too_large(limit)
    if declared is not None and len(data) != declared:
        message = f"the body ended after {len(data)} of the {declared} bytes its Content-Length says"
        raise Refused(400, "MALFORMED_REQUEST", message)
    return data


def _declared_length_reader(stream: Any) -> Any:
    """What reads a body of a declared length: under Gunicorn, its `LengthReader`, which takes the socket's chunks
    as they come. Gunicorn's `Body.read` around it asks for 1 KiB at a time, each call copying the rest of the
    chunk it holds (what that cost a list: docs/performance.md). Any other server's stream reads itself."""
    if type(stream) is Body and type(stream.reader) is LengthReader:
        return stream.reader
    return stream


def _body_too_large(limit: int) -> Refused:
    message = f"the body is over {limit} bytes (MAX_BODY_BYTES); send fewer trips"
    return Refused(413, "REQUEST_ENTITY_TOO_LARGE", message)


def _date_order(environ: WSGIEnvironment) -> DateOrder | None:
    if not environ.get("QUERY_STRING"):  # the usual request: no need to parse a query into `request.args`
        return None
    value = request.args.get("date_order")
    if value is None:
        return None
    for order in DATE_ORDERS:
        if value.upper() == order:
            return order
    raise Refused(400, "INVALID_PARAMETER_VALUE", "must be MDY or DMY", field="date_order")


def _validated_trips(body: Any, date_order: DateOrder | None, max_trips: int) -> RequestTrips:
    if not isinstance(body, list | dict | TypedTrip):
        raise Refused(400, "BAD_REQUEST", "the body must be a trip object or a list of trip objects")
    records = body if isinstance(body, list) else [body]
    if not records:
        raise Refused(400, "BAD_REQUEST", "the list of trips is empty")
    if len(records) > max_trips:
        message = f"{len(records)} trips; at most {max_trips} per request (MAX_TRIPS_PER_REQUEST)"
        raise Refused(413, "TOO_MANY_TRIPS", message)
    try:
        return (
            parse_request_trips(records, date_order)
            if isinstance(body, list)
            else RequestTrips.one(parse_request_trip(body, date_order))
        )
    except InvalidTrip as error:
        where = "" if error.item is None else f"trip {error.item}: "
        field = f"{error.field} " if error.field else ""
        raise Refused(
            400, "INVALID_PARAMETER_VALUE", f"{where}{field}{error.message}", error.field, error.item
        ) from None


def _holder() -> ModelHolder:
    return current_app.extensions["model_holder"]


def _settings() -> Settings:
    return current_app.extensions["settings"]


# A request's validated trips and their probabilities, in the answers' order.
Scored = tuple[RequestTrips, list[float]]


@api.post("/predict")
def predict() -> Response:
    # Flask's `current_app` and `request` are proxies, each read through one costing about a microsecond: the
    # request's environ, settings and model are read once here.
    environ, settings = request.environ, _settings()
    model = _holder().model  # this request is answered by this version, even if a swap happens
    scored: list[Scored] = []
    body = _read_trips(environ, settings)
    answer = predictions(body, model, _date_order(environ), settings.max_trips_per_request, scored)
    environ[recorder.SCORED_ENVIRON] = (model, *scored[0])  # counted and logged after sending (recorder.py)
    return json_response(answer)


def predictions(
    body: Any,
    model: LoadedModel,
    date_order: DateOrder | None = None,
    max_trips: int = Settings.max_trips_per_request,
    scored: list[Scored] | None = None,
) -> Prediction | Predictions:
    """The answer to a /predict body (parsed JSON, or `typed_trips`' trips): validation, features and model, without
    HTTP. `scored`, if given, gets the validated trips with their probabilities."""
    trips = _validated_trips(body, date_order, max_trips)
    probabilities = model.request_probabilities(trips)
    # The labels in Python: numpy's array of texts costs more than it saves. One trip's percent too: a numpy call
    # costs about a microsecond.
    memberships = list(map(trip_membership, probabilities))
    percents = (
        [trip_percent(probabilities[0])] if len(probabilities) == 1 else percent(np.array(probabilities)).tolist()
    )
    answers: list[TripPrediction] = [
        {"trip_id": trip_id, "membership": label, "proba": proba}
        for trip_id, label, proba in zip(trips.columns["trip_id"], memberships, percents, strict=True)
    ]
    if scored is not None:
        scored.append((trips, probabilities))
    if isinstance(body, list):
        return {"predictions": answers, "model": model.describe()}
    return {**answers[0], "model": model.describe()}


@api.get("/health")
def health() -> Response:
    return json_response(_holder().health())


@api.get("/model")
def model_info() -> Response:
    model = _holder().model
    info: ModelInfo = {**model.served(), **model.metadata}
    return json_response(info)


# --- Batch scoring: thin routes over batch_jobs.py, which checks the request and runs the job ------------


@api.post("/predict/batch")
def submit_batch() -> Response:
    """Start scoring a file in the background; 202 with the job to poll."""
    model = _holder().model  # the job scores with the version this worker serves now
    settings = _settings()
    return json_response(batch_jobs.submit_job(settings, _read_json(settings), model), 202)


@api.get("/predict/batch/<job_id>")
def batch_job(job_id: str) -> Response:
    job = batch_jobs.job_status(_settings(), job_id)
    if job is None:
        raise Refused(404, "RESOURCE_DOES_NOT_EXIST", f"no batch job {job_id!r}", field="job_id")
    return json_response(job)


# --- The API's description, built once per app in create_app ---------------------------------------


@api.get("/openapi.json")
def openapi_document() -> Response:
    return Response(current_app.extensions["openapi_json"], mimetype=JSON_CONTENT_TYPE)


# --- Operations ---------------------------------------------------------------------------------------


@admin.post("/admin/reload")
def reload_model() -> Response:
    """Check the registry now and answer the version this worker serves; the other workers follow within a
    second (ModelHolder.request_reload). Registered only when ADMIN_TOKEN is set."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    expected = _settings().admin_token or ""
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Refused(
            401, "UNAUTHENTICATED", "send Authorization: Bearer <ADMIN_TOKEN>", headers=[("WWW-Authenticate", "Bearer")]
        )
    holder = _holder()
    swapped = holder.request_reload()
    if holder.registry_error is not None:
        message = f"the registry did not answer; still serving version {holder.model.version} (see GET /health)"
        raise Refused(503, "TEMPORARILY_UNAVAILABLE", message)
    answer: Reloaded = {"reloaded": swapped, "model": holder.model.describe()}
    return json_response(answer)


@api.get("/metrics")
def prometheus_metrics() -> Response:
    return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


def render_refusal(error: Refused) -> Response:
    response = json_response(error.body(), error.status)
    response.headers.extend(error.headers)
    return response


def render_http_error(error: HTTPException) -> Response:
    """Werkzeug's refusals (404, 405, ...) as JSON errors, keeping the headers they carry (`Allow` listing a
    route's methods, `Retry-After`, `WWW-Authenticate`): only the body, and so its Content-Type, changes."""
    code = (error.name or "error").upper().replace(" ", "_")
    headers = [(name, value) for name, value in error.get_headers() if name.lower() != "content-type"]
    return render_refusal(Refused(error.code or 500, code, error.description or error.name, headers=headers))


def render_unexpected_error(error: Exception) -> Response:
    request_id = request.environ.get(recorder.REQUEST_ID_ENVIRON)
    log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
    return render_refusal(Refused(500, "INTERNAL_ERROR", "the service failed to answer; the error is logged"))


def create_app(settings: Settings | None = None, holder: ModelHolder | None = None) -> Flask:
    """Build the service around a model holder: the given one, or one with the registry's Production version.

    Raises ModelUnavailable when there is no model to serve.
    """
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.extensions["settings"] = settings
    app.extensions["model_holder"] = holder = holder or ModelHolder.from_settings(settings)
    holder.on_refresh = metrics.model_refreshed
    # Read here, once: validation looks station names up in it, and a worker's first request would read it
    # otherwise (pandas and every name normalised; after the fork, so in each worker again).
    station_index()
    limits = settings.max_trips_per_request, settings.max_body_bytes
    document = openapi.document(*limits, ANSWERS, bool(settings.admin_token))
    app.extensions["openapi_json"] = orjson.dumps(document)
    app.register_blueprint(api)
    docs_page.register(app, "/openapi.json", f"{document['info']['title']} API")  # GET /docs: Swagger UI
    if settings.admin_token:  # otherwise /admin/reload is a 404 like any unknown route
        app.register_blueprint(admin)
    prediction_log = app.extensions["prediction_log"] = PredictionLog(settings) if settings.prediction_log else None
    # Flask's documented way to wrap its WSGI app in middleware, which its types declare as a method.
    app.wsgi_app = app.extensions["recorder"] = recorder.RequestRecorder(app.wsgi_app, holder, prediction_log)  # type: ignore[method-assign]
    app.register_error_handler(Refused, render_refusal)
    app.register_error_handler(HTTPException, render_http_error)
    app.register_error_handler(Exception, render_unexpected_error)
    return app


def serve_app() -> Flask:
    """The app as a server process runs it: JSON logs, and a one-line exit when a setting is invalid or there is
    no model."""
    jsonlog.configure()
    settings = settings_from_env("bikeshare-membership", status=CANNOT_SERVE_STATUS)
    try:
        return create_app(settings)
    except ModelUnavailable as error:
        print(f"bikeshare-membership: no model to serve: {error}", file=sys.stderr, flush=True)
        raise SystemExit(CANNOT_SERVE_STATUS) from None


def start_serving(app: Flask) -> None:
    """What each process that answers requests does first (a Gunicorn worker, after the fork): record the
    model it serves (metrics are per process) and start checking for new versions (threads do not survive
    a fork)."""
    holder = app.extensions["model_holder"]
    metrics.model_served(holder.model)
    holder.start_refreshing(app.extensions["settings"].refresh_seconds)
    app.extensions["recorder"].start_flushing()
    if app.extensions.get("prediction_log") is not None:
        app.extensions["prediction_log"].start()


def stop_serving(app: Flask) -> None:
    """What a worker does as it exits: write the request records and the prediction log rows it still holds."""
    app.extensions["recorder"].flush()
    if app.extensions.get("prediction_log") is not None:
        app.extensions["prediction_log"].close()
