"""The service's operational edges under real Gunicorn: body limits at the socket, graceful shutdown on SIGTERM,
and `POST /admin/reload` against a real registry."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from conftest import service_env
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import IterUnreader
from harness import ROOT, start_gunicorn, stop
from mlflow.tracking import MlflowClient

from bikeshare_membership import app as service_app
from bikeshare_membership import promotion
from bikeshare_membership.config import Settings
from bikeshare_membership.registry import production_version
from bikeshare_membership.schema import EXAMPLE_TRIP as TRIP

ADMIN_TOKEN = "ops-test-token-9f8e7d6c5b4a"
GRACEFUL_TIMEOUT = 20


def address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 80


def raw_exchange(url: str, head: bytes, body_parts: Iterable[bytes], half_close: bool = False) -> bytes:
    """Send a hand-made request and read the answer until the server closes; a hang fails on the socket timeout.

    The server may answer and close before it has read the whole body (that is the point of a limit), so a
    failed send is expected; the answer is then read from what arrived.
    """
    with socket.create_connection(address(url), timeout=30) as connection:
        try:
            connection.sendall(head)
            for part in body_parts:
                connection.sendall(part)
            if half_close:
                connection.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = bytearray()
        while True:
            try:
                data = connection.recv(1 << 16)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    return bytes(received)


def parse_answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def chunked(payload: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for start in range(0, len(payload), size):
        part = payload[start : start + size]
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    yield b"0\r\n\r\n"


def post_head(url: str, *headers: str) -> bytes:
    lines = ["POST /predict HTTP/1.1", f"Host: {address(url)[0]}", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def limited_service(
    settings: Settings, trained: subprocess.CompletedProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Gunicorn with a small body limit, so the refused bodies stay cheap to send."""
    env = service_env(settings, MAX_BODY_BYTES="100000")
    process, url = start_gunicorn(env, tmp_path_factory.mktemp("limited") / "gunicorn.log")
    try:
        yield url
    finally:
        stop(process)


def test_oversized_bodies_get_a_json_413_through_gunicorn(limited_service: str) -> None:
    url = limited_service
    too_large = json.dumps([TRIP] * 400).encode()  # about 120 kB
    assert len(too_large) > 100_000
    answers = {
        "honest Content-Length": raw_exchange(url, post_head(url, f"Content-Length: {len(too_large)}"), [too_large]),
        "chunked, no Content-Length": raw_exchange(
            url, post_head(url, "Transfer-Encoding: chunked"), chunked(too_large)
        ),
        # Claims a gigabyte, sends two bytes and waits: refused on the claim, not after a wait for the rest.
        "Content-Length claims more": raw_exchange(url, post_head(url, "Content-Length: 1000000000"), [b"[]"]),
    }
    for case, raw in answers.items():
        status, body = parse_answer(raw)
        assert status == 413, (case, raw[:300])
        assert body["error"]["code"] == "REQUEST_ENTITY_TOO_LARGE"
        assert "100000 bytes (MAX_BODY_BYTES)" in body["error"]["message"]


def test_lying_content_lengths_under_the_limit_get_a_json_400(limited_service: str) -> None:
    url = limited_service
    trip = json.dumps(TRIP).encode()
    # Says 10 bytes, sends the whole trip: Gunicorn reads 10 bytes, which are not JSON.
    short = raw_exchange(url, post_head(url, "Content-Length: 10"), [trip])
    # Says 5000 bytes, sends the trip and closes its side: the body ends early.
    long = raw_exchange(url, post_head(url, "Content-Length: 5000"), [trip], half_close=True)
    for raw in (short, long):
        status, body = parse_answer(raw)
        assert status == 400, raw[:300]
        assert body["error"]["code"] in ("MALFORMED_REQUEST", "BAD_REQUEST")


def test_chunked_body_under_the_limit_is_answered(limited_service: str) -> None:
    url = limited_service
    status, body = parse_answer(
        raw_exchange(url, post_head(url, "Transfer-Encoding: chunked"), chunked(json.dumps(TRIP).encode(), 50))
    )
    assert status == 200 and body["trip_id"] == TRIP["trip_id"]


def test_a_list_arriving_in_pieces_is_read_whole(limited_service: str) -> None:
    """The body reaches the socket in pieces smaller than Gunicorn's 8 kB read, split mid-trip, with pauses
    between them: read through Gunicorn's length reader (`_declared_length_reader`), every trip is answered."""
    url = limited_service
    payload = json.dumps([{**TRIP, "trip_id": item} for item in range(250)]).encode()
    assert 60_000 < len(payload) < 100_000

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(payload), 7_001):
            time.sleep(0.01)
            yield payload[start : start + 7_001]

    status, body = parse_answer(raw_exchange(url, post_head(url, f"Content-Length: {len(payload)}"), pieces()))
    assert status == 200
    assert [prediction["trip_id"] for prediction in body["predictions"]] == list(range(250))


def test_gunicorn_bodies_of_a_declared_length_are_read_by_its_length_reader() -> None:
    """The fast read depends on Gunicorn's classes; a Gunicorn whose classes change falls back to `Body.read`,
    and this test says so. Any other stream reads itself."""
    payload = bytes(range(256)) * 80
    stream = Body(LengthReader(IterUnreader([payload[:5_000], payload[5_000:]]), len(payload)))
    reader = service_app._declared_length_reader(stream)
    assert reader is stream.reader
    assert reader.read(len(payload)) == payload
    assert stream.read(1) == b""  # the body is consumed, as `Body.read` leaves it
    other = io.BytesIO(payload)
    assert service_app._declared_length_reader(other) is other


# --- Graceful shutdown ------------------------------------------------------------------------------


def post_once(url: str, body: bytes) -> str:
    """One POST on a fresh connection: answered (a complete 200), refused (no connection), dropped (connected,
    then closed with no byte of answer: never accepted by a worker), or cut (an answer that stopped early)."""
    connection = http.client.HTTPConnection(*address(url), timeout=60)
    try:
        try:
            connection.connect()
        except ConnectionRefusedError:
            return "refused"
        try:
            connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            return "dropped"
        try:
            payload = response.read()
        except (http.client.IncompleteRead, ConnectionResetError):
            return "cut"
        if response.status != 200 or len(json.loads(payload)["predictions"]) != TRIPS_PER_REQUEST:
            return f"status {response.status}"
        return "answered"
    finally:
        connection.close()


TRIPS_PER_REQUEST = 10_000  # the most a request may hold


def test_sigterm_finishes_accepted_requests_then_refuses(
    settings: Settings, trained: subprocess.CompletedProcess, tmp_path: Path
) -> None:
    process, url = start_gunicorn(
        service_env(settings, GRACEFUL_TIMEOUT=str(GRACEFUL_TIMEOUT)), tmp_path / "gunicorn.log"
    )
    body = json.dumps([{**TRIP, "trip_id": index} for index in range(TRIPS_PER_REQUEST)]).encode()
    outcomes: list[tuple[float, float, str]] = []  # (sent, finished, outcome)
    stop_sending = threading.Event()
    deadline = time.monotonic() + 120  # a bound on the loop, not an assertion

    def client() -> None:
        while not stop_sending.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            outcome = post_once(url, body)
            outcomes.append((sent, time.monotonic(), outcome))
            if outcome == "refused":
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        while sum(outcome == "answered" for *_, outcome in outcomes) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        sigterm_at = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        exit_code = process.wait(timeout=GRACEFUL_TIMEOUT + 10)
        for thread in threads:
            thread.join(timeout=60)
        after_exit = post_once(url, body)
    finally:
        stop_sending.set()
        stop(process)

    # "dropped": connections still queued in the kernel's listen backlog when the workers exited are reset
    # before any byte of answer; no worker read them, so a client may retry them safely.
    counts = Counter(outcome for *_, outcome in outcomes)
    in_flight = [outcome for sent, finished, outcome in outcomes if sent < sigterm_at < finished]
    print(f"\nsent {len(outcomes)}, {dict(counts)}; in flight at SIGTERM: {Counter(in_flight)}; then: {after_exit}")
    assert exit_code == 0
    assert set(counts) <= {"answered", "refused", "dropped"}, counts  # nothing cut mid-answer, no error status
    assert "answered" in in_flight  # a request the worker held when SIGTERM came was finished
    assert counts["refused"] == len(threads)  # each client ended on a refused connection
    assert after_exit == "refused"
    # Workers write their request lines in batches: an exiting worker writes what it still holds first.
    lines = [json.loads(line) for line in (tmp_path / "gunicorn.log").read_text().splitlines() if line.strip()]
    logged = [line for line in lines if line["logger"] == "predict.requests" and line["endpoint"] == "/predict"]
    assert len(logged) == counts["answered"] and {line["status"] for line in logged} == {200}


# --- Admin reload -------------------------------------------------------------------------------------


def promote_copy_of_production(settings: Settings) -> str:
    """Register the Production version's model again as a new version and promote it (alias and stage)."""
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    current = production_version(client, settings.registered_model)
    # The artifacts' location, not the `models:/m-...` source: MLflow resolves that through its global tracking
    # URI, not this client's.
    location = client.get_model_version_download_uri(settings.registered_model, current.version)
    new = client.create_model_version(settings.registered_model, location, current.run_id)
    promotion.promote(client, settings.registered_model, new.version)
    return str(new.version)


def wait_for_both_workers(log_path: Path, swap_line: str) -> None:
    """Until both Gunicorn workers have logged `swap_line` (the one that answered a reload swaps at once, the
    other within a second or two); fails after a minute."""
    deadline = time.monotonic() + 60
    while log_path.read_text().count(swap_line) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log_path.read_text().count(swap_line) == 2


def served_versions(url: str, count: int) -> Counter:
    """The versions /health names over `count` fresh connections (each may reach either worker)."""
    return Counter(requests.get(f"{url}/health", timeout=10).json()["model"]["version"] for _ in range(count))


def test_admin_reload_moves_every_worker_to_the_promoted_version(own_registry: Settings, tmp_path: Path) -> None:
    log_path = tmp_path / "gunicorn.log"
    env = service_env(own_registry, ADMIN_TOKEN=ADMIN_TOKEN, MODEL_REFRESH_SECONDS="3600", WEB_CONCURRENCY="2")
    process, url = start_gunicorn(env, log_path)
    try:
        (old_version,) = served_versions(url, 10)
        new_version = promote_copy_of_production(own_registry)
        assert served_versions(url, 10) == Counter({old_version: 10})  # no periodic check will come

        assert requests.post(f"{url}/admin/reload", timeout=30).status_code == 401
        wrong = requests.post(f"{url}/admin/reload", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "UNAUTHENTICATED"

        answer = requests.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["reloaded"] is True and answer.json()["model"]["version"] == new_version

        # Both workers log their swap; then every fresh connection sees the new version.
        wait_for_both_workers(log_path, f"now serving {own_registry.registered_model} version {new_version}")
        assert served_versions(url, 20) == Counter({new_version: 20})
    finally:
        stop(process)
    assert ADMIN_TOKEN not in log_path.read_text()


def test_rollback_returns_production_and_the_answers_to_the_previous_version(
    own_registry: Settings, tmp_path: Path
) -> None:
    """Promote, roll back with the documented command, and the served version follows each move."""
    log_path = tmp_path / "gunicorn.log"
    env = service_env(own_registry, ADMIN_TOKEN=ADMIN_TOKEN, MODEL_REFRESH_SECONDS="3600")
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    process, url = start_gunicorn(env, log_path)
    try:
        (old_version,) = served_versions(url, 10)
        new_version = promote_copy_of_production(own_registry)
        assert requests.post(f"{url}/admin/reload", headers=bearer, timeout=60).status_code == 200
        wait_for_both_workers(log_path, f"now serving {own_registry.registered_model} version {new_version}")
        answers = [requests.post(f"{url}/predict", json=TRIP, timeout=10).json() for _ in range(20)]
        assert {answer["model"]["version"] for answer in answers} == {new_version}

        rollback = subprocess.run(
            [sys.executable, "train.py", "--rollback"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert rollback.returncode == 0, rollback.stderr[-2000:]
        assert f"rolled {own_registry.registered_model} back from version {new_version} to version {old_version}" in (
            rollback.stdout
        )
        client = MlflowClient(own_registry.tracking_uri, own_registry.tracking_uri)
        assert str(production_version(client, own_registry.registered_model).version) == old_version
        answer = requests.post(f"{url}/admin/reload", headers=bearer, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == old_version
        wait_for_both_workers(log_path, f"now serving {own_registry.registered_model} version {old_version} (was")
        answers = [requests.post(f"{url}/predict", json=TRIP, timeout=10).json() for _ in range(20)]
        assert {answer["model"]["version"] for answer in answers} == {old_version}

        again = subprocess.run(
            [sys.executable, "train.py", "--rollback"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 2 and "no 'previous' version to roll back to" in again.stderr
    finally:
        stop(process)
