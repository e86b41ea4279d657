"""Proposals and their runs: which runs a proposal expands into (`--replicates`, `--cross`), and what a
proposal's runs tell Optuna. Free of Ray, so `mdsweep plan`, `report` and `study` read it without starting Tune.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

from orchestrator.results.job_values import literal_choices, parse_value
from orchestrator.results.objectives import is_finite_number
from orchestrator.results.schema import job_field_types


def parse_cross(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """'attention' -> ('attention', ['causal', 'prefix']); 'lr=1e-4,1e-5' -> explicit values."""
    out = []
    seen = set()
    types_ = job_field_types()
    for item in items or ():
        name, sep, values = item.partition("=")
        name = name.strip()
        if name not in types_:
            raise ValueError(f"--cross: {name!r} is not a JobConfig field")
        if name in seen:
            raise ValueError(f"--cross: {name} given twice")
        seen.add(name)
        if sep:
            vals = [parse_value(name, v.strip(), "--cross") for v in values.split(",") if v.strip()]
        else:
            choices = literal_choices(types_[name][0])
            if choices is None and types_[name][0] is bool:
                choices = (False, True)
            if choices is None:
                raise ValueError(f"--cross {name}: give its values, e.g. --cross {name}=a,b")
            vals = list(choices)
        if len(vals) < 2:
            raise ValueError(f"--cross {name}: needs at least two values")
        out.append((name, vals))
    return out


def build_expansions(replicates: int, base_seed: int, cross: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every suggestion runs once per element: seeds x crossed values (in that order)."""
    if replicates < 1:
        raise ValueError("--replicates must be >= 1")
    axes: list[list[tuple[str, Any]]] = [[(name, v) for v in vals] for name, vals in cross]
    if replicates > 1:
        axes.append([("seed", base_seed + i) for i in range(replicates)])
    if not axes:
        return [{}]
    return [dict(combo) for combo in itertools.product(*axes)]



State = tuple[str, Optional[tuple[float, ...]]]  # (Optuna trial state name, the objectives' values if COMPLETE)


def member_state(result: Optional[dict[str, Any]], metrics: Sequence[str]) -> State:
    """What one run of a proposal tells Optuna, from its final report: its values when it ended ok with
    finite values; FAIL for oom, error or non-finite values; PRUNED for diverged, stopped early, or no report.
    One definition for the searcher and for `mdsweep study`, which rebuilds the study from the results."""
    if not result:
        return "PRUNED", None
    outcome = result.get("outcome")
    values = [result.get(metric) for metric in metrics]
    if outcome == "ok":
        return ("COMPLETE", tuple(float(v) for v in values)) if all(map(is_finite_number, values)) else ("FAIL", None)
    if outcome in ("oom", "error"):
        return "FAIL", None
    return "PRUNED", None


def group_state(states: Sequence[State]) -> State:
    """A proposal run several times (replicates, crossed values) is told the mean of its completed runs, per
    objective; PRUNED when none completed and one was pruned; else FAIL."""
    values = [v for s, v in states if s == "COMPLETE" and v is not None]
    if values:
        return "COMPLETE", tuple(sum(column) / len(values) for column in zip(*values))
    if any(s == "PRUNED" for s, _ in states):
        return "PRUNED", None
    return "FAIL", None
