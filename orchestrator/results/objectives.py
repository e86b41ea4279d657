"""What a sweep optimises: which way each metric is better, `--objective` values, and the Pareto front of a
multi-objective sweep. Free of Ray and Optuna, so `mdsweep query` stays fast."""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from trainer.job_config import REPORT_METRICS

# metrics (and trial columns) where lower is better: losses, error rates, costs
LOWER_IS_BETTER = frozenset({name for name, metric in REPORT_METRICS.items() if metric.lower_is_better}
                            | {"cer", "predicted_peak_bytes", "wall_time_s", "job_wall_time_s"})


def default_mode(metric: str) -> str:
    """min for losses, error rates and costs, max otherwise; `best_`/`final_` columns as their metric."""
    base = metric.removeprefix("best_").removeprefix("final_")
    return "min" if base in LOWER_IS_BETTER else "max"


def parse_objective(text: str, flag: str = "--objective") -> tuple[str, str]:
    """'val_exact_match:max' -> ('val_exact_match', 'max'); without a mode, the metric's natural one."""
    metric, _, mode = text.partition(":")
    metric, mode = metric.strip(), mode.strip() or default_mode(metric.strip())
    if not metric or mode not in ("max", "min"):
        raise ValueError(f"{flag} {text!r}: expected METRIC or METRIC:max / METRIC:min")
    return metric, mode


def is_finite_number(value: Any) -> bool:
    """A real number that is not NaN or infinite (bools are not numbers here): a value a trial can be ranked by."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(rows: Sequence[dict[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The ok trials no other ok trial beats on every objective (`final_<metric>` columns), best first by the
    first objective."""
    def values(row: dict[str, Any]) -> tuple[float, ...]:
        # as "higher is better" throughout
        return tuple(row[f"final_{m}"] * (1 if mode == "max" else -1) for m, mode in objectives)

    scored = [r for r in rows if r.get("outcome") == "ok"
              and all(is_finite_number(r.get(f"final_{m}")) for m, _ in objectives)]
    points = [(values(r), r) for r in scored]
    front = [r for v, r in points
             if not any(all(a >= b for a, b in zip(w, v)) and w != v for w, _ in points)]
    return sorted(front, key=lambda r: (-values(r)[0], str(r.get("trial_id"))))
