"""`mdsweep`: the single entry point. Each subcommand lives in its own module.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed args and returning an exit code. Modules
import their heavy dependencies (torch, Ray, Optuna, pyarrow, and the project
modules that load them) inside `func`, and everything else at the top, so
`mdsweep --help` and `mdsweep query` stay fast (tests/test_layering.py checks it).
"""
from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

COMMAND_MODULES: tuple[str, ...] = ("orchestrator.cli.train", "orchestrator.cli.data", "orchestrator.cli.run",
                                   "orchestrator.cli.query", "orchestrator.cli.export", "orchestrator.cli.predict",
                                   "orchestrator.cli.plan", "orchestrator.cli.report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdsweep",
        description="Fine-tune Moondream2 and sweep its settings with Ray Tune + Optuna; results land in Parquet.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)

