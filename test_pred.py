"""Smoke test for a running service: posts a real 2017 trip to /predict and prints the answer.

    python test_pred.py [HOST] [--port N]

Exits non-zero if the service does not answer with a membership and a proba.
"""

import argparse
import json
import sys

import requests

from bikeshare_membership.config import DEFAULT_PORT
from bikeshare_membership.schema import EXAMPLE_TRIP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host", nargs="?", default="localhost")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the service's port (default {DEFAULT_PORT})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = f"http://{args.host}:{args.port}/predict"
    try:
        response = requests.post(url, json=EXAMPLE_TRIP, timeout=args.timeout)
        answer = response.json()
    except (requests.RequestException, ValueError) as error:
        print(f"FAILED: {url}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    if response.status_code != 200 or answer.get("membership") not in ("Member", "Casual") or "proba" not in answer:
        print(f"FAILED: {url} answered {response.status_code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
