"""Where a single trip's time goes in the server, layer by layer: the service beside the no-op floor, each
layer timed where it runs, in alternating rounds.

    python bench/serve_layers.py [--rounds 3] [--seconds 5]     # needs wrk

bench/serve_steps.py takes the service's steps away one by one; this one times the layers both servers share
(Gunicorn around the app, Flask around the view) and the ones only the service has (the request recorder, the
/predict view's work), in the same requests. It starts on free loopback ports, under the service's Gunicorn
configuration, the service and the floor with their layers timed (bench/layer_apps.py), both serving one model
trained by train.py. Round after round, wrk drives each in turn with single trips at 1 client. It prints the
median time of each layer in each server (the medians of every 1,000 requests of a worker, then their median),
and the client's p50. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: real processes on free ports

from harness import run_train, start_gunicorn, stop  # noqa: E402
from serve import body_for, run_wrk, wrk_workspace  # noqa: E402

SERVERS = ("service", "floor")
# What each reported layer is, from the nested times bench/layer_apps.py takes (outer minus inner)
LAYER_NAMES = {
    "gunicorn": "Gunicorn around the app (environ, writing and closing the answer)",
    "recorder": "the request recorder around Flask",
    "flask": "Flask around the view (context, routing, finishing the response)",
    "view": "the /predict view (reading, validating, scoring, answering)",
    "server": "the whole request in the worker (Gunicorn's handle_request)",
}


def layers(line: dict[str, float]) -> dict[str, float]:
    """One report line's nested times as the layers between them, in microseconds."""
    return {
        "gunicorn": line["server"] - line["app"],
        "recorder": line["app"] - line["flask"],
        "flask": line["flask"] - line["view"],
        "view": line["view"],
        "server": line["server"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="of wrk per server and round")
    args = parser.parse_args()
    work, env = wrk_workspace("bench/serve_layers.py", "serve-layers-")
    processes = []
    p50_ms: dict[str, list[float]] = {server: [] for server in SERVERS}
    try:
        print("training the model to serve ...", flush=True)
        run_train(env, work)
        urls = {}
        for server in SERVERS:
            times_file = work / f"{server}-layers.jsonl"
            app = f"bench.layer_apps:app('{server}')"
            process, url = start_gunicorn(env | {"LAYER_TIMES_FILE": str(times_file)}, work / f"{server}.log", app=app)
            processes.append(process)
            urls[server] = f"{url}/predict"
        single = body_for("service", "single", 1)
        for round_number in range(1, args.rounds + 1):
            for server in SERVERS:
                p50_ms[server].append(run_wrk(urls[server], single, 1, args.seconds, work).p50_ms)
            print(f"round {round_number}: " + ", ".join(f"{s} {p50_ms[s][-1]:.3f} ms" for s in SERVERS), flush=True)
            time.sleep(0.5)
        reports = {
            server: [layers(json.loads(line)) for line in (work / f"{server}-layers.jsonl").read_text().splitlines()]
            for server in SERVERS
        }
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)

    medians = {
        server: {layer: statistics.median(report[layer] for report in lines) for layer in LAYER_NAMES}
        for server, lines in reports.items()
    }
    service, floor = medians["service"], medians["floor"]
    print(f"\n{'layer, median us':68} {'service':>8} {'floor':>8} {'more':>8}")
    for layer, name in LAYER_NAMES.items():
        print(f"{name:68} {service[layer]:>8.1f} {floor[layer]:>8.1f} {service[layer] - floor[layer]:>8.1f}")
    p50 = {server: statistics.median(values) for server, values in p50_ms.items()}
    print(f"{'the client p50 (wrk, 1 connection)':68} {p50['service'] * 1000:>8.1f} {p50['floor'] * 1000:>8.1f}")
    summary = {
        "layers_us": {
            server: {layer: round(value, 1) for layer, value in values.items()} for server, values in medians.items()
        },
        "single_c1_p50_ms": {server: round(value, 3) for server, value in p50.items()},
        "reports": {server: len(lines) for server, lines in reports.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
