"""The HTTP floor for bench/serve.py: a Flask app that reads the body and answers a constant, served
under the same Gunicorn configuration as the real service."""

import orjson
from flask import Flask, Response, request

app = Flask(__name__)
ANSWER = orjson.dumps({"trip_id": None, "membership": "Casual", "proba": 25.0, "model": {"name": "noop"}})


@app.post("/predict")
def predict() -> Response:
    request.get_data()
    return Response(ANSWER, mimetype="application/json")


@app.get("/health")
def health() -> Response:
    return Response(b'{"status": "ok"}', mimetype="application/json")
