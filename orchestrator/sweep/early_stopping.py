"""Early stopping: ASHA on the evaluation metric, never at a trial's last step."""
from __future__ import annotations

from typing import Any, Optional

from ray.tune.schedulers import ASHAScheduler


class FinishingASHA(ASHAScheduler):
    """ASHA that never stops a trial at or past its last step.

    A trial's last evaluation is also its end: stopping it there (plain ASHA stops
    every trial that reaches `max_t`) would kill the job before it returns its
    outcome and predictions. Trials that reach the end finish on their own.
    """

    def on_trial_result(self, tune_controller, trial, result):
        from ray.tune.schedulers import TrialScheduler

        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def trial_length(fixed: dict[str, Any]) -> tuple[str, Optional[int]]:
    """(time attribute, trial length) ASHA measures trials by: samples seen under a sample budget, so
    rungs fall at the same data for every grad_accum; otherwise optimizer steps."""
    if fixed.get("max_samples"):
        return "samples_seen", int(fixed["max_samples"])
    return "step", int(fixed["max_steps"]) if fixed.get("max_steps") else None


def make_scheduler(kind: str, metric: str, mode: str, fixed: dict[str, Any], grace: Optional[int],
                   reduction_factor: float) -> Any:
    """None (run every trial to the end) or ASHA on `metric`, timed by `trial_length(fixed)`."""
    if kind in (None, "", "none"):
        return None
    if kind != "asha":
        raise ValueError(f"--early-stop: unknown scheduler {kind!r}; choose none or asha")
    time_attr, max_t = trial_length(fixed)
    if not max_t:
        raise ValueError("--early-stop asha needs the trial length: give --max-samples (or --max-steps)")
    unit = "samples" if time_attr == "samples_seen" else "steps"
    grace = int(grace or max(1, max_t // 8))
    if grace >= max_t:
        raise ValueError(f"--asha-grace {grace} must be below the trial length ({max_t} {unit})")
    if reduction_factor <= 1:
        raise ValueError("--asha-reduction-factor must be > 1")
    return FinishingASHA(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t, grace_period=grace,
                         reduction_factor=reduction_factor, stop_last_trials=False)
