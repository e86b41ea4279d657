"""Early stopping: ASHA on the evaluation metric, never at a trial's last step."""
from __future__ import annotations

from typing import Any, Optional


def _asha_base():
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler


class FinishingASHA(_asha_base()):
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


def make_scheduler(kind: str, metric: str, mode: str, max_t: Optional[int], grace: Optional[int],
                   reduction_factor: float) -> Any:
    """None (run every trial to the end) or ASHA on `metric`, with `step` as time."""
    if kind in (None, "", "none"):
        return None
    if kind != "asha":
        raise ValueError(f"--early-stop: unknown scheduler {kind!r}; choose none or asha")
    if not max_t:
        raise ValueError("--early-stop asha needs the trial length in steps: give --max-steps")
    max_t = int(max_t)
    grace = int(grace or max(1, max_t // 8))
    if grace >= max_t:
        raise ValueError(f"--asha-grace {grace} must be below the trial length ({max_t} steps)")
    if reduction_factor <= 1:
        raise ValueError("--asha-reduction-factor must be > 1")
    return FinishingASHA(time_attr="step", metric=metric, mode=mode, max_t=max_t, grace_period=grace,
                         reduction_factor=reduction_factor, stop_last_trials=False)
