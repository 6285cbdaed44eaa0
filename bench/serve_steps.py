"""Where a request's time goes in the server: the service with its steps taken away one after another, side by
side, in alternating rounds.

    python bench/serve_steps.py [--rounds 3] [--seconds 5]     # needs wrk

A step's cost in a warm loop is not its cost in the server, where each request finds the caches cold, so this
measures each step where it runs. It starts, on free loopback ports and under the service's Gunicorn
configuration, the service and its variants (bench/step_apps.py: without the recorder, then without the model,
then without validation) and the no-op floor (bench/noop_app.py), all serving one model trained by train.py.
Round after round, wrk drives each in turn: single trips at 1 client (p50) and lists of 100 trips at 8 clients
(trips/s, and the Gunicorn workers' CPU time per list, read from /proc). A step's cost is the difference between
the variant with it and the one without; with fewer than 3 rounds a small step's difference can come out
negative on a noisy machine. The last line is one JSON object of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: real processes on free ports

from harness import run_train, start_gunicorn, stop  # noqa: E402
from serve import FLOOR_APP, body_for, run_wrk, wrk_workspace  # noqa: E402
from step_apps import STEPS  # noqa: E402

SERVERS = (*STEPS, "floor")
STEP_NAMES = {  # the step each server has and the next one lacks
    "service": "recorder",
    "no_recorder": "model",
    "no_model": "validation and answers",
    "no_validation": "decoding and the app",
}


def cpu_seconds(master: int) -> float:
    """CPU time of a Gunicorn master's workers so far: the live ones', and the exited ones' it has reaped."""
    ticks = os.sysconf("SC_CLK_TCK")

    def stat(pid: int) -> list[str]:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()

    reaped = sum(int(value) for value in stat(master)[13:15])
    with open(f"/proc/{master}/task/{master}/children") as file:
        children = [int(pid) for pid in file.read().split()]
    live = 0
    for pid in children:
        with contextlib.suppress(FileNotFoundError):  # exited meanwhile (max_requests): its time moves to `reaped`
            live += sum(int(value) for value in stat(pid)[11:13])
    return (reaped + live) / ticks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="of wrk per server, scenario and round")
    args = parser.parse_args()
    work, env = wrk_workspace("bench/serve_steps.py", "serve-steps-")
    processes = []
    p50_ms: dict[str, list[float]] = {server: [] for server in SERVERS}
    trips_per_s: dict[str, list[float]] = {server: [] for server in SERVERS}
    cpu_ms_per_list: dict[str, list[float]] = {server: [] for server in SERVERS}
    try:
        print("training the model to serve ...", flush=True)
        run_train(env, work)
        urls, masters = {}, {}
        for server in SERVERS:
            app = FLOOR_APP if server == "floor" else f"bench.step_apps:app('{server}')"
            process, url = start_gunicorn(env, work / f"{server}.log", app=app)
            processes.append(process)
            urls[server], masters[server] = f"{url}/predict", process.pid
        single, lists = body_for("service", "single", 1), body_for("service", "batch100", 100)
        for round_number in range(1, args.rounds + 1):
            for server in SERVERS:
                p50_ms[server].append(run_wrk(urls[server], single, 1, args.seconds, work).p50_ms)
                before = cpu_seconds(masters[server])
                result = run_wrk(urls[server], lists, 8, args.seconds, work)
                spent = cpu_seconds(masters[server]) - before
                trips_per_s[server].append(result.requests_per_s * 100)
                cpu_ms_per_list[server].append(spent * 1000 / (result.requests_per_s * args.seconds))
            print(f"round {round_number}: " + ", ".join(f"{s} {p50_ms[s][-1]:.3f} ms" for s in SERVERS), flush=True)
            time.sleep(0.5)
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)

    p50 = {server: statistics.median(values) for server, values in p50_ms.items()}
    rate = {server: statistics.median(values) for server, values in trips_per_s.items()}
    cpu = {server: statistics.median(values) for server, values in cpu_ms_per_list.items()}
    print(f"\n{'server':14} {'single p50 ms':>13} {'100-lists trips/s':>17} {'worker CPU ms/list':>18}")
    for server in SERVERS:
        print(f"{server:14} {p50[server]:>13.3f} {rate[server]:>17.0f} {cpu[server]:>18.3f}")
    print(f"\n{'step':24} {'single p50 us':>13} {'worker CPU us/list':>18}")
    steps = {}
    for server, lower in itertools.pairwise(SERVERS):
        steps[STEP_NAMES[server]] = {
            "single_p50_us": round((p50[server] - p50[lower]) * 1000),
            "list100_cpu_us": round((cpu[server] - cpu[lower]) * 1000),
        }
        print(
            f"{STEP_NAMES[server]:24} {steps[STEP_NAMES[server]]['single_p50_us']:>13} "
            f"{steps[STEP_NAMES[server]]['list100_cpu_us']:>18}"
        )
    summary = {
        "single_c1_p50_ms": {server: round(value, 3) for server, value in p50.items()},
        "batch100_c8_trips_per_s": {server: round(value) for server, value in rate.items()},
        "batch100_worker_cpu_ms_per_list": {server: round(value, 3) for server, value in cpu.items()},
        "steps": steps,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
