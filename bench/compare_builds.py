"""Single-trip latency of several builds side by side at 1 client, in alternating rounds, beside the HTTP floor.

    python bench/compare_builds.py HEAD~3 HEAD .   [--rounds 6] [--seconds 4]     # needs wrk

A build is a git revision (checked out into a temporary worktree) or a folder (`.` is the working tree with
its uncommitted changes). This machine's latency drifts by tens of microseconds from one minute to the next,
more than many changes are worth, so one bench/serve.py run per build cannot compare them. This starts every
build at once under its own production Gunicorn configuration, all serving one model trained by this
checkout's train.py, plus the no-op floor (bench/noop_app.py), and drives them with wrk in turn, round after
round. It prints each one's p50 per round, the median p50 and p99, and the median p50 over the floor's. The
last line is one JSON object. Builds must load the model this checkout trains.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: real processes on free ports

from harness import run_train, start_gunicorn, stop  # noqa: E402
from serve import FLOOR_APP, body_for, run_wrk, wrk_workspace  # noqa: E402

FLOOR = "floor"


def checkout(build: str, work: Path) -> Path:
    """The folder of a build: the folder itself, or a new worktree of the revision."""
    if Path(build).is_dir():
        return Path(build).resolve()
    folder = work / f"build-{len(list(work.glob('build-*')))}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), build], check=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", help="git revisions or folders")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=4, help="of wrk per build and round")
    args = parser.parse_args()
    work, env = wrk_workspace("bench/compare_builds.py", "compare-builds-")
    worktrees: list[Path] = []
    processes = []
    try:
        folders = {build: checkout(build, work) for build in args.builds}
        worktrees = [folder for folder in folders.values() if folder.is_relative_to(work)]
        print("training the model to serve ...", flush=True)
        run_train(env, work)
        urls = {}
        for index, (build, folder) in enumerate([*folders.items(), (FLOOR, ROOT)]):
            build_env = env | {"MODEL_CACHE_DIR": str(work / f"cache-{index}")}
            app = FLOOR_APP if build == FLOOR else gunicorn_app(folder)
            process, url = start_gunicorn(build_env, work / f"gunicorn-{index}.log", root=folder, app=app)
            processes.append(process)
            urls[build] = f"{url}/predict"
        p50s: dict[str, list[float]] = {build: [] for build in urls}
        p99s: dict[str, list[float]] = {build: [] for build in urls}
        for round_number in range(1, args.rounds + 1):
            for build, url in urls.items():
                result = run_wrk(url, body_for("service", "single", 1), 1, args.seconds, work)
                if result.errors:
                    sys.exit(f"{build} answered {result.errors} requests with errors: see {work}")
                p50s[build].append(result.p50_ms * 1000)
                p99s[build].append(result.p99_ms * 1000)
            print(f"round {round_number}: " + ", ".join(f"{b} {p50s[b][-1]:.0f} us" for b in urls), flush=True)
    finally:
        for process in processes:
            stop(process)
        for folder in worktrees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    floor = statistics.median(p50s[FLOOR])
    summary = {}
    for build in urls:
        p50, p99 = statistics.median(p50s[build]), statistics.median(p99s[build])
        rounds = " ".join(f"{value:.0f}" for value in sorted(p50s[build]))
        print(f"{build:>20}: p50 {p50:6.0f} us (rounds: {rounds}), p99 {p99:6.0f} us, {p50 / floor:.2f}x the floor")
        summary[build] = {"p50_us": round(p50), "p99_us": round(p99), "p50_vs_floor": round(p50 / floor, 2)}
    print(json.dumps(summary))
    return 0


def gunicorn_app(folder: Path) -> str | None:
    """What Gunicorn serves for a build: the app factory its gunicorn.conf.py names (`wsgi_app`), or, in builds
    from before the package layout, the module attribute `predict:app`."""
    return None if "wsgi_app" in (folder / "gunicorn.conf.py").read_text() else "predict:app"


if __name__ == "__main__":
    sys.exit(main())
