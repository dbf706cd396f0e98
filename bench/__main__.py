"""Run benchmarks: ``python -m bench [NAME ...] [--quick] [--auth [--control]]``.

Prints a table per benchmark and the JSON of all results; each result is also written
to ``bench/out/<name>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any

from bench.common import machine, write_json

BENCHMARKS = ["echo", "deploy", "transfer", "flow", "scenarios",
              "api_nats", "api_http", "api_scale", "api_deploy", "api_stall", "sandbox",
              "envs", "auth", "capture", "monitor", "cluster",
              "autoscale", "natsperm"]
AUTH_COMPARED = ["echo", "api_http"]  # --auth: each measured with auth off and on


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier numbers")
    parser.add_argument("--auth", action="store_true",
                        help="measure each benchmark without auth and with auth on, "
                             f"interleaved, and compare (only {', '.join(AUTH_COMPARED)})")
    parser.add_argument("--control", action="store_true",
                        help="with --auth (echo only): both sides without auth, an A/A run "
                             "whose ratios show the measurement's own noise")
    args = parser.parse_args(argv)
    names = args.names or (AUTH_COMPARED if args.auth else BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if args.auth and (other := [n for n in names if n not in AUTH_COMPARED]):
        parser.error(f"--auth compares only {', '.join(AUTH_COMPARED)}, not {', '.join(other)}")
    if args.control and (not args.auth or names != ["echo"]):
        parser.error("--control goes with --auth and the echo benchmark alone")
    report: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "results": {}}
    ok = True
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        if args.control:
            result = module.run(quick=args.quick, auth=True, control=True)
        elif args.auth:
            result = module.run(quick=args.quick, auth=True)
        else:
            result = module.run(quick=args.quick)
        name = f"{name}_auth" + ("_control" if args.control else "") if args.auth else name
        report["results"][name] = result
        write_json(name, {"machine": report["machine"], "when": report["when"], **result})
        ok = ok and bool(result.get("pass", True))
    print("\n" + json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
