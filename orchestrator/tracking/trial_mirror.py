"""What every `--log-to` tracker shares: one run per trial, found again after a retry or a resume, each evaluation
logged once at its `samples_seen`, and a tracker that fails mid-sweep warned about once and then left alone.

A tracker holds a copy; the Parquet results are the sweep's record. So a tracker that stops working (its server
down, its disk full) must not end the sweep or lose a row: its error becomes one warning line naming the flag, and
the tracker is skipped for the rest of the process. Subclasses only say how their tracker opens, writes and ends
a run; `MirrorCallback` (orchestrator.tracking.tune_callback) feeds them from Ray Tune, and `mdsweep train` feeds
one run directly.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Optional

from trainer.job_config import REPORT_METRICS

# the evaluation's numbers: every reported metric that is a number, but the step counters used as the x axis
LOGGED = [m for m, spec in REPORT_METRICS.items() if spec.type in (int, float) and m not in ("step", "samples_seen")]
TRIAL_TAG = "mdsweep.trial_id"


def evaluation_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of one evaluation's report, by name (booleans and NaN are not a tracker's points)."""
    return {name: float(value) for name in LOGGED
            if isinstance(value := result.get(name), (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class TrialMirror:
    """One tracker's runs for one sweep (or one `train`), keyed by trial id.

    Subclasses implement `open_run`, `write`, `finish`, `tag_best` and may implement `close`; every call into the
    tracker goes through `_guarded`, so a tracker error is one warning, never an exception in Tune's loop.
    """

    kind = "tracker"

    def __init__(self, flag: str, sweep: str):
        self.flag, self.sweep = flag, sweep  # flag: the --log-to value, for messages
        self.failed: Optional[str] = None
        self._runs: dict[str, Any] = {}  # trial id -> the tracker's run (an id or an object)
        self._logged: dict[str, set[int]] = {}  # trial id -> the samples_seen its run has metrics at

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the experiment; clients and runs are found again after a resume."""
        return {**self.__dict__, **self.transient_state(), "failed": None, "_runs": {}, "_logged": {}}

    def transient_state(self) -> dict[str, Any]:
        """The attributes (clients, open writers) that must not be pickled, with their empty values."""
        return {}

    # what a tracker implements
    def open_run(self, trial_id: str, run_name: str, settings: dict[str, Any]) -> tuple[Any, set[int]]:
        """The trial's run, found again or made with its settings: (run, the samples_seen it already holds)."""
        raise NotImplementedError

    def write(self, run: Any, samples_seen: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, run: Any, outcome: str) -> None:
        raise NotImplementedError

    def tag_best(self, run: Any) -> None:
        raise NotImplementedError

    def running(self, run: Any) -> None:
        """Mark the run as running again (a retried or resumed trial starts); most trackers need nothing."""

    def close(self) -> None:
        """Release what the tracker holds open when the sweep ends (writers, service processes)."""

    # what the callers use
    def start(self, trial_id: str, settings: dict[str, Any]) -> None:
        self._guarded(lambda: self.running(self._run(trial_id, settings)))

    def log(self, trial_id: str, settings: dict[str, Any], result: dict[str, Any]) -> None:
        """One evaluation's metrics at its samples_seen, unless the run holds them already (a resumed trial
        evaluates again from its checkpoint)."""
        if result.get("samples_seen") is None:
            return

        def write() -> None:
            run, step = self._run(trial_id, settings), int(result["samples_seen"])
            if step not in self._logged[trial_id]:
                self.write(run, step, evaluation_metrics(result))
                self._logged[trial_id].add(step)

        self._guarded(write)

    def end(self, trial_id: str, settings: dict[str, Any], outcome: str) -> None:
        self._guarded(lambda: self.finish(self._run(trial_id, settings), outcome))

    def best(self, trial_id: str, settings: dict[str, Any]) -> None:
        self._guarded(lambda: self.tag_best(self._run(trial_id, settings)))

    def shutdown(self) -> None:
        self._guarded(self.close)

    def _run(self, trial_id: str, settings: dict[str, Any]) -> Any:
        if trial_id not in self._runs:
            self._runs[trial_id], self._logged[trial_id] = self.open_run(trial_id, f"{self.sweep}/{trial_id}",
                                                                         settings)
        return self._runs[trial_id]

    def _guarded(self, call: Any, *args: Any) -> None:
        if self.failed is not None:
            return
        try:
            call(*args)
        except Exception as e:  # noqa: BLE001 - any tracker error: the sweep goes on without the copy
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.failed = f"{type(e).__name__}: {first_line}"
            print(f"mdsweep: warning: --log-to {self.flag}: {self.failed}; this process logs nothing more there "
                  "(the sweep goes on, and its Parquet results keep every row)", file=sys.stderr, flush=True)
