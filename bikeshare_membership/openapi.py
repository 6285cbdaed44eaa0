"""The service's OpenAPI 3.1 document (`GET /openapi.json`; `GET /docs` shows it in Swagger UI, docs_page.py).

The document is built from the declarations the service works with, so what it says is what the service does:
- the request: the trip from `REQUEST_SCHEMA`, the date orders from `DATE_ORDERS`, job ids from batch_jobs.py;
- the answers: each JSON object the service answers with is a TypedDict declared where it is built
  (`ModelRef` in model_store.py, `Health` in model_holder.py, `Error` in errors.py, `BatchRequest` and
  `BatchJob` in batch_jobs.py, `BatchSummary` in batch_scoring.py, the web layer's own in app.py), and its
  component schema is generated from that declaration by pydantic (`component_schemas`).
The web layer passes its limits and its own answers' declarations in (`WebAnswers`) and serves the result;
this module imports nothing from it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from bikeshare_membership import batch_jobs
from bikeshare_membership.batch_jobs import BatchJob, BatchRequest
from bikeshare_membership.errors import Error
from bikeshare_membership.model_holder import Health
from bikeshare_membership.schema import (
    DATE_ORDERS,
    EXAMPLE_TRIP,
    REQUEST_SCHEMA,
    REQUIRED_FIELDS,
    any_case,
)

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"


@dataclass(frozen=True)
class WebAnswers:
    """The declarations of the answers the web layer (app.py) builds itself."""

    prediction: type[Any]  # POST /predict, a trip object
    predictions: type[Any]  # POST /predict, a list
    model_info: type[Any]  # GET /model
    reloaded: type[Any]  # POST /admin/reload


def _ref(shape: type[Any] | str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=shape if isinstance(shape, str) else shape.__name__)}


class _DocumentSchemas(GenerateJsonSchema):
    """pydantic's JSON Schema as the document writes it: no titles (a component's title would be its name, a
    property's its key), and a declaration's docstring as one line of description, however the code wraps it."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def typed_dict_schema(self, schema: core_schema.TypedDictSchema) -> JsonSchemaValue:
        json_schema = super().typed_dict_schema(schema)
        json_schema.pop("title", None)
        if "description" in json_schema:
            json_schema["description"] = " ".join(json_schema["description"].split())
        return json_schema


def component_schemas(*shapes: type[Any]) -> dict[str, Any]:
    """The component schemas of `shapes` (TypedDicts) and of every declaration they contain, by class name: the
    JSON Schema (2020-12, as OpenAPI 3.1's) pydantic generates for them as the service writes them."""
    schemas: dict[str, Any] = {}
    for shape in shapes:
        schema = TypeAdapter(shape).json_schema(
            ref_template=REF_TEMPLATE, schema_generator=_DocumentSchemas, mode="serialization"
        )
        definitions = schema.pop("$defs", {})
        if schema != _ref(shape):  # pydantic answers a shape that contains itself with a $ref to its definition
            definitions[shape.__name__] = schema
        for name, definition in definitions.items():
            if schemas.setdefault(name, definition) != definition:
                raise ValueError(f"two declarations are named {name}: rename one")
    return schemas


def answer_shapes(answers: WebAnswers, admin: bool) -> tuple[type[Any], ...]:
    """The declarations of the bodies the document describes beside the trip: the answers, and a batch request."""
    shapes = (answers.prediction, answers.predictions, Error, Health, answers.model_info, BatchRequest, BatchJob)
    return (*shapes, answers.reloaded) if admin else shapes


@functools.cache
def _answer_schemas(answers: WebAnswers, admin: bool) -> dict[str, Any]:
    """Built once per process: pydantic takes a few milliseconds a declaration."""
    return component_schemas(*answer_shapes(answers, admin))


def _schemas(max_trips: int, answers: WebAnswers, admin: bool) -> dict[str, Any]:
    return {
        "Trip": {
            "type": "object",
            "description": "One trip in the 2017 export's fields. Fields not listed are ignored. The patterns "
            "allow ASCII whitespace around a text; the service strips any.",
            "properties": {trip_field.name: trip_field.json_schema() for trip_field in REQUEST_SCHEMA},
            "required": list(REQUIRED_FIELDS),
            "examples": [EXAMPLE_TRIP],
        },
        "Trips": {
            "type": "array",
            "items": _ref("Trip"),
            "minItems": 1,
            "maxItems": max_trips,
            "description": f"Up to {max_trips:,} trips, answered in order.",
        },
        **copy.deepcopy(_answer_schemas(answers, admin)),
    }


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema, **extra}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Not JSON, not the expected shape, or a field that is missing, of the wrong type or impossible.",
        401: "No `Authorization: Bearer <ADMIN_TOKEN>`, or the wrong token.",
        403: "A location outside BATCH_ROOT or BATCH_S3_PREFIX.",
        404: "No such file or job.",
        413: "A body over the size limit (MAX_BODY_BYTES), or more trips than MAX_TRIPS_PER_REQUEST.",
        415: "No `Content-Type: application/json`.",
        503: "MAX_BATCH_JOBS jobs are running already, or jobs cannot be recorded (BATCH_STATE_DIR not writable).",
    }
    return {str(status): _json(_ref(Error), reasons[status]) for status in statuses}


def _admin_paths(answers: WebAnswers) -> dict[str, Any]:
    """The operations that exist only when ADMIN_TOKEN is set."""
    return {
        "/admin/reload": {
            "post": {
                "operationId": "reloadModel",
                "summary": "Check the registry now; every worker loads a newly promoted version",
                "security": [{"adminToken": []}],
                "responses": {
                    "200": _json(_ref(answers.reloaded), "The version this worker now serves."),
                    **_errors(401),
                    "503": _json(_ref(Error), "The registry did not answer; the loaded version keeps serving."),
                },
            }
        }
    }


def document(max_trips: int, max_body_bytes: int, answers: WebAnswers, admin: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service, given the web layer's request limits, its answers' declarations
    and whether the admin operations are on (ADMIN_TOKEN set)."""
    date_order = {
        "name": "date_order",
        "in": "query",
        "required": False,
        "description": "How to read a trip's slash dates when neither timestamp shows the order (`1/10/2017`): "
        f"{' or '.join(DATE_ORDERS)}, in any case; `MDY` when absent.",
        "schema": {
            "type": "string",
            "pattern": f"^({'|'.join(any_case(order) for order in DATE_ORDERS)})$",
            "examples": list(DATE_ORDERS),
        },
    }
    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "description": "The id `POST /predict/batch` answered with.",
        "schema": {"type": "string", "pattern": f"^{batch_jobs.JOB_ID.pattern}$"},
    }
    result: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "bikeshare-membership",
            "version": "1",
            "description": "Was a Toronto Bike Share trip taken by an annual Member or a Casual rider? Every "
            "answer names the model version that gave it; every error is JSON with a 4xx status.",
        },
        "paths": {
            "/predict": {
                "post": {
                    "operationId": "predict",
                    "summary": "Predict the membership of one trip or a list of trips",
                    "parameters": [date_order],
                    "requestBody": {
                        "required": True,
                        "description": f"A trip object, or a list of up to {max_trips:,} of them; at most "
                        f"{max_body_bytes // (1024 * 1024)} MiB.",
                        "content": {
                            "application/json": {
                                "schema": {"anyOf": [_ref("Trip"), _ref("Trips")]},
                                "examples": {
                                    "trip": {"summary": "The first trip of 2017", "value": EXAMPLE_TRIP},
                                    "list": {"summary": "A list of trips", "value": [EXAMPLE_TRIP]},
                                },
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {"oneOf": [_ref(answers.prediction), _ref(answers.predictions)]},
                            "The prediction for a trip object; `predictions` for a list.",
                        ),
                        **_errors(400, 413, 415),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "The loaded model and the registry's last answer",
                    "responses": {"200": _json(_ref(Health), "The service is up and has a model.")},
                }
            },
            "/model": {
                "get": {
                    "operationId": "modelInfo",
                    "summary": "The loaded model's registry metadata, signature and training metrics",
                    "responses": {"200": _json(_ref(answers.model_info), "The model being served.")},
                }
            },
            "/predict/batch": {
                "post": {
                    "operationId": "submitBatch",
                    "summary": "Score a file of trips in the background",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(BatchRequest)}},
                    },
                    "responses": {
                        "202": {
                            **_json(_ref(BatchJob), "The job started; poll it."),
                            "links": {
                                "GetBatchJob": {
                                    "operationId": "getBatchJob",
                                    "parameters": {"job_id": "$response.body#/job_id"},
                                }
                            },
                        },
                        **_errors(400, 403, 404, 413, 415, 503),
                    },
                }
            },
            "/predict/batch/{job_id}": {
                "get": {
                    "operationId": "getBatchJob",
                    "summary": "A batch job's state",
                    "parameters": [job_id],
                    "responses": {"200": _json(_ref(BatchJob), "The job's state."), **_errors(404)},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics, summed over the service's workers",
                    "responses": {
                        "200": {
                            "description": "The Prometheus text format: requests, latency, predictions by class, "
                            "the proba distribution, the model version served, reloads and their failures.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
                }
            },
            "/docs": {
                "get": {
                    "operationId": "docs",
                    "summary": "This document in Swagger UI, with Try it out",
                    "responses": {
                        "200": {
                            "description": "An HTML page whose scripts, styles and icons this service serves "
                            "(under `/docs/swagger-ui-<version>/`): it fetches nothing from elsewhere.",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": _schemas(max_trips, answers, admin),
            **({"securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}} if admin else {}),
        },
    }
    if admin:
        result["paths"].update(_admin_paths(answers))
    return result
