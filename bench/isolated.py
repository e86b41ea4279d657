"""Run one benchmark row in a fresh Python process.

Peak memory is per process (the CUDA allocator's peak, or the resident-set peak on
CPU), so each row gets its own process and nothing leaks from one row to the next.
A benchmark script calls `run_row(__file__, spec)`; the child re-runs that script
with `--worker SPEC`, which `worker_flag` adds and `serve_row` answers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any, Callable, Union


def worker_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def serve_row(args: argparse.Namespace, measure: Callable[[dict], dict]) -> bool:
    """In the child: measure the row, print it as JSON, and return True (the parent returns False)."""
    if not args.worker:
        return False
    print(json.dumps(measure(json.loads(args.worker))))
    return True


def run_row(script: str, spec: dict[str, Any]) -> Union[dict[str, Any], str]:
    """The child's measurement, or the last line of its error output when it failed."""
    run = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if run.returncode != 0:
        return (run.stderr.strip().splitlines() or ["failed"])[-1][:80]
    return json.loads(run.stdout.strip().splitlines()[-1])
