"""The Ray Tune callback that feeds a sweep's trials to its `--log-to` trackers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from orchestrator.cluster.tune_internals import tune_callback_base
from orchestrator.results.spaces import split_suggestion
from orchestrator.tracking.trial_mirror import TrialMirror


class MirrorCallback(tune_callback_base()):
    """Each trial's start, evaluations and end, passed to every tracker; `close` marks the best at the end.

    A trial's settings are the sweep's fixed job settings with its proposal over them, as its Parquet row has.
    """

    def __init__(self, trackers: list[TrialMirror], fixed: dict[str, Any]):
        self.trackers, self.fixed = trackers, dict(fixed)

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

    def close(self, best: Optional[dict[str, Any]], report: Optional[Path]) -> None:
        """At the sweep's end (after Tune's, once the results are complete): the best trial (`best_trial` of the
        results, the one `export --best` takes) marked in each tracker with the sweep's report attached, then
        the trackers' queues written out."""
        for tracker in self.trackers:
            if best is not None:
                params, _ = split_suggestion(json.loads(best.get("params_json") or "{}"))
                tracker.best(best["trial_id"], {**self.fixed, **params}, report)
            tracker.shutdown()
