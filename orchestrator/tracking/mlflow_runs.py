"""`--log-to mlflow[=URI]`: one MLflow run per trial, through MLflow's own client.

Ray's `MLflowLoggerCallback` is not used: it ignored `tracking_uri` (ray #36257) and broke when a trial's settings
changed (ray #20473), and it starts a second run for a trial that is resumed. Here a trial's run is found again by
its `mdsweep.trial_id` tag, so a retried or resumed trial writes into the run it started, and metrics are logged at
their `samples_seen`, once: the evaluations a resumed trial repeats from its checkpoint are not logged again.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import time
from typing import Any, Optional

from orchestrator.cluster.tune_internals import tune_callback_base
from orchestrator.results.spaces import split_suggestion
from trainer.job_config import REPORT_METRICS

DEFAULT_URI = "./mlruns"
TRIAL_TAG = "mdsweep.trial_id"
# the evaluation's numbers: every reported metric that is a number, but the step counters used as the x axis
LOGGED = [m for m, spec in REPORT_METRICS.items() if spec.type in (int, float) and m not in ("step", "samples_seen")]


class TrackerError(ValueError):
    """A --log-to that cannot work; the message names the flag and what to do."""


def mlflow_uris(log_to: list[str]) -> list[str]:
    """The MLflow tracking URIs of `--log-to` values (`mlflow` alone: ./mlruns), checked before Ray starts: the
    tracker is one this version writes to, and its package is installed."""
    uris = []
    for value in log_to:
        tracker, _, uri = value.partition("=")
        if tracker != "mlflow":
            raise TrackerError(f"--log-to {value}: {tracker!r} is not a tracker mdsweep writes to yet; use mlflow[=URI]")
        if importlib.util.find_spec("mlflow") is None:
            raise TrackerError(f"--log-to {value}: MLflow is not installed; pip install 'moondream-sweep[mlflow]'")
        uris.append(uri or DEFAULT_URI)
    if len(set(uris)) < len(uris):
        raise TrackerError(f"--log-to: {', '.join(log_to)} name one tracking URI twice")
    return uris


class MlflowRuns(tune_callback_base()):
    """One MLflow run per trial of one sweep, in the MLflow experiment named after the sweep."""

    def __init__(self, uri: str, sweep: str, fixed: dict[str, Any], metric: str, mode: str):
        self.uri, self.sweep, self.fixed, self.metric, self.mode = uri, sweep, dict(fixed), metric, mode
        self._client: Any = None
        self._experiment: Optional[str] = None
        self._runs: dict[str, str] = {}  # trial id -> MLflow run id
        self._logged: dict[str, set[int]] = {}  # trial id -> the samples_seen its run has metrics at

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the experiment; the client and the ids are found again after a resume."""
        return {**self.__dict__, "_client": None, "_experiment": None, "_runs": {}, "_logged": {}}

    def client(self) -> Any:
        if self._client is None:
            import mlflow

            # its store's set-up lines (creating tables) would land between the progress table's lines
            logging.getLogger("mlflow").setLevel(logging.WARNING)

            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
            found = self._client.get_experiment_by_name(self.sweep)
            self._experiment = found.experiment_id if found else self._client.create_experiment(self.sweep)
        return self._client

    def run_of(self, trial: Any) -> str:
        """The trial's run: the one a previous start (a retry, a resumed sweep) made, or a new one with its settings
        as parameters (MLflow keeps parameters immutable, so they are logged once)."""
        tid = trial.trial_id
        if tid not in self._runs:
            client = self.client()
            found = client.search_runs([self._experiment], filter_string=f"tags.`{TRIAL_TAG}` = '{tid}'",
                                       max_results=1)
            if found:
                self._runs[tid] = found[0].info.run_id
                self._logged[tid] = {m.step for m in client.get_metric_history(self._runs[tid], self.metric)}
            else:
                params, _ = split_suggestion(dict(trial.config))
                settings = {**self.fixed, **params}
                run = client.create_run(self._experiment, run_name=f"{self.sweep}/{tid}", tags={
                    TRIAL_TAG: tid, "mdsweep.sweep": self.sweep, "attention": str(settings.get("attention", ""))})
                from mlflow.entities import Param

                client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(settings.items())])
                self._runs[tid] = run.info.run_id
                self._logged[tid] = set()
        return self._runs[tid]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.client().update_run(self.run_of(trial), status="RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("outcome") != "running" or result.get("samples_seen") is None:
            return  # the final report repeats the last evaluation; a report without samples is no evaluation
        step = int(result["samples_seen"])
        run = self.run_of(trial)
        if step in self._logged[trial.trial_id]:
            return  # a resumed or retried trial evaluates again from its checkpoint: the run has these already
        self._logged[trial.trial_id].add(step)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client().log_batch(run, metrics=[  # one write per evaluation, not one per metric
            Metric(name, float(value), now, step) for name in LOGGED
            if isinstance(value := result.get(name), (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)])

    def _end(self, trial: Any, outcome: str, status: str) -> None:
        run = self.run_of(trial)
        self.client().set_tag(run, "outcome", outcome)
        self.client().set_terminated(run, status=status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, (trial.last_result or {}).get("outcome") or "stopped", "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "error", "FAILED")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """The sweep's best trial (of those that ended ok, resumed ones included) is tagged, so that the
        tracker's own search finds it."""
        scored = [(float(t.last_result[self.metric]), t) for t in trials
                  if (t.last_result or {}).get("outcome") == "ok"
                  and isinstance(t.last_result.get(self.metric), (int, float))]
        if scored:
            pick = max if self.mode == "max" else min
            _, best = pick(scored, key=lambda pair: pair[0])
            self.client().set_tag(self.run_of(best), "mdsweep.best", "true")
