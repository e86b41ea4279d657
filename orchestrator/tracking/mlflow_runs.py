"""`--log-to mlflow[=URI]`: one MLflow run per trial, through MLflow's own client.

Ray's `MLflowLoggerCallback` is not used: it ignored `tracking_uri` (ray #36257) and broke when a trial's settings
changed (ray #20473), and it starts a second run for a trial that is resumed. Here a trial's run is found again by
its `mdsweep.trial_id` tag, so a retried or resumed trial writes into the run it started, and the evaluations it
repeats from its checkpoint are not logged twice (their samples_seen are read back from the run).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from orchestrator.tracking.trial_mirror import TRIAL_TAG, TrialMirror

DEFAULT_URI = "./mlruns"


class MlflowRuns(TrialMirror):
    """One MLflow run per trial of one sweep, in the MLflow experiment named after the sweep."""

    kind = "mlflow"

    def __init__(self, flag: str, sweep: str, uri: str, metric: str):
        super().__init__(flag, sweep)
        self.uri, self.metric = uri, metric
        self._client: Any = None
        self._experiment: str = ""

    def transient_state(self) -> dict[str, Any]:
        return {"_client": None, "_experiment": ""}

    def connect(self) -> None:
        self.client()

    def client(self) -> Any:
        if self._client is None:
            import mlflow

            # its store's set-up lines (creating tables) would land between the progress table's lines
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
            found = self._client.get_experiment_by_name(self.sweep)
            self._experiment = found.experiment_id if found else self._client.create_experiment(
                self.sweep, artifact_location=self.artifact_location())
        return self._client

    def artifact_location(self) -> Optional[str]:
        """Where a SQLite store's runs keep their files (the report): beside the database, in mlartifacts/SWEEP.
        MLflow's default is ./mlruns under whichever folder the driver was started in. A folder store keeps
        them inside itself, and a server decides for itself (None)."""
        if not self.uri.startswith("sqlite:///"):
            return None
        return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / self.sweep).as_uri()

    def open_run(self, trial_id: str, run_name: str, settings: dict[str, Any]) -> tuple[str, set[int]]:
        """The run a previous start (a retry, a resumed sweep) made, or a new one with the settings as parameters
        (MLflow keeps parameters immutable, so they are logged once)."""
        from mlflow.entities import Param

        client = self.client()
        found = client.search_runs([self._experiment], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'",
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
            return run_id, {m.step for m in client.get_metric_history(run_id, self.metric)}
        run = client.create_run(self._experiment, run_name=run_name, tags={
            TRIAL_TAG: trial_id, "mdsweep.sweep": self.sweep, "attention": str(settings.get("attention", ""))})
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(settings.items())])
        return run.info.run_id, set()

    def running(self, run: str) -> None:
        self.client().update_run(run, status="RUNNING")  # not set_terminated, which stamps an end time

    def write(self, run: str, samples_seen: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # one write per evaluation, not one per metric
        self.client().log_batch(run, metrics=[Metric(k, v, now, samples_seen) for k, v in metrics.items()])

    def finish(self, run: str, outcome: str) -> None:
        self.client().set_tag(run, "outcome", outcome)
        self.client().set_terminated(run, status="FAILED" if outcome == "error" else "FINISHED")

    def tag_best(self, run: str, report: Optional[Path]) -> None:
        self.client().set_tag(run, "mdsweep.best", "true")
        if report is not None:
            self.client().log_artifact(run, str(report))
