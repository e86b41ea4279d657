"""Objectives: modes, `--objective` parsing, the Pareto front, and a multi-objective Optuna search."""
from __future__ import annotations

import math

import pytest

from orchestrator.results.objectives import default_mode, pareto_front, parse_objective
from orchestrator.sweep.search import make_searcher

OBJECTIVES = [("val_exact_match", "max"), ("peak_memory_bytes", "min")]


def _row(trial_id: str, accuracy: float, peak: float, outcome: str = "ok") -> dict:
    return {"trial_id": trial_id, "outcome": outcome, "final_val_exact_match": accuracy,
            "final_peak_memory_bytes": peak}


def test_modes_and_parsing():
    assert default_mode("final_val_cer") == "min" and default_mode("best_val_exact_match") == "max"
    assert parse_objective("peak_memory_bytes") == ("peak_memory_bytes", "min")
    assert parse_objective("val_cer:max") == ("val_cer", "max")
    with pytest.raises(ValueError, match="--objective 'lr:up'"):
        parse_objective("lr:up")


def test_pareto_front_keeps_exactly_the_undominated_ok_trials():
    rows = [_row("a", 0.9, 8e9), _row("b", 0.8, 4e9), _row("c", 0.7, 6e9),  # c: beaten by b on both
            _row("d", 0.9, 9e9),  # d: same accuracy as a, more memory
            _row("e", 0.95, 2e9, outcome="oom"), _row("f", math.nan, 1e9), _row("g", 0.5, 1e9)]
    assert [r["trial_id"] for r in pareto_front(rows, OBJECTIVES)] == ["a", "b", "g"]
    twins = [_row("x", 0.5, 1e9), _row("y", 0.5, 1e9)]  # equal points do not dominate each other
    assert [r["trial_id"] for r in pareto_front(twins, OBJECTIVES)] == ["x", "y"]


def test_several_objectives_make_a_multi_objective_optuna_study():
    searcher = make_searcher("smoke", "val_exact_match", "max", 0, [{}], None, objectives=OBJECTIVES)
    for i in range(4):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"outcome": "ok", "val_exact_match": 0.1 * i,
                                             "peak_memory_bytes": 1e9 * (1 + i % 2)})
    study = searcher.study
    assert len(study.directions) == 2
    assert [t.values for t in study.trials] == [[0.0, 1e9], [0.1, 2e9], [0.2, 1e9], [0.30000000000000004, 2e9]]
    assert sorted(t.number for t in study.best_trials) == [2, 3]
