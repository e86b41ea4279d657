"""`mdsweep resume` puts back the rows of trials that never reached the results.

When the results disk fills up (or goes read-only) mid-sweep, the trials go on and finish in Ray Tune, but
the sink cannot write their rows; Tune will never report those trials again. A trial the sweep's interruption cut
is resumed from its last checkpoint and reports only what comes after it, so the rows of its earlier evaluations
that the disk refused would be lost too; they are put back from the same record. What Tune kept of each trial is
enough to rebuild them: `result.json` in the trial's folder holds every report it made (the evaluations and
the final outcome), `params.json` its suggestion, and its last checkpoint the final evaluation's predictions.
Each finished trial the tables (orchestrator.results.store) miss anything of is replayed through the sink
(the driver hands it the sweep's ParquetSink), so its rows are exactly what the sink would have written; rows already
there are not doubled.
Tune's file names and report keys come from orchestrator.cluster.tune_internals.
Local storage only: on object storage the experiment folder is not read here.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Protocol

from orchestrator.cluster.connect import is_remote_storage
from orchestrator.cluster.tune_internals import (CHECKPOINT_PREFIX, PARAMS_FILE, REPORT_ITERATIONS_SINCE_RESTORE,
                                                 REPORT_TIME_TOTAL_S, REPORT_TIMESTAMP, RESULT_FILE, TRIAL_DIR_PREFIX,
                                                 trial_id_of_dir)
from orchestrator.results.store import read_partition, read_trial_rows, trial_file
from orchestrator.sweep.trainable import KIND_KEY, predictions_columns


def trial_reports(trial_dir: Path) -> list[dict[str, Any]]:
    """Every report the trial made, in order, as Tune recorded them."""
    path = trial_dir / RESULT_FILE
    if not path.is_file():
        return []
    reports = []
    for line in path.read_text().splitlines():
        try:
            reports.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill: the rest is still good
    return reports


def finished_reports(trial_dir: Path) -> Optional[list[dict[str, Any]]]:
    """The trial's reports, in order, if it finished (its final report is among them); else None."""
    reports = trial_reports(trial_dir)
    return reports if finished(reports) else None


def finished(reports: list[dict[str, Any]]) -> bool:
    """Whether the trial's final report is among its reports."""
    return any(r.get(KIND_KEY) == "final" for r in reports)


def evaluations(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in reports if r.get(KIND_KEY, "eval") == "eval" and r.get("step") is not None]


def starts(reports: list[dict[str, Any]]) -> int:
    """How many times the trial started (the first run, retries, resumes), as the trials table counts them: Tune
    sets `iterations_since_restore` back to 1 in the first report after each start. A start cut before its first
    report leaves no trace, so this is a floor; a finished trial started at least once."""
    return max(1, sum(1 for r in reports if r.get(REPORT_ITERATIONS_SINCE_RESTORE) == 1))


def last_checkpoint(trial_dir: Path) -> Optional[Path]:
    found = sorted(trial_dir.glob(f"{CHECKPOINT_PREFIX}*"))
    return found[-1] if found else None


def checkpoint_predictions(checkpoint: Optional[Path], step: int) -> Optional[dict[str, list]]:
    """The predictions of the evaluation at `step`, from a job checkpoint taken there; None otherwise."""
    from trainer.checkpoint import TrainState

    if checkpoint is None or not TrainState.exists(checkpoint):
        return None
    state = TrainState.load(checkpoint)
    if state.progress.step != step or not state.predictions:
        return None
    return predictions_columns(state.predictions)


def misses(results: str, sweep: str, trial_id: str, row: Optional[dict[str, Any]], steps: set[int],
           predicted: bool) -> bool:
    """Whether the tables lack part of a finished trial: its final trials `row` (as read back), a report (`steps`,
    those of its evaluations), or (`predicted`: it ended with predictions) its predictions."""
    if row is None or row.get("outcome") in (None, "running") or row.get("status") != "terminated":
        return True
    written = {r.get("step") for r in read_trial_rows(results, "steps", sweep, trial_id) or []}
    if not steps <= written:
        return True
    return predicted and not trial_file(results, "predictions", sweep, trial_id).is_file()


def started_at(report: dict[str, Any]) -> Optional[dt.datetime]:
    """When the trial started, from its first report (Tune's `timestamp` less the time it had run)."""
    started = float(report.get(REPORT_TIMESTAMP) or 0) - float(report.get(REPORT_TIME_TOTAL_S) or 0)
    return dt.datetime.fromtimestamp(started, dt.timezone.utc) if started > 0 else None


class RowReplayer(Protocol):
    """What the repair needs of the sweep's sink (`ParquetSink`, which the driver hands it): where its rows go, the
    replay of one finished trial through the same code that writes live rows, and a flush of the trials file."""
    results_dir: str
    sweep: str

    def replay(self, trial: Any, results: list[dict[str, Any]], predictions: Optional[dict[str, list]],
               started: Optional[dt.datetime], ended: Optional[dt.datetime], attempts: int) -> None: ...

    def put_back_steps(self, trial_id: str, evals: list[dict[str, Any]]) -> int: ...

    def flush(self) -> bool: ...


def repair_missing_rows(sink: RowReplayer, experiment_path: str) -> list[str]:
    """Replay every finished trial the tables miss part of; returns their ids."""
    if is_remote_storage(experiment_path):
        return []
    # by trial id, as the sink reads them back
    rows = {r["trial_id"]: r for r in read_partition(sink.results_dir, "trials", sink.sweep)}
    repaired = []
    for trial_dir in sorted(Path(experiment_path).glob(f"{TRIAL_DIR_PREFIX}*")):
        reports = finished_reports(trial_dir)
        if reports is None:
            continue  # unfinished: Tune runs it again, and the sink writes its rows then
        trial_id = trial_id_of_dir(trial_dir.name)
        final = next(r for r in reversed(reports) if r.get(KIND_KEY) == "final")
        evals = evaluations(reports)
        predicted = final.get("outcome") == "ok"
        if not misses(sink.results_dir, sink.sweep, trial_id, rows.get(trial_id), {int(r["step"]) for r in evals},
                      predicted):
            continue
        checkpoint = last_checkpoint(trial_dir)
        params = json.loads((trial_dir / PARAMS_FILE).read_text()) if (trial_dir / PARAMS_FILE).is_file() else {}
        trial = SimpleNamespace(trial_id=trial_id, config=params, num_failures=None,
                                checkpoint=SimpleNamespace(path=str(checkpoint)) if checkpoint else None)
        predictions = checkpoint_predictions(checkpoint, int(final.get("step") or 0)) if predicted else None
        ended = dt.datetime.fromtimestamp(float(final[REPORT_TIMESTAMP]), dt.timezone.utc) \
            if final.get(REPORT_TIMESTAMP) else None
        sink.replay(trial, reports, predictions, started_at(reports[0]), ended, starts(reports))
        repaired.append(trial_id)
    return repaired if sink.flush() else []  # rows left unwritten are not put back: the next resume tries again


def repair_interrupted_steps(sink: RowReplayer, experiment_path: str) -> dict[str, int]:
    """Put back the steps rows of every unfinished trial's evaluations that the tables miss; returns how many, by
    trial id. Tune runs the trial again from its checkpoint and the sink writes its later rows then; a row this
    puts back for a step after that checkpoint is replaced when the step reports again."""
    if is_remote_storage(experiment_path):
        return {}
    put_back = {}
    for trial_dir in sorted(Path(experiment_path).glob(f"{TRIAL_DIR_PREFIX}*")):
        reports = trial_reports(trial_dir)
        if finished(reports):
            continue  # repair_missing_rows replays it whole
        trial_id = trial_id_of_dir(trial_dir.name)
        count = sink.put_back_steps(trial_id, evaluations(reports))
        if count:
            put_back[trial_id] = count
    return put_back
