"""The Ray Tune callback that feeds a sweep's trials to its `--log-to` trackers."""
from __future__ import annotations

from typing import Any

from orchestrator.cluster.tune_internals import tune_callback_base
from orchestrator.results.spaces import split_suggestion
from orchestrator.tracking.trial_mirror import TrialMirror


class MirrorCallback(tune_callback_base()):
    """Each trial's start, evaluations and end, passed to every tracker; the best trial tagged at the end.

    A trial's settings are the sweep's fixed job settings with its proposal over them, as its Parquet row has.
    """

    def __init__(self, trackers: list[TrialMirror], fixed: dict[str, Any], metric: str, mode: str):
        self.trackers, self.fixed, self.metric, self.mode = trackers, dict(fixed), metric, mode

    def setup(self, **info: Any) -> None:
        for tracker in self.trackers:
            tracker.prepare()

    def settings(self, trial: Any) -> dict[str, Any]:
        params, _ = split_suggestion(dict(trial.config))
        return {**self.fixed, **params}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for tracker in self.trackers:
            tracker.start(trial.trial_id, self.settings(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("outcome") != "running":
            return  # the final report repeats the last evaluation
        for tracker in self.trackers:
            tracker.log(trial.trial_id, self.settings(trial), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for tracker in self.trackers:
            tracker.end(trial.trial_id, self.settings(trial), (trial.last_result or {}).get("outcome") or "stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for tracker in self.trackers:
            tracker.end(trial.trial_id, self.settings(trial), "error")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """The sweep's best trial (of those that ended ok, resumed ones included) is tagged, so that the
        tracker's own search finds it; then the trackers release what they hold open."""
        scored = [(float(t.last_result[self.metric]), t) for t in trials
                  if (t.last_result or {}).get("outcome") == "ok"
                  and isinstance(t.last_result.get(self.metric), (int, float))]
        for tracker in self.trackers:
            if scored:
                _, best = (max if self.mode == "max" else min)(scored, key=lambda pair: pair[0])
                tracker.best(best.trial_id, self.settings(best))
            tracker.shutdown()
