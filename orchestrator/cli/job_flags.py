"""Command-line flags generated from `JobConfig`, so every job setting has one flag and one help text.

`mdsweep train` exposes all of them; `mdsweep run` exposes them as the settings
shared by every trial of a sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Optional

from trainer.job_config import JobConfig, field_types


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(name: str) -> tuple[Any, tuple[str, ...] | None]:
    """(converter, choices) for a JobConfig field, from the contract's one reading of its annotation."""
    base, _optional = field_types()[name]
    if typing.get_origin(base) is typing.Literal:
        return str, typing.get_args(base)
    return base, None


def add_job_arguments(parser: argparse.ArgumentParser | Any, *, include: Optional[Iterable[str]] = None) -> None:
    """One flag per JobConfig field (or per `include`d field); defaults stay None so only given flags override."""
    wanted = None if include is None else set(include)
    for f in dataclasses.fields(JobConfig):
        if wanted is not None and f.name not in wanted:
            continue
        convert, choices = _kind(f.name)
        help_text = f.metadata["help"]
        if f.default not in (None, "") and "default" not in help_text:
            help_text += f" (default: {f.default})"
        if convert is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=convert, choices=choices, default=None,
                                metavar=f.name.upper() if choices is None else None, help=help_text)


def job_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The JobConfig fields given on the command line."""
    names = {f.name for f in dataclasses.fields(JobConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
