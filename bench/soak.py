"""Load and fault scenarios against the service as production runs it: steady load, a killed worker, the
registry down, the S3 endpoint down, a corrupt cache.

    python bench/soak.py [--duration 60] [--clients 32] [--phase-seconds 15] [--model-dir PATH]

On free loopback ports it starts moto's S3 server, a real `mlflow server` (SQLite store, s3:// artifacts on
moto) holding a Production model (the MLflow model folder --model-dir, logged to a new run, registered and
promoted; without it, `train.py` trains one), and the service under gunicorn.conf.py (2 sync workers) with an
empty model cache, so it downloads from S3, and a 1 s refresh, so outages are noticed. Load comes from
separate processes, each client a thread posting the smoke-test trip on a fresh connection (as sync workers
serve them), counting answers, failures and latency. Then, each phase printing its numbers:

1. steady: --duration seconds at --clients; every worker's RSS (VmRSS) before and after, and sampled each
   second. Passes with no failed request and no worker more than MEMORY_BOUND_MB above its start. Gunicorn's
   max_requests replaces workers (about every 20,000 requests): one replaced is judged on its last sample,
   one started during the run against the largest RSS at the start.
2. kill: SIGKILL one worker mid-load. A sync worker holds one request at a time (the ones queued on the
   listening socket are the master's, and the other worker takes them), so at most 1 may fail. The master
   must start a replacement, and with the other workers paused (SIGSTOP) the replacement must answer.
3. S3 down: stop moto mid-load and promote a new version (same artifacts). The registry answers, the
   download fails: /predict keeps answering from the old version and /health reports the fetch error; once
   S3 is back (restarted on its port, its objects restored) every worker moves to the new version.
4. corrupt cache: stop the service, truncate the cached model file and leave a staging folder as a download
   cut short leaves it; the restarted service fetches the version again (removing that folder) and never
   loads the corrupt copy.
5. registry down: stop `mlflow server` mid-load. /predict keeps answering 200 from the loaded version,
   /health reports the registry unreachable, and the workers go on checking it (last, as a restart of
   `mlflow server` takes half a minute here; phase 3 shows the recovery from an outage).

The last line is one JSON object: each phase's numbers and checks, and "ok". Exits 1 unless every check
passed (the work folder with every log is then kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any
from urllib.parse import urlparse

import orjson
import requests
from mlflow.tracking import MlflowClient

from bikeshare_membership import promotion
from bikeshare_membership.config import Settings
from bikeshare_membership.model_files import MANIFEST, verify_cached
from bikeshare_membership.schema import EXAMPLE_TRIP as TRIP
from bikeshare_membership.storage import s3_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: real processes on free ports

from harness import (  # noqa: E402
    clean_env,
    free_port,
    run_train,
    start_gunicorn,
    start_mlflow_server,
    start_moto,
    stop,
    write_aws_profile,
)

MODEL = "bikeshare-soak"
BUCKET = "soak-models"
MEMORY_BOUND_MB = 25.0
HELD_PER_SYNC_WORKER = 1
REFRESH_SECONDS = 1
FETCH_TIMEOUT_SECONDS = 2
FETCH_RETRIES = 1
REQUEST_TIMEOUT_SECONDS = 10.0
# How long a fault may take to show in /health or a recovery to complete before the phase fails.
NOTICE_LIMIT_SECONDS = 30.0


# --- Load: processes of client threads, each request on a fresh connection ----------------------------


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # reason -> count
    failure_times: list[float] = field(default_factory=list)  # time.monotonic() of each failure
    versions: Counter[str] = field(default_factory=Counter)  # model version -> answers
    latencies_ms: list[float] = field(default_factory=list)
    ok_by_second: Counter[int] = field(default_factory=Counter)  # int(time.monotonic()) -> answers

    def merge(self, other: LoadResult) -> None:
        self.sent += other.sent
        self.ok += other.ok
        self.failed.update(other.failed)
        self.failure_times += other.failure_times
        self.versions.update(other.versions)
        self.latencies_ms += other.latencies_ms
        self.ok_by_second.update(other.ok_by_second)

    def summary(self, seconds: float) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)

        def percentile(share: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(share * len(latencies)))], 2) if latencies else None

        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": sum(self.failed.values()),
            "failure_reasons": dict(self.failed),
            "versions": dict(self.versions),
            "requests_per_s": round(self.sent / seconds, 1),
            "p50_ms": percentile(0.50),
            "p99_ms": percentile(0.99),
        }


class BadAnswer(Exception):
    """An answer that is not a prediction: a status other than 200, or nothing at all."""


def post_trip(host: str, port: int, request: bytes) -> str:
    """POST the trip on a new connection and read to the end; the answering model version, or raise."""
    with socket.create_connection((host, port), timeout=REQUEST_TIMEOUT_SECONDS) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head:
        raise BadAnswer("closed without an answer")
    status = head[9:12].decode()
    if status != "200":
        raise BadAnswer(f"HTTP {status}")
    return orjson.loads(body)["model"]["version"]


def client_thread(host: str, port: int, deadline: float, result: LoadResult) -> None:
    body = orjson.dumps(TRIP)
    request = (
        f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    while time.monotonic() < deadline:
        started = time.monotonic()
        result.sent += 1
        try:
            version = post_trip(host, port, request)
        except (OSError, ValueError, KeyError, BadAnswer) as error:
            result.failed[str(error) if isinstance(error, BadAnswer) else type(error).__name__] += 1
            result.failure_times.append(time.monotonic())
            time.sleep(0.01)  # a refused connection returns at once: do not spin
            continue
        result.latencies_ms.append((time.monotonic() - started) * 1000)
        result.ok += 1
        result.ok_by_second[int(time.monotonic())] += 1
        result.versions[version] += 1


def load_process(host: str, port: int, threads: int, deadline: float, queue: Any) -> None:
    results = [LoadResult() for _ in range(threads)]
    clients = [threading.Thread(target=client_thread, args=(host, port, deadline, part)) for part in results]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    total = LoadResult()
    for part in results:
        total.merge(part)
    queue.put(total)


class Load:
    """`clients` clients spread over `processes` processes, posting until `seconds` have passed."""

    def __init__(self, url: str, clients: int, seconds: float, processes: int) -> None:
        context = multiprocessing.get_context("fork")  # the parent's imports are reused: no start-up cost
        parsed = urlparse(url)
        self.deadline = time.monotonic() + seconds
        self.queue = context.Queue()
        shares = [clients // processes + (index < clients % processes) for index in range(processes)]
        self.processes = [
            context.Process(
                target=load_process,
                args=(parsed.hostname, parsed.port, share, self.deadline, self.queue),
                daemon=True,  # ended with the soak, even if a phase fails before reading their results
            )
            for share in shares
            if share
        ]
        for process in self.processes:
            process.start()

    def result(self) -> LoadResult:
        total = LoadResult()
        for _ in self.processes:
            wait = self.deadline - time.monotonic() + REQUEST_TIMEOUT_SECONDS + 30
            total.merge(self.queue.get(timeout=max(wait, 1)))
        for process in self.processes:
            process.join()
        return total


# --- The service's processes ------------------------------------------------------------------------


def worker_pids(master: int) -> list[int]:
    """The children of the Gunicorn master: its workers."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == master:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kilobytes = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return round(int(kilobytes) / 1024, 1)


def memory(master: int) -> dict[int, float]:
    return {pid: rss for pid in worker_pids(master) if (rss := rss_mb(pid)) is not None}


def wait_until(condition: Callable[[], Any], limit: float, every: float = 0.1) -> float | None:
    """Seconds until `condition()` is true, or None if it was not within `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if condition():
            return round(time.monotonic() - started, 2)
        time.sleep(every)
    return None


class HealthWatch:
    """Polls GET /health in a thread, keeping what each answer said, to see faults show and clear."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(requests.RequestException, ValueError):
                self.answers.append((time.monotonic(), requests.get(f"{self.url}/health", timeout=5).json()))
            self._stop.wait(0.25)

    def first(self, condition: Callable[[dict[str, Any]], bool], since: float) -> dict[str, Any] | None:
        """The first answer since `since` that meets `condition`."""
        return next((answer for at, answer in list(self.answers) if at >= since and condition(answer)), None)

    def seconds_to(self, condition: Callable[[dict[str, Any]], bool], since: float) -> float | None:
        """Seconds from `since` to the first answer that meets `condition`."""
        return next(
            (round(at - since, 2) for at, answer in list(self.answers) if at >= since and condition(answer)), None
        )

    def settled(self, condition: Callable[[dict[str, Any]], bool], since: float, count: int = 8) -> bool:
        """Whether the last `count` answers since `since` all meet `condition` (answers come from any worker,
        so 8 in a row means every worker says so, but for a chance of 1 in 128 with two)."""
        recent = [answer for at, answer in list(self.answers) if at >= since][-count:]
        return len(recent) == count and all(condition(answer) for answer in recent)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Stack:
    """Everything the soak starts; S3 on a port fixed at the start, to restart it in place."""

    work: Path
    s3_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)  # the service's environment
    moto: Popen | None = None
    mlflow: Popen | None = None
    service: Popen | None = None
    url: str = ""
    service_log: Path | None = None
    starts: int = 0

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.env["MLFLOW_TRACKING_URI"], self.env["MLFLOW_TRACKING_URI"])

    def start(self, model_dir: Path | None) -> None:
        """S3 with a bucket, the registry with a Production model, then the service with an empty cache."""
        base_env = clean_env()
        profile = write_aws_profile(self.work)
        s3_url = f"http://127.0.0.1:{self.s3_port}"
        self.env = {
            **base_env,
            **profile,
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # the server's job runner: unused, and slows its start
            "MLFLOW_EXP_NAME": "soak",
            "MLFLOW_REGISTERED_MODEL": MODEL,
            "MODEL_CACHE_DIR": str(self.work / "cache"),
            "MODEL_REFRESH_SECONDS": str(REFRESH_SECONDS),
            "MODEL_FETCH_TIMEOUT": str(FETCH_TIMEOUT_SECONDS),
            "MODEL_FETCH_RETRIES": str(FETCH_RETRIES),
        }
        os.environ.update(profile | {"MLFLOW_S3_ENDPOINT_URL": s3_url})  # this process's own S3 and MLflow clients
        started = time.monotonic()
        self.start_moto()
        s3_client(Settings()).create_bucket(Bucket=BUCKET)
        print(f"moto S3 server up in {time.monotonic() - started:.1f} s", flush=True)
        started = time.monotonic()
        self.mlflow, self.env["MLFLOW_TRACKING_URI"] = start_mlflow_server(
            self.work / "mlflow.db", f"s3://{BUCKET}/mlflow", self.env, self.work / "mlflow.log"
        )
        print(f"mlflow server up in {time.monotonic() - started:.1f} s", flush=True)
        started = time.monotonic()
        if model_dir:
            version = register_model_dir(self.client, model_dir, self.work)
            print(f"registered {model_dir} as {MODEL} version {version} (Production)", end=" ", flush=True)
        else:
            print("no --model-dir: training a model through the tracking server ...", end=" ", flush=True)
            run_train(self.env, self.work)
        print(f"in {time.monotonic() - started:.1f} s", flush=True)
        started = time.monotonic()
        self.start_service()
        print(f"service up in {time.monotonic() - started:.1f} s (empty cache: registry + S3)", flush=True)

    def start_service(self) -> None:
        self.starts += 1
        self.service_log = self.work / f"gunicorn-{self.starts}.log"
        self.service, self.url = start_gunicorn(self.env, self.service_log)

    def start_moto(self) -> None:
        self.moto, _ = start_moto(self.work / "moto.log", port=self.s3_port)

    def stop_all(self) -> None:
        for process in (self.service, self.mlflow, self.moto):
            if process is not None:
                stop(process)

    def log_text(self) -> str:
        return self.service_log.read_text() if self.service_log else ""


def register_model_dir(client: MlflowClient, model_dir: Path, work: Path) -> str:
    """What train.py leaves in the registry, without training: `model_dir` logged to a new run, registered,
    promoted (stage and alias). Returns the version."""
    staged = work / "model-dir"
    shutil.copytree(model_dir, staged, ignore=shutil.ignore_patterns(MANIFEST))
    run = client.create_run(client.create_experiment("soak"))
    client.log_artifacts(run.info.run_id, str(staged), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(MODEL)
    version = client.create_model_version(
        MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, await_creation_for=0
    ).version
    promotion.promote(client, MODEL, version)
    return str(version)


# --- Phases ------------------------------------------------------------------------------------------


def steady(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    assert stack.service is not None
    master = stack.service.pid
    warmup = Load(stack.url, args.clients, 2, args.load_processes).result()
    before = memory(master)
    last_seen: dict[int, float] = {}  # pid -> its RSS when last sampled: a worker max_requests replaces is gone after
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            last_seen.update(memory(master))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = Load(stack.url, args.clients, args.duration, args.load_processes).result()
    done.set()
    sampler.join()
    after = memory(master)
    recycled = sorted(pid for pid in set(before) | set(last_seen) if pid not in after)
    # Each worker against its own start, or one that started during the run against the largest start.
    final = last_seen | after
    growth = {pid: round(rss - before.get(pid, max(before.values())), 1) for pid, rss in final.items()}
    numbers = {
        **result.summary(args.duration),
        "seconds": args.duration,
        "clients": args.clients,
        "workers": len(before),
        "warmup_failed": sum(warmup.failed.values()),
        "rss_mb_before": {str(pid): rss for pid, rss in before.items()},
        "rss_mb_after": {str(pid): rss for pid, rss in after.items()},
        "growth_mb": {str(pid): value for pid, value in growth.items()},
        "rss_mb_last_seen_of_recycled": {str(pid): last_seen[pid] for pid in recycled if pid in last_seen},
        "workers_recycled": [str(pid) for pid in recycled],
        "memory_bound_mb": MEMORY_BOUND_MB,
    }
    numbers["checks"] = {
        "no_errors": numbers["failed"] == 0 and numbers["warmup_failed"] == 0,
        "memory_within_bound": bool(growth) and max(growth.values()) <= MEMORY_BOUND_MB,
        "workers_all_there": len(after) == len(before),
    }
    print(
        f"steady: {args.duration:g} s at {args.clients} clients: {numbers['sent']:,} sent, {numbers['failed']} failed "
        f"{numbers['failure_reasons'] or ''}, {numbers['requests_per_s']:,} req/s, p50 {numbers['p50_ms']} ms, "
        f"p99 {numbers['p99_ms']} ms; worker RSS before {fmt_rss(before)}, after {fmt_rss(after)}; replaced by "
        f"max_requests: {numbers['workers_recycled'] or 'none'}, last seen at "
        f"{numbers['rss_mb_last_seen_of_recycled'] or '-'}; growth {numbers['growth_mb']} MB (bound "
        f"{MEMORY_BOUND_MB:g})",
        flush=True,
    )
    return numbers


def fmt_rss(rss: dict[int, float]) -> str:
    return ", ".join(f"{pid}={value} MB" for pid, value in rss.items())


def answered_by_replacement(url: str, master: int, replacement: int, attempts: int = 20) -> int:
    """With every other worker paused (SIGSTOP), how many of `attempts` POST /predict get a 200: the
    replacement alone can answer them."""
    others = [pid for pid in worker_pids(master) if pid != replacement]
    for pid in others:
        with contextlib.suppress(ProcessLookupError):  # a worker that max_requests just recycled
            os.kill(pid, signal.SIGSTOP)
    answered = 0
    try:
        for _ in range(attempts):
            with contextlib.suppress(requests.RequestException):
                answered += requests.post(f"{url}/predict", json=TRIP, timeout=5).status_code == 200
    finally:
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    return answered


def kill_a_worker(master: int) -> tuple[list[int], int]:
    """SIGKILL one worker; the workers before, and the one killed. A worker that exits on its own (recycled
    by max_requests) between the listing and the signal is not a kill: list again."""
    for _ in range(5):
        before = worker_pids(master)
        try:
            os.kill(before[0], signal.SIGKILL)
        except ProcessLookupError:
            time.sleep(0.1)
            continue
        return before, before[0]
    raise RuntimeError("no worker could be killed: each exited before the signal")


def kill_worker(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    assert stack.service is not None
    master = stack.service.pid
    load = Load(stack.url, args.clients, args.phase_seconds, args.load_processes)
    time.sleep(args.phase_seconds / 3)
    before, victim = kill_a_worker(master)
    killed_at = time.monotonic()
    replaced_after = wait_until(
        lambda: victim not in (now := worker_pids(master)) and len(now) == len(before), NOTICE_LIMIT_SECONDS, 0.02
    )
    result = load.result()
    after = worker_pids(master)
    replacements = sorted(set(after) - set(before))
    answered = answered_by_replacement(stack.url, master, replacements[0]) if replacements else 0
    numbers = {
        **result.summary(args.phase_seconds),
        "killed_pid": victim,
        "replacement_pids": replacements,
        "replaced_after_s": replaced_after,
        "failures_at_s_from_kill": sorted(round(at - killed_at, 2) for at in result.failure_times),
        "answered_after_kill": sum(count for second, count in result.ok_by_second.items() if second > killed_at),
        "held_by_killed_worker": HELD_PER_SYNC_WORKER,
        "replacement_answered": f"{answered}/20",
    }
    numbers["checks"] = {
        "failed_at_most_held": numbers["failed"] <= HELD_PER_SYNC_WORKER,
        "worker_replaced": replaced_after is not None,
        "replacement_answers": answered == 20,
        "load_continued": numbers["answered_after_kill"] > 0,
    }
    print(
        f"kill: SIGKILL worker {victim} at {args.phase_seconds / 3:.1f} s of {args.phase_seconds:g} s at "
        f"{args.clients} clients: {numbers['sent']:,} sent, {numbers['failed']} failed "
        f"{numbers['failure_reasons'] or ''} (at most {HELD_PER_SYNC_WORKER}: what a sync worker holds), "
        f"{numbers['answered_after_kill']:,} answered after the kill; replaced by {replacements} after "
        f"{replaced_after} s, which answered {answered}/20 with the other workers paused",
        flush=True,
    )
    return numbers


def served_version(url: str) -> str:
    return requests.get(f"{url}/health", timeout=10).json()["model"]["version"]


def predicted_versions(url: str, count: int = 20) -> Counter[str]:
    """The model versions that answered `count` predictions (each a new connection, so either worker)."""
    return Counter(
        requests.post(f"{url}/predict", json=TRIP, timeout=5).json()["model"]["version"] for _ in range(count)
    )


def stopped_under_load(
    stack: Stack, args: argparse.Namespace, process: Popen | None
) -> tuple[Load, HealthWatch, float]:
    """An outage phase's start: load and a /health watch running, then `process` stopped a quarter into the
    phase. Returns the load, the watch and when the stop began."""
    assert process is not None, "the stack's processes run during every phase"
    load = Load(stack.url, args.clients, args.phase_seconds, args.load_processes)
    watch = HealthWatch(stack.url)
    time.sleep(args.phase_seconds / 4)
    stopped_at = time.monotonic()
    stop(process)
    return load, watch, stopped_at


def registry_outage(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    version = served_version(stack.url)
    load, watch, stopped_at = stopped_under_load(stack, args, stack.mlflow)
    stop_s = round(time.monotonic() - stopped_at, 2)
    unreachable = wait_until(lambda: watch.settled(registry_unreachable, stopped_at), NOTICE_LIMIT_SECONDS)
    result = load.result()
    watch.stop()
    reported = watch.first(registry_unreachable, stopped_at)
    # The refresh threads live on through the outage: each check stamps checked_at anew.
    checks = {answer["registry"]["checked_at"] for at, answer in watch.answers if at >= stopped_at}
    numbers = {
        **result.summary(args.phase_seconds),
        "served_version": version,
        "mlflow_server_exit_s": stop_s,
        "health_unreachable_after_s": watch.seconds_to(registry_unreachable, stopped_at),
        "health_error": reported["registry"]["error"] if reported else None,
        "registry_checks_during_outage": len(checks),
    }
    numbers["checks"] = {
        "predict_all_200": numbers["failed"] == 0 and set(numbers["versions"]) == {version},
        "health_unreachable_observed": unreachable is not None,
        "refresh_goes_on": len(checks) >= 2,
    }
    print(
        f"registry down: mlflow server stopped at {args.phase_seconds / 4:.1f} s of {args.phase_seconds:g} s at "
        f"{args.clients} clients: {numbers['sent']:,} sent, {numbers['failed']} failed "
        f"{numbers['failure_reasons'] or ''}, answers by version {numbers['versions']}; /health unreachable after "
        f"{numbers['health_unreachable_after_s']} s ({numbers['health_error']}); {len(checks)} registry checks "
        "stamped in /health during the outage",
        flush=True,
    )
    return numbers


def registry_unreachable(health: dict[str, Any]) -> bool:
    return health["registry"]["reachable"] is False


def bucket_keys(client: Any) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [entry["Key"] for page in pages for entry in page.get("Contents", [])]


def s3_outage(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """moto keeps its objects in memory: they are copied out before it stops and put back after it restarts."""
    snapshot = stack.work / "s3-snapshot"
    bucket = s3_client(Settings())
    keys = bucket_keys(bucket)
    for key in keys:
        (snapshot / key).parent.mkdir(parents=True, exist_ok=True)
        bucket.download_file(BUCKET, key, str(snapshot / key))
    old = served_version(stack.url)
    load, watch, stopped_at = stopped_under_load(stack, args, stack.moto)
    registry = stack.client
    source, run_id = registry.get_model_version_download_uri(MODEL, old), registry.get_model_version(MODEL, old).run_id
    new = str(registry.create_model_version(MODEL, source, run_id=run_id, await_creation_for=0).version)
    promotion.promote(registry, MODEL, new)
    promoted_at = time.monotonic()
    tried = wait_until(lambda: f"failed to load version {new}" in stack.log_text(), NOTICE_LIMIT_SECONDS)
    result = load.result()
    stack.start_moto()
    s3_client.cache_clear()  # a new client: the old one's connections went with the old server
    bucket = s3_client(Settings())
    bucket.create_bucket(Bucket=BUCKET)
    for key in keys:
        bucket.upload_file(str(snapshot / key), BUCKET, key)
    restored_at = time.monotonic()
    moved = wait_until(lambda: watch.settled(lambda health: health["model"]["version"] == new, restored_at), 60)
    watch.stop()
    after = predicted_versions(stack.url)
    during = [answer for at, answer in watch.answers if promoted_at <= at < restored_at]
    reported = watch.first(registry_unreachable, stopped_at)
    log = stack.log_text()
    numbers = {
        **result.summary(args.phase_seconds),
        "old_version": old,
        "promoted_version": new,
        "reload_failures_logged": log.count(f"failed to load version {new}"),
        "health_during_outage": dict(
            Counter(f"version {a['model']['version']}, reachable {a['registry']['reachable']}" for a in during)
        ),
        "health_error": reported["registry"]["error"] if reported else None,
        "moved_after_restore_s": moved,
        "versions_after_restore": dict(after),
        "downloads_of_new_version": log.count(f"fetched model {MODEL} version {new}"),
    }
    numbers["checks"] = {
        "predict_all_200_from_old": numbers["failed"] == 0 and set(numbers["versions"]) == {old},
        "reload_failure_logged": tried is not None,
        "health_unreachable_observed": reported is not None,
        "new_version_after_restore": moved is not None and set(after) == {new},
    }
    print(
        f"S3 down: moto stopped at {args.phase_seconds / 4:.1f} s of {args.phase_seconds:g} s at {args.clients} "
        f"clients and version {new} promoted: {numbers['sent']:,} sent, {numbers['failed']} failed "
        f"{numbers['failure_reasons'] or ''}, answers by version {numbers['versions']}; reload failures logged "
        f"{numbers['reload_failures_logged']}; /health during the outage {numbers['health_during_outage']} "
        f"({numbers['health_error']}); all on version {new} {moved} s after S3 came back, downloaded "
        f"{numbers['downloads_of_new_version']} time(s)",
        flush=True,
    )
    return numbers


def corrupt_cache(stack: Stack) -> dict[str, Any]:
    assert stack.service is not None
    version = served_version(stack.url)
    stop(stack.service)
    cache = Path(stack.env["MODEL_CACHE_DIR"]) / MODEL
    directory = cache / version
    model_file = next(path for path in directory.iterdir() if path.suffix in (".skops", ".pkl"))
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    staging = cache / f".{version}-interrupted" / "model"  # what a download killed before its rename leaves
    staging.mkdir(parents=True)
    (staging / model_file.name).write_bytes(model_file.read_bytes()[:1000])
    stack.start_service()
    health = requests.get(f"{stack.url}/health", timeout=10).json()
    answers = predicted_versions(stack.url)
    log = stack.log_text()
    try:
        verify_cached(directory)
        intact = True
    except ValueError:
        intact = False
    numbers = {
        "version": version,
        "corrupted": str(model_file.relative_to(cache)),
        "origin": health["model"]["origin"],
        "corruption_logged": "incomplete or corrupt" in log,
        "fetched_again": log.count(f"fetched model {MODEL} version {version}"),
        "loaded_from_cache": log.count(f"loaded model {MODEL} version {version} (cache"),
        "cache_intact_after": intact,
        "answers": dict(answers),
        "staging_removed": not staging.parent.exists(),
    }
    numbers["checks"] = {
        "refetched": numbers["origin"] == "downloaded"
        and numbers["corruption_logged"]
        and numbers["fetched_again"] >= 1,
        "corrupt_never_loaded": numbers["loaded_from_cache"] == 0 and intact,
        "predict_answers": set(answers) == {version},
        "staging_removed": numbers["staging_removed"],
    }
    print(
        f"corrupt cache: truncated {numbers['corrupted']}, left a partial staging folder, restarted: origin "
        f"{numbers['origin']}, fetched again {numbers['fetched_again']}x, loaded from the corrupt cache "
        f"{numbers['loaded_from_cache']}x, cache intact after: {intact}, answers {dict(answers)}, interrupted "
        f"staging folder removed: {numbers['staging_removed']}",
        flush=True,
    )
    return numbers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of steady load (default 60)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--phase-seconds", type=float, default=15, help="seconds of load in each fault phase")
    parser.add_argument("--model-dir", type=Path, help="an MLflow model folder to register (default: train one)")
    parser.add_argument("--load-processes", type=int, default=4, help="processes the clients are spread over")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # still stop what was started
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    results: dict[str, Any] = {}
    wall_s: dict[str, float] = {}
    error = None
    stack = Stack(work)
    try:
        started = time.monotonic()
        stack.start(args.model_dir)
        wall_s = {"setup": round(time.monotonic() - started, 1)}
        phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("steady", lambda: steady(stack, args)),
            ("kill", lambda: kill_worker(stack, args)),
            ("s3_outage", lambda: s3_outage(stack, args)),
            ("corrupt_cache", lambda: corrupt_cache(stack)),
            ("registry_outage", lambda: registry_outage(stack, args)),  # last: mlflow server takes long to restart
        ]
        for name, run in phases:
            started = time.monotonic()
            results[name] = run()
            wall_s[name] = round(time.monotonic() - started, 1)
        print(f"wall-clock seconds: {wall_s}", flush=True)
    except Exception as exception:  # report what ran, and keep the logs, whatever went wrong
        traceback.print_exc()
        error = f"{type(exception).__name__}: {exception}"
    finally:
        stack.stop_all()
    failed_checks = [
        f"{name}.{check}" for name, phase in results.items() for check, passed in phase["checks"].items() if not passed
    ]
    ok = error is None and not failed_checks
    settings = {
        "workers": results.get("steady", {}).get("workers"),
        "refresh_seconds": REFRESH_SECONDS,
        "fetch_timeout_seconds": FETCH_TIMEOUT_SECONDS,
        "fetch_retries": FETCH_RETRIES,
        "load_processes": args.load_processes,
    }
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"failed checks: {failed_checks}, error: {error}; logs kept in {work}", flush=True)
    print(
        json.dumps(
            {
                "ok": ok,
                "failed_checks": failed_checks,
                "error": error,
                "settings": settings,
                "wall_s": wall_s,
                **results,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
