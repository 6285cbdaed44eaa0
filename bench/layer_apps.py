"""The service and the no-op floor with each layer of a request timed where it runs, for bench/serve_layers.py:
`bench.layer_apps:app('service')` or `app('floor')`, under the service's own Gunicorn configuration.

Per request, wall time in nanoseconds, nested:
    server   Gunicorn's `handle_request`: the environ, the app, writing the answer, closing it (for the service,
             the request recorder keeps its record then)
    app      the WSGI app as Gunicorn calls it (for the service, the request recorder around Flask)
    flask    Flask's own WSGI app (for the floor, the same as `app`)
    view     the POST /predict view function

Each worker writes, every REPORT_EVERY requests, the medians of its last ones as a JSON line to the file named
by LAYER_TIMES_FILE (its write falls between two requests).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.workers.sync import SyncWorker

from bikeshare_membership import app as service_app

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for the floor's app (noop_app.py)

import noop_app

LAYERS = ("server", "app", "flask", "view")
REPORT_EVERY = 1000
_timings: dict[str, list[int]] = {layer: [] for layer in LAYERS}


def _timed(layer: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return function(*args, **kwargs)
        finally:
            _timings[layer].append(time.perf_counter_ns() - started)

    return call


def _report() -> None:
    """This worker's medians over its last REPORT_EVERY requests, in microseconds, as one line."""
    medians = {layer: statistics.median(values) / 1000 for layer, values in _timings.items() if values}
    with open(os.environ["LAYER_TIMES_FILE"], "a") as file:
        file.write(json.dumps({"pid": os.getpid(), **medians}) + "\n")
    for values in _timings.values():
        values.clear()


def _handle_request(handle_request: Callable[..., Any]) -> Callable[..., Any]:
    timed = _timed("server", handle_request)

    def handle_and_report(*args: Any) -> Any:
        try:
            return timed(*args)
        finally:
            if len(_timings["server"]) >= REPORT_EVERY:
                _report()

    return handle_and_report


def app(server: str) -> Flask:
    if server == "service":
        flask_app = service_app.create_app()
        recorder = flask_app.extensions["recorder"]
        recorder.wsgi_app = _timed("flask", recorder.wsgi_app)
    elif server == "floor":
        flask_app = noop_app.app
        flask_app.wsgi_app = _timed("flask", flask_app.wsgi_app)  # type: ignore[method-assign]
    else:
        raise ValueError("server must be service or floor")
    flask_app.wsgi_app = _timed("app", flask_app.wsgi_app)  # type: ignore[method-assign]
    endpoint = next(
        rule.endpoint
        for rule in flask_app.url_map.iter_rules()
        if rule.rule == "/predict" and "POST" in (rule.methods or ())
    )
    flask_app.view_functions[endpoint] = _timed("view", flask_app.view_functions[endpoint])
    SyncWorker.handle_request = _handle_request(SyncWorker.handle_request)
    return flask_app
