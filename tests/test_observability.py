"""Metrics, request ids and JSON logs of the real service: Gunicorn with its production configuration
(2 workers, preloaded app, metrics in PROMETHEUS_MULTIPROC_DIR), driven over fresh connections."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import rename_attribute, service_env
from harness import start_gunicorn, stop
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from bikeshare_membership import app as service_app
from bikeshare_membership import jsonlog, metrics, metrics_archive, recorder
from bikeshare_membership.config import Settings
from bikeshare_membership.metrics import PROBA_BUCKETS
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.schema import CASUAL, MEMBER, trip_percent
from bikeshare_membership.schema import EXAMPLE_TRIP as TRIP

# A 2023 trip the test model scores as likelier a Member, so that both classes are (usually) counted.
COMMUTE = {
    "trip_start_time": "2023-05-05T17:32:00",
    "trip_stop_time": "2023-05-05T17:46:00",
    "trip_duration_seconds": 836,
    "from_station_id": 7015,
    "to_station_id": 7342,
}
REQUEST_LINE_FIELDS = {"time", "level", "request_id", "method", "path", "endpoint", "status", "duration_ms"}
REQUEST_LINE_FIELDS |= {"model_version", "pid"}
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Service:
    url: str
    log: Path
    process: subprocess.Popen
    metrics_folder: Path


@pytest.fixture(scope="module")
def service(settings: Settings, trained: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("observability")
    log, metrics_folder = folder / "gunicorn.log", folder / "metrics"
    metrics_folder.mkdir()
    env = service_env(settings, MODEL_REFRESH_SECONDS="0", PROMETHEUS_MULTIPROC_DIR=str(metrics_folder))
    process, url = start_gunicorn(env, log)
    try:
        yield Service(url, log, process, metrics_folder)
    finally:
        stop(process)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parsed(exposition: bytes) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }


def scrape(service: Service) -> Samples:
    """The metrics with every request answered before counted, and this scrape too: each worker writes the
    requests it answered every FLUSH_SECONDS."""
    time.sleep(2 * recorder.FLUSH_SECONDS)
    response = requests.get(f"{service.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    request_lines(service, response.headers["X-Request-ID"])
    return parsed(response.content)


def values(samples: Samples, name: str, key: str) -> dict[str, float]:
    """The samples called `name`, by the value of their label `key`."""
    return {dict(labels)[key]: value for (sample, labels), value in samples.items() if sample == name}


def delta(after: Samples, before: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """What the samples called `name` grew by, by their labels; those that did not grow are left out."""
    grown = {key: value - before.get((sample, key), 0.0) for (sample, key), value in after.items() if sample == name}
    return {key: value for key, value in grown.items() if value}


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


def log_lines(service: Service) -> list[dict[str, Any]]:
    """Every line of the service's log; each must be a JSON object."""
    return [json.loads(line) for line in service.log.read_text().splitlines() if line.strip()]


def request_lines(service: Service, request_id: str) -> list[dict[str, Any]]:
    """The log lines of an answered request: they are written once the answer is sent, so wait for them."""
    deadline = time.monotonic() + 10
    while not (lines := [line for line in log_lines(service) if line.get("request_id") == request_id]):
        assert time.monotonic() < deadline, f"no log line for request {request_id}"
        time.sleep(0.01)
    return lines


def test_metrics_add_up_over_both_workers(service: Service) -> None:
    """A known mix of requests, each on a fresh connection; the scrape's sums agree with what was sent and
    with what the answers said."""
    before = scrape(service)
    sent: Counter[tuple[str, str, str]] = Counter()
    classes: Counter[str] = Counter()
    probas: list[float] = []
    request_ids = []

    def call(method: str, path: str, endpoint: str, **kwargs: Any) -> tuple[str, str, requests.Response]:
        headers = {"X-Request-ID": uuid.uuid4().hex, "Connection": "close", **kwargs.pop("headers", {})}
        response = requests.request(method, f"{service.url}{path}", headers=headers, timeout=10, **kwargs)
        return endpoint, method, response

    singles = [("POST", "/predict", "/predict", {"json": TRIP if index % 2 else COMMUTE}) for index in range(30)]
    lists = [
        ("POST", "/predict", "/predict", {"json": [TRIP, COMMUTE] * (size // 2) + [TRIP] * (size % 2)})
        for size in range(1, 11)
    ]
    refused = [
        ("POST", "/predict", "/predict", {"data": b"{not json", "headers": JSON}),
        ("POST", "/predict", "/predict", {"data": b"{}", "headers": {"Content-Type": "text/plain"}}),
        ("POST", "/predict", "/predict", {"json": {**TRIP, "trip_duration_seconds": "long"}}),
        ("GET", "/health", "/health", {}),
        ("GET", f"/predict/batch/{uuid.uuid4().hex}", "/predict/batch/<job_id>", {}),
        ("GET", f"/no-such-page-{uuid.uuid4().hex}", "unmatched", {}),
    ] * 4
    # Eight clients at once keep both sync workers busy, so both answer (one at a time, one worker may take all).
    with ThreadPoolExecutor(max_workers=8) as clients:
        answers = list(clients.map(lambda spec: call(*spec[:3], **spec[3]), singles + lists + refused))
    for endpoint, method, response in answers:
        sent[endpoint, method, str(response.status_code)] += 1
        request_ids.append(response.request.headers["X-Request-ID"])
        if endpoint == "/predict" and response.status_code == 200:
            body = response.json()
            for answer in body.get("predictions", [body]):
                classes[answer["membership"]] += 1
                probas.append(answer["proba"])
    expected_refusals = {("/predict", "POST", "400"): 8, ("/predict", "POST", "415"): 4, ("unmatched", "GET", "404"): 4}
    assert all(sent[key] == count for key, count in expected_refusals.items()), sent
    pids = {line["pid"] for request_id in request_ids for line in request_lines(service, request_id)}
    after = scrape(service)  # every request above is logged, so counted

    sent["/metrics", "GET", "200"] += 1  # the first scrape
    counted = delta(after, before, "bikeshare_http_requests_total")
    assert counted == {labels(endpoint=e, method=m, status=s): float(n) for (e, m, s), n in sent.items()}
    by_endpoint = Counter[str]()
    for (endpoint, _, _), count in sent.items():
        by_endpoint[endpoint] += count
    timed = delta(after, before, "bikeshare_http_request_duration_seconds_count")
    assert timed == {labels(endpoint=endpoint): float(count) for endpoint, count in by_endpoint.items()}

    predicted = delta(after, before, "bikeshare_predictions_total")
    assert predicted == {labels(membership=name): float(count) for name, count in classes.items()}
    assert sum(predicted.values()) == len(probas) == 30 + sum(range(1, 11))
    proba_count = delta(after, before, "bikeshare_prediction_proba_percent_count")
    assert proba_count == {labels(): float(len(probas))}
    buckets = delta(after, before, "bikeshare_prediction_proba_percent_bucket")
    expected_buckets = {
        labels(le=str(bound)): float(sum(proba <= bound for proba in probas)) for bound in PROBA_BUCKETS
    }
    expected_buckets[labels(le="+Inf")] = float(len(probas))
    assert buckets == {key: count for key, count in expected_buckets.items() if count}
    proba_sum = delta(after, before, "bikeshare_prediction_proba_percent_sum")[labels()]
    assert proba_sum == pytest.approx(sum(probas))

    version = requests.post(f"{service.url}/predict", json=TRIP, timeout=10).json()["model"]["version"]
    serving = {key: value for key, value in values(after, "bikeshare_model_loaded", "version").items() if value}
    assert serving == {version: 2.0}  # both live workers serve it

    assert len(pids) == 2, f"both workers should have answered, got {pids}"
    print(
        f"\nsent {sum(sent.values())} requests ({dict(sent)}); predicted {len(probas)} trips {dict(classes)}; "
        f"answered by workers {sorted(pids)}; metrics grew by {sum(counted.values()):.0f} requests, "
        f"{sum(predicted.values()):.0f} predictions, {proba_count[labels()]:.0f} probas, "
        f"{sum(timed.values()):.0f} timings; model {version} served by {serving[version]:.0f} workers"
    )


def test_request_id_is_echoed_generated_or_replaced_and_logged_once(service: Service) -> None:
    given = "client-42.retry:1"
    assert (
        requests.post(f"{service.url}/predict", json=TRIP, headers={"X-Request-ID": given}).headers["X-Request-ID"]
        == given
    )
    generated = requests.get(f"{service.url}/health").headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    replaced = {}
    for hostile in ("x" * 129, "a b", "<script>", "id\u00e9", "ok;rm -rf /"):
        answer = requests.post(f"{service.url}/predict", json=TRIP, headers={"X-Request-ID": hostile.encode()})
        replaced[hostile] = answer.headers["X-Request-ID"]
        assert replaced[hostile] != hostile and len(replaced[hostile]) == 32
    ids = [given, generated, *replaced.values()]
    assert len(set(ids)) == len(ids)

    for request_id in ids:
        mine = request_lines(service, request_id)
        assert len(mine) == 1, f"{request_id}: {mine}"
        assert mine[0].keys() >= REQUEST_LINE_FIELDS
    lines = log_lines(service)  # every line JSON, Gunicorn's own included
    assert any(line["logger"] == "gunicorn.error" for line in lines)
    assert not [line for line in lines if line.get("request_id") in replaced]
    first = next(line for line in lines if line.get("request_id") == given)
    assert (first["method"], first["path"], first["endpoint"], first["status"]) == ("POST", "/predict", "/predict", 200)
    print(f"\nrequest line: {json.dumps(first)}")


def test_credentials_bodies_and_query_strings_never_reach_the_log(service: Service) -> None:
    secrets = {name: f"{name}-{uuid.uuid4().hex}" for name in ("header", "query", "cookie", "body")}
    response = requests.post(
        f"{service.url}/predict?date_order=DMY&api_key={secrets['query']}",
        json={**TRIP, "trip_id": secrets["body"]},
        headers={"Authorization": f"Bearer {secrets['header']}", "Cookie": f"session={secrets['cookie']}"},
        timeout=10,
    )
    assert response.status_code in (200, 400)
    failed = requests.post(
        f"{service.url}/predict?token={secrets['query']}",
        data=f'{{"password": "{secrets["body"]}"',
        headers={**JSON, "Authorization": f"Basic {secrets['header']}"},
        timeout=10,
    )
    assert failed.status_code == 400
    for answer in (response, failed):
        (line,) = request_lines(service, answer.headers["X-Request-ID"])
        assert line["path"] == "/predict"
    text = service.log.read_text()
    assert not [name for name, secret in secrets.items() if secret in text]


def test_a_killed_worker_leaves_consistent_metrics(service: Service) -> None:
    """SIGKILL one worker: Gunicorn replaces it; counters never go back, and the model gauge counts the live
    workers only (the dead one's is dropped, the new one records its own). The dead worker's files are gone, its
    values in the archive files, so the folder does not grow with each worker replaced (max_requests)."""

    def health_answered_by() -> int:
        answer = requests.get(f"{service.url}/health", headers={"Connection": "close"}, timeout=10)
        (line,) = request_lines(service, answer.headers["X-Request-ID"])
        return line["pid"]

    killed, version = health_answered_by(), requests.get(f"{service.url}/model", timeout=10).json()["version"]
    workers_before = {line["pid"] for line in log_lines(service) if line["message"].startswith("Booting worker")}
    before = scrape(service)
    os.kill(killed, signal.SIGKILL)
    answered_by: list[int] = []
    deadline = time.monotonic() + 60
    while not set(answered_by) - workers_before and time.monotonic() < deadline:  # until the new worker answers
        answered_by.append(health_answered_by())
    replacement = set(answered_by) - workers_before
    assert replacement, "Gunicorn did not replace the killed worker"
    after = scrape(service)

    serving = {key: value for key, value in values(after, "bikeshare_model_loaded", "version").items() if value}
    assert serving == {version: 2.0}
    total = "bikeshare_http_requests_total"
    assert all(after[name, key] >= value for (name, key), value in before.items() if name == total)
    health = labels(endpoint="/health", method="GET", status="200")
    assert after[total, health] - before[total, health] == len(answered_by)
    files = {path.name for path in service.metrics_folder.glob("*.db")}
    assert not {name for name in files if name.endswith(f"_{killed}.db")}
    assert {f"counter_{metrics_archive.ARCHIVE_NAME}.db", f"histogram_{metrics_archive.ARCHIVE_NAME}.db"} <= files
    print(f"\nkilled worker {killed}, replaced by {replacement}; {len(answered_by)} requests counted after the kill")
    assert service.process.poll() is None


def test_archiving_dead_workers_keeps_every_sum(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three workers' files as prometheus_client writes them; two die one after the other: the folder's
    exposition is the same before and after, and only the live worker's files and the archives are left. When
    archiving cannot take the lock in time, or fails (a full disk), it logs, and the worker's files stay."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    requests_help, latency_help = "HTTP requests answered", "Time to the built response"
    for pid, answered in ((101, 3.0), (102, 5.0), (103, 7.0)):
        # (file kind, metric, sample, its labels beside `endpoint`, value)
        samples: list[tuple[str, str, str, dict[str, str], float]] = [
            ("counter", "bikeshare_http_requests", "bikeshare_http_requests_total", {}, answered),
            ("histogram", "bikeshare_latency", "bikeshare_latency_bucket", {"le": "0.001"}, answered),
            ("histogram", "bikeshare_latency", "bikeshare_latency_bucket", {"le": "+Inf"}, 1.0),
            ("histogram", "bikeshare_latency", "bikeshare_latency_sum", {}, answered / 1000),
        ]
        for kind in ("counter", "histogram"):
            written = MmapedDict(str(tmp_path / f"{kind}_{pid}.db"))
            for _, metric, name, extra, value in (sample for sample in samples if sample[0] == kind):
                help_text = requests_help if kind == "counter" else latency_help
                key = mmap_key(metric, name, ["endpoint", *extra], ["/predict", *extra.values()], help_text)
                written.write_value(key, value, 0.0)
            written.close()

    def exposition() -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(tmp_path))
        return generate_latest(registry)

    before = exposition()
    metrics_archive.archive_dead_worker(101)
    metrics_archive.archive_dead_worker(102)  # added to the archive the first one made
    assert exposition() == before and b'bikeshare_http_requests_total{endpoint="/predict"} 15.0' in before
    archives = {f"counter_{metrics_archive.ARCHIVE_NAME}.db", f"histogram_{metrics_archive.ARCHIVE_NAME}.db"}
    assert {path.name for path in tmp_path.glob("*.db")} == {"counter_103.db", "histogram_103.db"} | archives

    # a stuck scrape: the master does not wait for it
    scrape = os.open(tmp_path / metrics_archive.ARCHIVE_LOCK, os.O_RDWR)
    fcntl.flock(scrape, fcntl.LOCK_SH)
    monkeypatch.setattr(metrics_archive, "ARCHIVE_WAIT_SECONDS", 0.05)
    with caplog.at_level(logging.WARNING, logger=metrics_archive.__name__):
        metrics_archive.archive_dead_worker(103)
    os.close(scrape)
    assert "metrics of worker 103 not archived" in caplog.text
    assert exposition() == before and (tmp_path / "counter_103.db").exists()

    def failing_replace(source: str, destination: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics_archive.os, "replace", failing_replace)
    with caplog.at_level(logging.ERROR, logger=metrics_archive.__name__):
        metrics_archive.archive_dead_worker(103)  # in Gunicorn's master: it must not raise
    assert "could not archive the metrics of worker 103" in caplog.text
    assert exposition() == before and (tmp_path / "counter_103.db").exists()


def test_request_lines_are_written_in_whole_lines_of_at_most_pipe_buf(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of request lines goes out in pieces a pipe writes in one go, so workers' lines never interleave."""
    pieces: list[bytes] = []
    monkeypatch.setattr(jsonlog, "_write_all", lambda data: pieces.append(bytes(data)))
    lines = [(time.time(), {"request_id": uuid.uuid4().hex, "path": "/predict" + "x" * index}) for index in range(300)]
    jsonlog.write_info_lines("predict.requests", "request", lines)
    assert len(pieces) > 1 and all(len(piece) <= select.PIPE_BUF and piece.endswith(b"\n") for piece in pieces)
    written = [json.loads(line) for piece in pieces for line in piece.splitlines()]
    assert [line["request_id"] for line in written] == [fields["request_id"] for _, fields in lines]


def test_records_beyond_max_pending_are_written_by_the_request(
    model: Any, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the flushing thread cannot keep up (or is blocked), requests write the records themselves: the queue
    stays bounded and no record is dropped."""
    monkeypatch.setattr(recorder, "MAX_PENDING", 50)
    app = service_app.create_app(Settings(), ModelHolder(None, model))
    recorder_ = app.extensions["recorder"]
    recorder_.flushing = True  # as in a worker whose thread is stuck: nothing writes in the background
    client = app.test_client()
    for _ in range(recorder.MAX_PENDING):
        client.get("/health").close()  # a request is recorded when its response is closed, as servers do
    assert len(recorder_.pending) == recorder.MAX_PENDING and "predict.requests" not in capfd.readouterr().err
    client.get("/health").close()
    assert not recorder_.pending
    written = [json.loads(line) for line in capfd.readouterr().err.splitlines() if '"predict.requests"' in line]
    assert len(written) == recorder.MAX_PENDING + 1


def test_an_exiting_workers_flush_waits_for_the_batch_the_thread_is_writing(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """worker_exit's flush returns only once the batch the flushing thread took is written: the exit that
    follows would otherwise cut that batch off (SIGTERM's log once missed a request line this way)."""
    app = service_app.create_app(Settings(), ModelHolder(None, model))
    recorder_ = app.extensions["recorder"]
    recorder_.flushing = True  # records are kept for a thread, as in a worker
    client = app.test_client()
    for _ in range(3):
        client.get("/health").close()
    written: list[str] = []
    thread_writing, release = threading.Event(), threading.Event()

    def slow_write(logger: str, message: str, lines: list[tuple[float, dict[str, Any]]]) -> None:
        thread_writing.set()
        release.wait(10)
        written.extend(line["request_id"] for _, line in lines)

    monkeypatch.setattr(jsonlog, "write_info_lines", slow_write)
    flushing_thread = threading.Thread(target=recorder_.flush)
    flushing_thread.start()
    assert thread_writing.wait(10)  # the thread has taken the three records and is writing them
    exiting = threading.Thread(target=recorder_.flush)  # what worker_exit calls
    exiting.start()
    exiting.join(0.5)
    assert exiting.is_alive()  # it waits for the batch in progress instead of returning at once
    release.set()
    exiting.join(10)
    flushing_thread.join(10)
    assert len(written) == 3 and not recorder_.pending


# --- histograms without prometheus_client's internals -------------------------------------------------------


class IncWithExemplar:
    """A stored histogram value whose `inc` takes another signature (an exemplar too) from any caller outside
    prometheus_client, as in a release that changed it and its own callers."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def inc(self, amount: float, *exemplar: Any) -> None:
        if not exemplar and not sys._getframe(1).f_globals.get("__name__", "").startswith("prometheus_client."):
            raise TypeError("inc() missing 1 required positional argument: 'exemplar'")
        self.value.inc(amount)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.value, name)


PROMETHEUS_INTERNALS_CHANGED: dict[str, Callable[[pytest.MonkeyPatch, Histogram], None]] = {
    "_upper_bounds renamed": lambda patch, histogram: rename_attribute(
        patch, histogram, "_upper_bounds", "_bounds", "prometheus_client"
    ),
    "_buckets renamed": lambda patch, histogram: rename_attribute(
        patch, histogram, "_buckets", "_bucket_values", "prometheus_client"
    ),
    "_sum renamed": lambda patch, histogram: rename_attribute(patch, histogram, "_sum", "_total", "prometheus_client"),
    "bucket inc takes another signature": lambda patch, histogram: patch.setattr(
        histogram, "_buckets", [IncWithExemplar(bucket) for bucket in histogram._buckets]
    ),
}


@pytest.mark.parametrize("change", [None, *PROMETHEUS_INTERNALS_CHANGED])
def test_histograms_count_every_value_also_without_prometheus_client_internals(
    change: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Batches of probabilities reach the exposition as `observe` of each value would write them, through
    prometheus_client's internals or, if they changed, its public `observe`: decided at the first batch, with
    one warning."""
    monkeypatch.setattr(metrics, "_batched_writes", None)  # this process decides again, at its next batch
    if change:
        PROMETHEUS_INTERNALS_CHANGED[change](monkeypatch, metrics.PROBA)
    probabilities = np.array([0.0, 0.0325, 0.1, 0.1001, 0.099996, 0.4999, 0.5, 0.732, 0.9999, 1.0] * 5)
    public = CollectorRegistry()
    reference = Histogram(
        "bikeshare_prediction_proba_percent", "public observe", buckets=PROBA_BUCKETS, registry=public
    )
    for probability in probabilities:
        reference.observe(trip_percent(probability))  # as answered: 0.099996 is 10.0, in the bucket up to 10

    before = parsed(metrics.exposition())
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        metrics.trips_predicted(probabilities[:7])
        metrics.trips_predicted(probabilities[:0])
        metrics.trips_predicted(probabilities[7:])
    after = parsed(metrics.exposition())

    # Members from the probabilities, as the answers: 0.4999 (49.99%) is Casual, 0.5 a Member.
    counted = delta(after, before, "bikeshare_predictions_total")
    assert counted == {labels(membership=MEMBER): 20, labels(membership=CASUAL): 30}
    expected = parsed(generate_latest(public))
    for sample in ("_count", "_sum", "_bucket"):
        name = f"bikeshare_prediction_proba_percent{sample}"
        grown = {key: pytest.approx(value) for key, value in delta(after, before, name).items()}
        assert grown == {key: value for (found, key), value in expected.items() if found == name and value}
    assert metrics._batched_writes is (change is None)
    warnings = [record.getMessage() for record in caplog.records if record.name == metrics.__name__]
    if change is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "observe one value at a time" in warnings[0], warnings
        print(f"\n{change}: {warnings[0]}")
