"""The service's OpenAPI 3.1 document (`GET /openapi.json`; `GET /docs` shows it in Swagger UI, docs_page.py).

The document is built from the declarations the service checks requests with: the trip from
`REQUEST_SCHEMA`, the date orders from `DATE_ORDERS`, job ids and states from
batch_jobs.py. So what the document says is what the validators do. The web layer passes its limits in and
serves the result; this module imports nothing from it.
"""

from __future__ import annotations

from typing import Any

from bikeshare_membership import batch_jobs
from bikeshare_membership.schema import (
    CASUAL,
    DATE_ORDERS,
    EXAMPLE_TRIP,
    MEMBER,
    REQUEST_SCHEMA,
    REQUIRED_FIELDS,
    any_case,
)

OPENAPI_VERSION = "3.1.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str) -> list[str]:
    return [kind, "null"]


def _object(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A closed object: every property the service writes is listed, and nothing else appears."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


TIMESTAMP = {"type": "string", "format": "date-time"}
LOCATION = "A path relative to BATCH_ROOT, or an s3:// URI."
LOCATION_PATTERN_NOTE = (
    "The pattern leaves out paths with a `:` and S3 folders starting with `.`; the service refuses only `://` "
    "in a path and `.` or `..` folders."
)


def _schemas(max_trips: int) -> dict[str, Any]:
    trip_id = next(trip_field for trip_field in REQUEST_SCHEMA if trip_field.name == "trip_id")
    model_ref = _object(
        {
            "name": {"type": "string", "description": "The registered model."},
            "version": {"type": "string", "description": "Its version (`local` for a MODEL_PATH folder)."},
            "run_id": {"type": "string", "description": "The MLflow run that trained it."},
        },
        description="The model version that answered.",
    )
    prediction = {
        "trip_id": {**trip_id.json_schema(), "description": "The request's trip_id, as sent."},
        "membership": {
            "type": "string",
            "enum": [MEMBER, CASUAL],
            "description": "`Member` when `proba` is 50 or more.",
        },
        "proba": {
            "type": "number",
            "minimum": 0,
            "maximum": 100,
            "description": "The probability, in percent (2 decimals), that the rider is a Member.",
        },
    }
    job_states = ["starting", "running", *batch_jobs.FINISHED]
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
        "ModelRef": model_ref,
        "Prediction": _object({**prediction, "model": _ref("ModelRef")}, description="The answer for one trip."),
        "Predictions": _object(
            {"predictions": {"type": "array", "items": _object(prediction)}, "model": _ref("ModelRef")},
            description="The answer for a list: one prediction per trip, in order.",
        ),
        "Error": _object(
            {
                "error": _object(
                    {
                        "code": {"type": "string", "examples": ["INVALID_PARAMETER_VALUE"]},
                        "message": {"type": "string", "description": "What is wrong, for a person."},
                        "field": {"type": _nullable("string"), "description": "The field at fault, if one is."},
                        "item": {"type": _nullable("integer"), "description": "The trip's position in a list."},
                    }
                )
            },
            description="Every error, in the shape of MLflow's scoring server plus the field and the item.",
        ),
        "Health": _object(
            {
                "status": {"type": "string", "enum": ["ok"]},
                "model": _object(
                    {
                        **model_ref["properties"],
                        "loaded_at": TIMESTAMP,
                        "source": {"type": "string", "description": "Where the artifacts came from."},
                        "origin": {"type": "string", "enum": ["downloaded", "cache", "path"]},
                    }
                ),
                "registry": _object(
                    {
                        "reachable": {"type": "boolean", "description": "Whether the last registry check answered."},
                        "error": {"type": _nullable("string")},
                        "checked_at": {**TIMESTAMP, "type": _nullable("string")},
                    }
                ),
            }
        ),
        "ModelInfo": _object(
            {
                **model_ref["properties"],
                "source": {"type": "string"},
                "origin": {"type": "string", "enum": ["downloaded", "cache", "path"]},
                "loaded_at": TIMESTAMP,
                "registry": _object(
                    {
                        "current_stage": {"type": _nullable("string")},
                        "aliases": {"type": "array", "items": {"type": "string"}},
                        "creation_timestamp": {"type": _nullable("integer")},
                        "description": {"type": _nullable("string"), "description": "The model card, in words."},
                        "tags": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                            "description": "The model card train.py writes: data files and span, rows, Member "
                            "share, the time-ordered test month and figures beside the prior's, the gate's verdict "
                            "and reason, the candidate and its features.",
                        },
                    },
                    required=[],
                    description="The registry's facts about the version (empty for a MODEL_PATH folder).",
                ),
                "metrics": {
                    "type": "object",
                    "additionalProperties": {"type": _nullable("number")},
                    "description": "The training run's metrics.",
                },
                "signature": {"type": _nullable("object"), "description": "The MLflow model signature."},
                "bytes": {"type": _nullable("integer"), "description": "The size of the model's files."},
                "fetch_error": {"type": "string", "description": "Why a cached version is served, if it is."},
            },
            required=[
                *model_ref["properties"],
                *("source", "origin", "loaded_at", "registry", "metrics", "signature", "bytes"),
            ],
        ),
        "BatchRequest": _object(
            {
                "input": {
                    "type": "string",
                    "pattern": batch_jobs.INPUT_PATTERN,
                    "description": "A trip file (CSV, gzip, zip or Parquet): a path under BATCH_ROOT (relative "
                    f"paths start there) or an s3:// URI under BATCH_S3_PREFIX. {LOCATION_PATTERN_NOTE}",
                },
                "output": {
                    "type": _nullable("string"),
                    "pattern": batch_jobs.OUTPUT_PATTERN,
                    "description": "Where the predictions go (.csv, .csv.gz, .parquet, or a folder ending in /); "
                    f"by default beside the input as `<name>.predictions.csv`; not the input itself. "
                    f"{LOCATION_PATTERN_NOTE}",
                },
            },
            required=["input"],
            examples=[{"input": "trips.csv"}],
        ),
        "BatchSummary": _object(
            {
                "input": {"type": "string"},
                "output": {"type": "string"},
                "rejects": {"type": "string"},
                "rows": {"type": "integer"},
                "scored": {"type": "integer"},
                "rejected": {"type": "integer"},
                "rejected_by_reason": {"type": "object", "additionalProperties": {"type": "integer"}},
                "member_share": {"type": "number", "description": "The share of scored trips predicted Member."},
                "seconds": {"type": "number"},
                "model": _ref("ModelRef"),
                "rows_per_s": {"type": "number"},
            }
        ),
        "BatchJob": _object(
            {
                "job_id": {"type": "string", "pattern": f"^{batch_jobs.JOB_ID.pattern}$"},
                "status": {"type": "string", "enum": job_states},
                "input": {"type": "string", "description": LOCATION},
                "output": {"type": "string", "description": LOCATION},
                "rejects": {"type": "string", "description": f"Where the rows that could not be read go. {LOCATION}"},
                "model": _ref("ModelRef"),
                "submitted_at": TIMESTAMP,
                "started_at": TIMESTAMP,
                "finished_at": TIMESTAMP,
                "pid": {"type": "integer"},
                "host": {"type": "string"},
                "rows_done": {"type": "integer"},
                "progress": {"type": _nullable("number"), "minimum": 0, "maximum": 1},
                "error": {"type": "string", "description": "Why a failed job failed."},
                "summary": _ref("BatchSummary"),
                "peak_rss_mb": {"type": _nullable("number")},
            },
            required=["job_id", "status", "input", "output", "rejects", "model", "submitted_at"],
            description="A batch job: `starting`, `running` (with progress), `succeeded` (with the summary) "
            "or `failed` (with the error).",
        ),
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
    return {str(status): _json(_ref("Error"), reasons[status]) for status in statuses}


def _admin_paths() -> dict[str, Any]:
    """The operations that exist only when ADMIN_TOKEN is set."""
    reloaded = _object(
        {
            "reloaded": {"type": "boolean", "description": "Whether this worker swapped to another version."},
            "model": _ref("ModelRef"),
        }
    )
    return {
        "/admin/reload": {
            "post": {
                "operationId": "reloadModel",
                "summary": "Check the registry now; every worker loads a newly promoted version",
                "security": [{"adminToken": []}],
                "responses": {
                    "200": _json(reloaded, "The version this worker now serves."),
                    **_errors(401),
                    "503": _json(_ref("Error"), "The registry did not answer; the loaded version keeps serving."),
                },
            }
        }
    }


def document(max_trips: int, max_body_bytes: int, admin: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service, given the web layer's request limits and whether the admin
    operations are on (ADMIN_TOKEN set)."""
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
                            {"oneOf": [_ref("Prediction"), _ref("Predictions")]},
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
                    "responses": {"200": _json(_ref("Health"), "The service is up and has a model.")},
                }
            },
            "/model": {
                "get": {
                    "operationId": "modelInfo",
                    "summary": "The loaded model's registry metadata, signature and training metrics",
                    "responses": {"200": _json(_ref("ModelInfo"), "The model being served.")},
                }
            },
            "/predict/batch": {
                "post": {
                    "operationId": "submitBatch",
                    "summary": "Score a file of trips in the background",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("BatchRequest")}},
                    },
                    "responses": {
                        "202": {
                            **_json(_ref("BatchJob"), "The job started; poll it."),
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
                    "responses": {"200": _json(_ref("BatchJob"), "The job's state."), **_errors(404)},
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
            "schemas": _schemas(max_trips),
            **({"securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}} if admin else {}),
        },
    }
    if admin:
        result["paths"].update(_admin_paths())
    return result
