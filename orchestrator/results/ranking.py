"""Which trial of a sweep: the best by the objective Optuna was told, or one by id; and its one-line summary.

Shared by `mdsweep export` and the end-of-sweep report, so "the best trial" means
the same thing in both.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence
from orchestrator.results.objectives import is_finite_number


class TrialPickError(ValueError):
    """No trial matches; the message says what exists instead."""



def ranked_trials(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `ok` trials with an objective, best first (ties: the lower trial id)."""
    scored = [r for r in rows if r.get("outcome") == "ok" and is_finite_number(r.get("objective"))]
    if not scored:
        return []
    sign = -1.0 if (scored[0].get("objective_mode") or "max") == "max" else 1.0
    return sorted(scored, key=lambda r: (sign * r["objective"], r["trial_id"]))


def best_trial(rows: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The `ok` trial with the best objective, or None."""
    ranked = ranked_trials(rows)
    return ranked[0] if ranked else None


def find_trial(rows: Sequence[dict[str, Any]], sweep: str, *, trial_id: Optional[str], best: bool) -> dict[str, Any]:
    """The trial `export` should take; TrialPickError names what is missing."""
    if not rows:
        raise TrialPickError(f"no sweep {sweep!r} in the results (no trials table partition sweep={sweep})")
    if best:
        row = best_trial(rows)
        if row is None:
            outcomes = ", ".join(sorted({str(r.get("outcome")) for r in rows}))
            raise TrialPickError(f"sweep {sweep!r} has no trial that ended ok with an objective (outcomes: {outcomes})")
        return row
    matches = [r for r in rows if r.get("trial_id") == trial_id]
    if not matches:
        known = ", ".join(sorted(str(r.get("trial_id")) for r in rows)[:12])
        raise TrialPickError(f"no trial {trial_id!r} in sweep {sweep!r}; its trials: {known}")
    row = matches[0]
    if row.get("outcome") != "ok":
        reason = (row.get("error") or "").strip().splitlines()
        raise TrialPickError(f"trial {trial_id} ended {row.get('outcome')!r}"
                             + (f" ({reason[0]})" if reason else "")
                             + "; only a trial that ended ok has a fine-tuned model to export")
    return row


def describe_trial(row: dict[str, Any], searched: Sequence[str]) -> str:
    """`val_exact_match 0.955 [0.918, 0.976] (n=200) with lr=0.0012, grad_accum=2, attention=prefix`."""
    metric = row.get("objective_metric") or "val_exact_match"
    text = f"{metric} {row.get('objective', float('nan')):.3f}"
    if metric == "val_exact_match" and is_finite_number(row.get("final_val_exact_match_low")):
        text += (f" [{row['final_val_exact_match_low']:.3f}, {row['final_val_exact_match_high']:.3f}]"
                 f" (n={row.get('final_val_n')})")
    settings = [f"{k}={_short(row.get(k))}" for k in searched if k in row]
    return text + (" with " + ", ".join(settings) if settings else "")


def describe_test(values: dict[str, Any]) -> str:
    """`exact match 0.398 [0.356, 0.442] (n=500), CER 0.173`: a held-out test, from its test_* values."""
    return (f"exact match {values['test_exact_match']:.3f} [{values['test_exact_match_low']:.3f}, "
            f"{values['test_exact_match_high']:.3f}] (n={values['test_n']}), CER {values['test_cer']:.3f}")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
