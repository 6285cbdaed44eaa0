"""The service with its steps taken away one after another, for bench/serve_steps.py: each variant is the app
Gunicorn serves (`bench.step_apps:app('no_model')`) under the service's own configuration.

    service        the service as it runs
    no_recorder    without the request recorder (id, metrics, log line; recorder.py)
    no_model       and the model answering a constant probability (no features, no trees)
    no_validation  and /predict only reading and decoding the body, then answering a ready-made answer of the
                   same size (no validation, no answers to build)

The no-op floor (bench/noop_app.py) is the step below: Flask reading the body and answering a constant.
"""

from __future__ import annotations

from dataclasses import fields

import orjson
from flask import Flask, Response, request

from bikeshare_membership import app as service_app
from bikeshare_membership.model_store import LoadedModel
from bikeshare_membership.schema import EXAMPLE_TRIP, RequestTrips

STEPS = ("service", "no_recorder", "no_model", "no_validation")


class ConstantModel(LoadedModel):
    """The loaded model's identity, answering 25% for every trip."""

    def request_probabilities(self, trips: RequestTrips) -> list[float]:
        return [0.25] * len(trips)


def app(step: str = "service") -> Flask:
    if step not in STEPS:
        raise ValueError(f"step must be one of {', '.join(STEPS)}")
    service = service_app.create_app()
    if step == "service":
        return service
    recorder = service.extensions["recorder"]
    service.wsgi_app = recorder.wsgi_app  # type: ignore[method-assign]
    recorder.start_flushing = lambda: None  # no thread writing records: there are none
    if step == "no_recorder":
        return service
    holder = service.extensions["model_holder"]
    holder.model = ConstantModel(**{field.name: getattr(holder.model, field.name) for field in fields(holder.model)})
    if step == "no_model":
        return service
    answers: dict[int, bytes] = {}  # by number of trips (0: a single trip), the answer the service gives

    def read_only() -> Response:
        body = service_app._read_trips(request.environ, service_app._settings())
        count = len(body) if isinstance(body, list) else 0
        if count not in answers:
            trips = [EXAMPLE_TRIP] * count if count else EXAMPLE_TRIP
            answers[count] = orjson.dumps(service_app.predictions(trips, holder.model))
        return Response(answers[count], mimetype=service_app.JSON_CONTENT_TYPE)

    service.view_functions["api.predict"] = read_only
    return service
