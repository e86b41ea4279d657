"""A Ray Tune callback that keeps the results dataset (orchestrator.results.store) up to date as the sweep goes.

It turns Tune's events into rows (orchestrator.results.trial_rows): a trial's row when it starts, a steps row
per evaluation it reports (on disk at once), its final outcome and predictions, its end. The trials file follows
at most every interval (SweepWriter); an end that Tune's own record cannot show (a trial stopped by the
scheduler or failed, with no final report) is written at once, since the resume's repair
(orchestrator.sweep.repair) rebuilds only what that record holds. On start-up the sink reads back what an
earlier run of the same sweep wrote (start time, attempts, steps), which is what makes a resume lose and
duplicate nothing.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any, Optional

from orchestrator.cluster.trial_errors import trial_failure
from orchestrator.cluster.tune_internals import tune_callback_base
from orchestrator.results.schema import job_field_types, utc_now, validate_sweep_name
from orchestrator.results.store import ENDED, SweepWriter, read_trial_rows
from orchestrator.results.trial_rows import (new_trial_row, params_json, prediction_rows, record_final,
                                             record_report, start_attempt, steps_row, summarize_steps)
from orchestrator.results.spaces import GROUP_KEY, MEMBER_KEY, split_suggestion
from orchestrator.sweep.trainable import JOB_CONFIG_KEY, KIND_KEY, PREDICTIONS_KEY, job_config_from


class ParquetSink(tune_callback_base()):
    """Keeps the trials, steps and predictions tables of one sweep up to date."""

    def __init__(self, results_dir: str, sweep: str, fixed: dict[str, Any], searched: list[str], metric: str,
                 mode: str, max_gpu_memory: Optional[str] = None, workers: int = 1):
        self.results_dir = str(results_dir)
        self.sweep = validate_sweep_name(sweep)
        self.fixed = dict(fixed)
        self.searched = list(searched)
        self.metric = metric
        self.mode = mode
        self.max_gpu_memory = max_gpu_memory
        self.workers = workers  # the sweep's --workers-per-trial, the same for every trial
        self.__dict__.update(self._run_state())

    def _run_state(self) -> dict[str, Any]:
        """What the sink holds of one driver run; empty at first, and in the copy Tune pickles, since `_load`
        reads it back from the results."""
        return {
            "_trials": {},  # rows of trials that have not ended
            "_steps": {},  # steps rows of trials that have not ended, by trial id and step
            "_writer": SweepWriter(self.results_dir, self.sweep),  # the ended rows, and every write
            "_loaded": False,
        }

    def __getstate__(self) -> dict:
        return {**self.__dict__, **self._run_state()}

    def _load(self) -> None:
        """Read back the rows an earlier run of this sweep wrote; a trial's steps are read when it comes back."""
        if not self._loaded:
            self._loaded = True
            self._trials = self._writer.load()

    def _write_trials(self, force: bool = False) -> bool:
        """Rewrite the sweep's trials file if it is due (`force`: if a row changed). False when a write was due
        but failed."""
        if not self._writer.due(force):
            return True
        for row in self._trials.values():
            self._refresh_metrics(row)
        return self._writer.write_trials(self._trials.values())

    def flush(self) -> bool:
        """Write the trials file now if a row changed (the resume's repair, which no interval will follow)."""
        return self._write_trials(force=True)

    def _steps_of(self, trial_id: str) -> dict[int, dict[str, Any]]:
        """A live trial's steps rows by step; read back from its file the first time (a resumed or rerun trial)."""
        steps = self._steps.get(trial_id)
        if steps is None:
            rows = read_trial_rows(self.results_dir, "steps", self.sweep, trial_id) or []
            steps = self._steps[trial_id] = {int(r["step"]): r for r in rows if r.get("step") is not None}
        return steps

    def _write_steps(self, trial_id: str) -> bool:
        steps = self._steps_of(trial_id)
        return self._writer.write_trial("steps", trial_id, [steps[s] for s in sorted(steps)])

    # --- rows --------------------------------------------------------------
    def _trial_row(self, trial: Any) -> dict[str, Any]:
        """The row of a trial that is running or about to; an ended trial that comes back (a replay, a rerun of
        an errored trial) brings its row back from the ended ones."""
        row = self._trials.get(trial.trial_id) or self._writer.ended_row(trial.trial_id, take=True)
        if row is None:
            job: dict[str, Any] = {}
            # what the trial will run, until it reports what it ran (JOB_CONFIG_KEY): the same reading; a config
            # JobConfig rejects fails in the trial, which says why, and must not stop the sink
            with contextlib.suppress(ValueError):
                job = job_config_from(self.fixed, trial.config).to_dict()
            row = new_trial_row(trial.trial_id, trial.config, job, self.metric, self.mode, self.max_gpu_memory,
                                self.workers)
        self._trials[trial.trial_id] = row
        return row

    def _take_restarted_row(self, trial: Any, trials: list) -> None:
        """`resume --restart-errored`: Tune restarts an errored trial as a new trial (a new id, the same config)
        and drops the old one from its list. The old id's row and steps become the new id's, so the tables keep
        one row per trial, its attempts counted, and no row of a trial Tune no longer knows."""
        tid = trial.trial_id
        if tid in self._trials or self._writer.has_ended(tid):
            return
        live = {t.trial_id for t in trials}
        params, meta = params_json(trial.config), split_suggestion(dict(trial.config))[1]
        old = next((r["trial_id"] for r in self._writer.errored_rows()
                    if r["trial_id"] not in live and r.get("params_json") == params
                    and r.get("group_id") == meta.get(GROUP_KEY) and r.get("member") == meta.get(MEMBER_KEY)), None)
        if old is None:
            return
        row = self._writer.ended_row(old, take=True)
        row["trial_id"] = tid
        self._trials[tid] = row
        self._steps[tid] = {step: {**r, "trial_id": tid} for step, r in self._steps_of(old).items()}
        self._steps.pop(old, None)
        self._writer.move_trial(old, tid)

    def _refresh_metrics(self, row: dict[str, Any]) -> None:
        summarize_steps(row, self._steps_of(row["trial_id"]), self.metric, self.mode)

    def _update(self, trial: Any, status: Optional[str] = None, now: bool = False) -> None:
        """Bring a trial's row up to date; the trials file follows when it is due (`now`: at once). A trial that
        has ended moves to the ended rows, and its steps leave memory."""
        row = self._trial_row(trial)
        if status:
            row["status"] = status
        # Tune's count, when it has one, is authoritative (it survives a resume with the trial)
        tune_failures = getattr(trial, "num_failures", None)
        if isinstance(tune_failures, int):
            row["num_failures"] = max(tune_failures, int(row.get("num_failures") or 0))
        ckpt = getattr(trial, "checkpoint", None)
        if ckpt is not None:
            row["checkpoint_path"] = getattr(ckpt, "path", None)
        if row.get("start_time") and row.get("end_time"):
            row["wall_time_s"] = (row["end_time"] - row["start_time"]).total_seconds()
        if row.get("status") in ENDED:  # a live row's metrics are refreshed when the file is written
            self._refresh_metrics(row)
            self._writer.end(self._trials.pop(trial.trial_id))
            self._steps.pop(trial.trial_id, None)
        self._writer.dirty = True
        self._write_trials(force=now)

    # --- Tune callback hooks --------------------------------------------------
    def setup(self, stop: Any = None, num_samples: Any = None, total_num_samples: Any = None, **info: Any) -> None:
        self._load()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._load()
        self._take_restarted_row(trial, trials)
        start_attempt(self._trial_row(trial))
        self._update(trial, "running")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._load()
        row = self._trial_row(trial)
        row["num_failures"] = int(row.get("num_failures") or 0) + 1
        self._update(trial, "pending")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._load()
        # Take the predictions out of the result in place (Tune allows callbacks to modify
        # it), so that the experiment state and Tune's own loggers never carry them.
        predictions = result.pop(PREDICTIONS_KEY, None)
        row = self._trial_row(trial)
        ran = result.pop(JOB_CONFIG_KEY, None)
        if isinstance(ran, dict):  # the config the trial actually ran, as the trainable built it
            row.update({k: ran[k] for k in job_field_types() if k in ran})
        # a new placement is written at once, so the table says where a trial runs as soon as it reports
        placed = record_report(row, result)
        kind = result.get(KIND_KEY, "eval")
        step = result.get("step")
        tid = trial.trial_id
        if kind == "eval" and step is not None:
            steps = self._steps_of(tid)
            steps[int(step)] = steps_row(tid, result)
            self._write_steps(tid)
        elif kind == "final":
            self._refresh_metrics(row)  # the last evaluation's metrics, while the row still says running
            final_step = int(step or 0)
            steps = self._steps_of(tid)
            stale = [s for s in steps if s > final_step]
            if stale:  # rows of an earlier attempt beyond where this one ended
                for s in stale:
                    del steps[s]
                self._write_steps(tid)
            record_final(row, result, self.metric, final_step)
            if predictions and predictions.get("sample_id"):
                self._writer.write_trial("predictions", tid, prediction_rows(tid, final_step, predictions))
        self._update(trial, now=placed)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Changes held back by the interval reach disk once it has passed, even if no trial reports again."""
        self._write_trials()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._write_trials(force=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._load()
        row = self._trial_row(trial)
        self._refresh_metrics(row)  # a stopped trial's final metrics are its last report's (the row may be behind)
        unreported = row.get("outcome") in (None, "running")
        if unreported:
            row["outcome"] = "stopped"  # ended by the scheduler (early stopping) before its final report
        row["end_time"] = utc_now()
        # an end without a final report is written at once: Tune's record of the trial (result.json) has no final
        # report either, so the resume's repair could not tell that it ended
        self._update(trial, "terminated", now=unreported)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._load()
        row = self._trial_row(trial)
        self._refresh_metrics(row)  # its last report's metrics, before the outcome says it ended
        row["outcome"], error = trial_failure(trial)
        row["error"] = error or row.get("error")
        row["end_time"] = utc_now()
        self._update(trial, "error", now=True)  # no final report either (see on_trial_complete)

    def put_back_steps(self, trial_id: str, evals: list[dict[str, Any]]) -> int:
        """The steps rows of an unfinished trial's evaluations (`evals`, its reports as Tune kept them) that its
        steps file lacks, written; returns how many, or 0 when none was missing or the write failed (the next
        resume tries again). Its trials row is left to Tune, which runs the trial again."""
        steps = self._steps_of(trial_id)
        missing = {int(r["step"]): r for r in evals if int(r["step"]) not in steps}
        for step, result in missing.items():
            steps[step] = steps_row(trial_id, result)
        if missing and not self._write_steps(trial_id):
            return 0
        return len(missing)

    def replay(self, trial: Any, results: list[dict[str, Any]], predictions: Optional[dict[str, list]],
               started: Optional[dt.datetime], ended: Optional[dt.datetime], attempts: int) -> None:
        """Rebuild a finished trial's rows from what Tune kept of it: its reports in order, the predictions of its
        last checkpoint, when it started and ended, and how many times it started (`attempts`; a row that reached
        the disk may have counted more). Tune never reports a finished trial again, so rows the sink could not
        write (a full disk) are otherwise lost for good; keyed as always (trial, step), nothing doubles."""
        self._load()
        for result in results:
            result = dict(result)
            if result.get(KIND_KEY) == "final" and predictions:
                result[PREDICTIONS_KEY] = predictions
            self.on_trial_result(0, [], trial, result)
        row = self._trial_row(trial)
        row["attempts"] = max(attempts, int(row.get("attempts") or 0))
        row["start_time"] = row.get("start_time") or started
        if row.get("outcome") in (None, "running"):
            row["outcome"] = "stopped"  # ended by the scheduler before its final report
        row["end_time"] = row.get("end_time") or ended
        self._update(trial, "terminated")
