"""A Ray Tune callback that writes the Parquet results dataset as the sweep goes.

Every write replaces one whole file atomically (a temporary file in the same folder, then `os.replace`), so a
reader never sees a torn file, and rows are keyed so that a retried trial or a resumed sweep rewrites rather
than appends: `trials` by trial id, `steps` by (trial id, step), `predictions` by (trial id, sample id). On
start-up the sink reads back what an earlier run of the same sweep wrote (start time, attempts, steps), which is
what makes a resume lose and duplicate nothing.

`steps` and `predictions` have one file per trial, named after it: a report's steps row reaches disk when the
report arrives. `trials` is one file per sweep (`trials.parquet`), rewritten when a row has changed, at most
every `ROW_INTERVAL_S` seconds (longer when the file has grown so that its write would take more than 1/50 of the
driver's time) and at the end of the run: with a file per trial, a query of a 1 000-trial sweep opened 1 000
files of 120 columns (bench/scale.py). The rows of ended trials are kept as an Arrow table, so a rewrite converts
only the rows that changed. A driver killed between rewrites loses at most that interval of trials-row changes,
which the resume's repair rebuilds from Tune's own record (orchestrator.sweep.repair); an end that record cannot
show (a trial stopped by the scheduler or failed, with no final report) is written at once.

Temporary files start with '.', which pyarrow, pandas, polars and DuckDB globs (`*.parquet`) all skip.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.results.objectives import is_finite_number
from orchestrator.results.schema import (
    METADATA_KEY,
    METRICS,
    SCHEMA_VERSION,
    job_field_types,
    rows_to_table,
    schema_for,
    validate_sweep_name,
)
from orchestrator.results.spaces import BASELINE_EXTRA_KEY, BASELINE_KEY, GROUP_KEY, MEMBER_KEY, split_suggestion
from orchestrator.sweep.trainable import JOB_CONFIG_KEY, KIND_KEY, PREDICTIONS_KEY, job_config_from
from trainer.files import atomic_path
from trainer.model.tokenizer_source import TOKENIZER_COLUMNS



ROW_INTERVAL_S = 1.0  # shortest time between two writes of a sweep's trials file
WRITE_SHARE = 50  # and at least this many times the last write's duration
TRIALS_FILE = "trials.parquet"
ENDED = ("terminated", "error")  # statuses of trials that have ended


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _params_json(config: dict[str, Any]) -> str:
    """A trial's suggested parameters as the row keeps them (auxiliary `_` keys left out)."""
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, default=str, sort_keys=True)


def partition_dir(root: Path | str, table: str, sweep: str) -> Path:
    return Path(root) / table / f"sweep={sweep}"


# Per-trial `steps` files are a few kB, which compression does not shrink (measured: 5.9 kB zstd, 5.7 kB plain
# for 20 steps) but makes twice as slow to write; the trials file is rewritten often; `predictions` compress.
COMPRESSION = {"steps": "none", "trials": "none"}


def write_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write `table` to `path` so that readers see the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)


class ResultsError(ValueError):
    """A results file that cannot be read: the message names it and what to do."""


def read_partition(root: Path | str, table: str, sweep: str) -> list[dict[str, Any]]:
    d = partition_dir(root, table, sweep)
    rows: list[dict[str, Any]] = []
    if not d.is_dir():
        return rows
    for f in sorted(d.glob("*.parquet")):
        if f.name.startswith("."):
            continue  # a write in progress
        try:
            # through an open handle: consistent even if the file is replaced meanwhile
            with open(f, "rb") as handle:
                rows.extend(pq.read_table(handle).to_pylist())
        except FileNotFoundError:
            continue
        except (pa.ArrowException, OSError) as e:
            reason = str(e).split(". ")[0]
            raise ResultsError(f"{f}: not readable Parquet ({reason}); restore it from a copy, or move it out of "
                               "the results to go on without its rows") from None
    return rows


def write_sweep_row(root: Path | str, sweep: str, row: dict[str, Any]) -> None:
    """The one-row `sweeps` table: how the sweep was run and where it stands."""
    existing = read_partition(root, "sweeps", sweep)
    merged = dict(existing[0]) if existing else {}
    merged.update({k: v for k, v in row.items() if v is not None})
    merged["name"] = sweep
    merged.setdefault("created_at", _now())
    merged["updated_at"] = _now()
    write_atomic(rows_to_table([merged], schema_for("sweeps")), partition_dir(root, "sweeps", sweep) / "sweep.parquet")


def legacy_trial_files(root: Path | str, sweep: str, trial_ids: set[str]) -> list[Path]:
    """The files of the layout before one trials file per sweep: `<trial id>.parquet`, one per trial. Any other
    file a user put in the folder is not one of them."""
    folder = partition_dir(root, "trials", sweep)
    return [folder / f"{t}.parquet" for t in sorted(trial_ids)
            if f"{t}.parquet" != TRIALS_FILE and (folder / f"{t}.parquet").is_file()]


def write_trials_file(root: Path | str, sweep: str, table: pa.Table, legacy: list[Path]) -> None:
    """Replace the sweep's trials file with `table`; then the `legacy` per-trial files, whose rows it now holds,
    go."""
    write_atomic(table, partition_dir(root, "trials", sweep) / TRIALS_FILE, COMPRESSION["trials"])
    for path in legacy:
        path.unlink(missing_ok=True)


def update_trial_row(root: Path | str, sweep: str, trial_id: str, values: dict[str, Any]) -> None:
    """Add `values` to one trial's row after its run (the held-out test at the end of a sweep)."""
    rows = {r["trial_id"]: r for r in read_partition(root, "trials", sweep)}  # one per trial, as the sink loads
    rows[trial_id].update(values)
    write_trials_file(root, sweep, rows_to_table(list(rows.values()), schema_for("trials")),
                      legacy_trial_files(root, sweep, set(rows)))


def _tune_callback_base():
    from ray.tune import Callback

    return Callback


HOST_OOM_MARKER = "killed due to the node running low on memory"


def host_oom_summary(error: Optional[str]) -> Optional[str]:
    """For a trial Ray's memory monitor killed (the node's host RAM, not the GPU's: outcome `host_oom`), a short
    account of it instead of Ray's page-long message; None for any other error."""
    if not error or HOST_OOM_MARKER not in error:
        return None
    lines = error.splitlines()
    detail = [line.strip() for line in lines if line.startswith(("Memory on the node", "OOM kill reason", "1 worker",
                                                                 "Failure #")) or HOST_OOM_MARKER in line]
    return ("killed by Ray's memory monitor: the node ran low on host memory. Give each trial more host memory "
            "(--memory-per-trial), run fewer at once (--max-concurrent) or raise RAY_memory_usage_threshold on the "
            "nodes.\n" + "\n".join(dict.fromkeys(detail)))


class ParquetSink(_tune_callback_base()):
    """Keeps the trials, steps and predictions tables of one sweep up to date."""

    def __init__(self, results_dir: str, sweep: str, fixed: dict[str, Any], searched: list[str], metric: str,
                 mode: str, max_gpu_memory: Optional[str] = None):
        self.results_dir = str(results_dir)
        self.sweep = validate_sweep_name(sweep)
        self.fixed = dict(fixed)
        self.searched = list(searched)
        self.metric = metric
        self.mode = mode
        self.max_gpu_memory = max_gpu_memory
        self.__dict__.update(self._run_state())
        self.write_errors = 0

    @staticmethod
    def _run_state() -> dict[str, Any]:
        """What the sink holds of one driver run; empty at first, and in the copy Tune pickles, since `_load`
        reads it back from the results."""
        return {
            "_trials": {},  # rows of trials that have not ended
            "_ended": rows_to_table([], schema_for("trials")),  # rows of ended trials, already converted
            "_ended_ids": set(),  # their ids: a new trial is looked up without scanning the table
            "_ended_new": {},  # ended since the last write, not yet converted
            "_steps": {},  # steps rows of trials that have not ended, by trial id and step
            "_dirty": False,  # the trials file is behind the rows
            "_written_at": float("-inf"),  # monotonic time of the last trials-file write
            "_write_seconds": 0.0,  # how long it took
            "_legacy": [],  # per-trial trials files of the earlier layout, to go once their rows moved
            "_loaded": False,
        }

    # --- persistence -------------------------------------------------------
    def __getstate__(self) -> dict:
        return {**self.__dict__, **self._run_state()}

    def _load(self) -> None:
        """Read back the rows an earlier run of this sweep wrote (resume, or a second driver): the ended ones as
        a table, the others to go on with. Their steps are read when their trial comes back."""
        if self._loaded:
            return
        self._loaded = True
        # by trial id: a driver killed while moving rows out of the one-file-per-trial layout left them twice
        rows = list({r["trial_id"]: r for r in read_partition(self.results_dir, "trials", self.sweep)}.values())
        ended = [r for r in rows if r.get("status") in ENDED]
        self._trials = {r["trial_id"]: r for r in rows if r.get("status") not in ENDED}
        self._ended = rows_to_table(ended, schema_for("trials"))
        self._ended_ids = {r["trial_id"] for r in ended}
        self._legacy = legacy_trial_files(self.results_dir, self.sweep, {r["trial_id"] for r in rows})
        self._dirty = bool(self._legacy)  # rows of the one-file-per-trial layout move into the trials file

    def _path(self, table: str, trial_id: str) -> Path:
        return partition_dir(self.results_dir, table, self.sweep) / f"{trial_id}.parquet"

    def _write(self, table: str, trial_id: str, rows: list[dict[str, Any]]) -> bool:
        return self._write_safely(table, trial_id, lambda: write_atomic(
            rows_to_table(rows, schema_for(table)), self._path(table, trial_id), COMPRESSION.get(table, "zstd")))

    def _write_safely(self, table: str, what: str, write: Callable[[], None]) -> bool:
        try:
            write()
            return True
        except OSError as e:  # a full disk must not kill the sweep; say so, a few times
            self.write_errors += 1
            if self.write_errors <= 3:
                print(f"mdsweep: warning: could not write {table} for {what}: {e}")
            return False

    def _write_trials(self, force: bool = False) -> bool:
        """Rewrite the sweep's trials file if a row changed and the last write is long enough ago (`force`: now).
        False when a write was due but failed."""
        if not self._dirty:
            return True
        interval = max(ROW_INTERVAL_S, WRITE_SHARE * self._write_seconds)
        if not force and time.monotonic() - self._written_at < interval:
            return True
        started = time.monotonic()
        schema = schema_for("trials")
        if self._ended_new:
            self._ended = pa.concat_tables([self._ended, rows_to_table(list(self._ended_new.values()), schema)])
            self._ended = self._ended.combine_chunks()  # one chunk: a chunk per write would slow every later one
            self._ended_new = {}
        for row in self._trials.values():
            self._refresh_metrics(row)
        table = pa.concat_tables([self._ended, rows_to_table(list(self._trials.values()), schema)])
        written = self._write_safely("trials", f"sweep {self.sweep}", lambda: write_trials_file(
            self.results_dir, self.sweep, table, self._legacy))
        if written:
            self._dirty = False
            self._legacy = []
        self._written_at = time.monotonic()
        self._write_seconds = self._written_at - started
        return written

    def flush(self) -> bool:
        """Write the trials file now if a row changed (the resume's repair, which no interval will follow)."""
        return self._write_trials(force=True)

    def _steps_of(self, trial_id: str) -> dict[int, dict[str, Any]]:
        """A live trial's steps rows by step; read back from its file the first time (a resumed or rerun trial)."""
        steps = self._steps.get(trial_id)
        if steps is None:
            steps = {}
            path = self._path("steps", trial_id)
            if path.is_file():
                with contextlib.suppress(OSError, pa.ArrowException):
                    with open(path, "rb") as handle:
                        steps = {int(r["step"]): r for r in pq.read_table(handle).to_pylist()
                                 if r.get("step") is not None}
            self._steps[trial_id] = steps
        return steps

    def _ended_row(self, trial_id: str, take: bool) -> Optional[dict[str, Any]]:
        """An ended trial's row (`take`: taken out of the ended rows, as the trial runs again)."""
        if trial_id in self._ended_new:
            if not take:
                return self._ended_new[trial_id]
            self._ended_ids.discard(trial_id)
            return self._ended_new.pop(trial_id)
        if trial_id not in self._ended_ids:
            return None
        match = pc.equal(self._ended.column("trial_id"), trial_id)
        found = self._ended.filter(match).to_pylist()
        if found and take:
            self._ended = self._ended.filter(pc.invert(match))
            self._ended_ids.discard(trial_id)
        return found[0] if found else None

    # --- rows --------------------------------------------------------------
    def _trial_row(self, trial: Any) -> dict[str, Any]:
        """The row of a trial that is running or about to; an ended trial that comes back (a replay, a rerun of
        an errored trial) brings its row back from the ended ones."""
        row = self._trials.get(trial.trial_id)
        if row is None:
            row = self._ended_row(trial.trial_id, take=True)
            if row is not None:
                self._trials[trial.trial_id] = row
        if row is None:
            params, meta = split_suggestion(dict(trial.config))
            row = {"trial_id": trial.trial_id, "outcome": "running", "attempts": 0, "num_failures": 0}
            types_ = job_field_types()
            # what the trial will run, until it reports what it ran (JOB_CONFIG_KEY): the same reading; a config
            # JobConfig rejects fails in the trial, which says why, and must not stop the sink
            with contextlib.suppress(ValueError):
                row.update(job_config_from(self.fixed, trial.config).to_dict())
            if self.max_gpu_memory and row.get("max_gpu_memory") is None:
                row["max_gpu_memory"] = self.max_gpu_memory
            row["searched"] = sorted(k for k in params if k in types_ and k not in (meta.get(BASELINE_EXTRA_KEY) or ()))
            row["baseline"] = meta.get(BASELINE_KEY)
            row["params_json"] = _params_json(trial.config)
            row["group_id"] = meta.get(GROUP_KEY)
            row["member"] = meta.get(MEMBER_KEY)
            row["objective_metric"], row["objective_mode"] = self.metric, self.mode
            self._trials[trial.trial_id] = row
        return row

    def _take_restarted_row(self, trial: Any, trials: list) -> None:
        """`resume --restart-errored`: Tune restarts an errored trial as a new trial (a new id, the same config)
        and drops the old one from its list. The old id's row and steps become the new id's, so the tables keep
        one row per trial, its attempts counted, and no row of a trial Tune no longer knows."""
        tid = trial.trial_id
        if tid in self._trials or tid in self._ended_ids:
            return
        live = {t.trial_id for t in trials}
        params, meta = _params_json(trial.config), split_suggestion(dict(trial.config))[1]
        candidates = list(self._ended_new.values()) + self._ended.filter(
            pc.equal(self._ended.column("status"), "error")).to_pylist()
        old = next((r["trial_id"] for r in candidates
                    if r.get("status") == "error" and r["trial_id"] not in live and r.get("params_json") == params
                    and r.get("group_id") == meta.get(GROUP_KEY) and r.get("member") == meta.get(MEMBER_KEY)), None)
        if old is None:
            return
        row = self._ended_row(old, take=True)
        row["trial_id"] = tid
        self._trials[tid] = row
        steps = {step: {**r, "trial_id": tid} for step, r in self._steps_of(old).items()}
        self._steps.pop(old, None)
        self._steps[tid] = steps
        if not steps or self._write("steps", tid, [steps[s] for s in sorted(steps)]):
            with contextlib.suppress(OSError):
                self._path("steps", old).unlink(missing_ok=True)
        self._rekey_predictions(old, tid)

    def _rekey_predictions(self, old: str, new: str) -> None:
        """Move an errored attempt's predictions (if it left any) to the id its restart runs under."""
        path = self._path("predictions", old)
        if not path.is_file():
            return
        with contextlib.suppress(OSError, pa.ArrowException):
            with open(path, "rb") as handle:
                rows = [{**r, "trial_id": new} for r in pq.read_table(handle).to_pylist()]
            if self._write("predictions", new, rows):
                path.unlink()

    def _refresh_metrics(self, row: dict[str, Any]) -> None:
        steps = self._steps_of(row["trial_id"])
        row["n_reports"] = len(steps)
        if not steps:
            return
        ordered = [steps[s] for s in sorted(steps)]
        scored = [r for r in ordered if is_finite_number(r.get(self.metric))]
        if scored:
            best = scored[0]
            for r in scored[1:]:  # strictly better only: ties go to the earlier step
                if (r[self.metric] > best[self.metric]) if self.mode == "max" else (r[self.metric] < best[self.metric]):
                    best = r
            for m in METRICS:
                row[f"best_{m}"] = best.get(m)
        last = ordered[-1]
        if row.get("outcome") == "running":
            for m in METRICS:
                row[f"final_{m}"] = last.get(m)
        row["steps_completed"] = max(row.get("steps_completed") or 0, last.get("step") or 0)
        peaks = [r.get("peak_memory_bytes") for r in ordered if r.get("peak_memory_bytes") is not None]
        if peaks:
            row["peak_memory_bytes"] = max([*peaks, row.get("peak_memory_bytes") or 0])

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
            self._ended_new[trial.trial_id] = self._trials.pop(trial.trial_id)
            self._ended_ids.add(trial.trial_id)
            self._steps.pop(trial.trial_id, None)
        self._dirty = True
        self._write_trials(force=now)

    # --- Tune callback hooks --------------------------------------------------
    def setup(self, stop: Any = None, num_samples: Any = None, total_num_samples: Any = None, **info: Any) -> None:
        self._load()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._load()
        self._take_restarted_row(trial, trials)
        row = self._trial_row(trial)
        row["attempts"] = int(row.get("attempts") or 0) + 1
        row["start_time"] = row.get("start_time") or _now()
        row["end_time"] = None
        row["wall_time_s"] = None
        row["outcome"] = "running"
        row["error"] = None
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
        # where the trial ran, what memory it was predicted, and the cap it ran under (set in the trial with auto);
        # a new placement is written at once, so the table says where a trial runs as soon as it reports
        placed = result.get("node_id") not in (None, "", row.get("node_id"))
        for k in ("node_id", "node_ip", "hostname", "gpu_ids", "predicted_peak_bytes", "max_gpu_memory"):
            if result.get(k) not in (None, ""):
                row[k] = result[k]
        if result.get("restored_from_step") is not None:
            row["restored_from_step"] = result["restored_from_step"]
        kind = result.get(KIND_KEY, "eval")
        step = result.get("step")
        tid = trial.trial_id
        if kind == "eval" and step is not None:
            step_row = {m: result.get(m) for m in METRICS}
            step_row.update(trial_id=tid, step=int(step), training_iteration=result.get("training_iteration"),
                            report_time=_now())
            steps = self._steps_of(tid)
            steps[int(step)] = step_row
            self._write("steps", tid, [steps[s] for s in sorted(steps)])
        elif kind == "final":
            self._refresh_metrics(row)  # the last evaluation's metrics, while the row still says running
            final_step = int(step or 0)
            steps = self._steps_of(tid)
            stale = [s for s in steps if s > final_step]
            if stale:  # rows of an earlier attempt beyond where this one ended
                for s in stale:
                    del steps[s]
                self._write("steps", tid, [steps[s] for s in sorted(steps)])
            row["outcome"] = result.get("outcome") or "error"
            row["error"] = result.get("job_error") or None
            row["steps_completed"] = final_step
            for m in METRICS:
                v = result.get(m)
                # NaN is kept where it is a measurement (a diverged loss), dropped where it
                # only stands for "never evaluated" (the trainable's placeholder)
                if v is not None and (is_finite_number(v) or m in ("train_loss", "grad_norm")):
                    row[f"final_{m}"] = v
            value = result.get(self.metric)
            row["objective"] = float(value) if is_finite_number(value) and row["outcome"] == "ok" else None
            if result.get("peak_memory_bytes") is not None:
                row["peak_memory_bytes"] = max(int(result["peak_memory_bytes"]), int(row.get("peak_memory_bytes") or 0))
            row["job_wall_time_s"] = result.get("job_wall_time_s")
            row.update({k: result[k] for k in TOKENIZER_COLUMNS if result.get(k) is not None})
            if predictions and predictions.get("sample_id"):
                n = len(predictions["sample_id"])
                pred_rows = [{"trial_id": tid, "step": final_step, **{k: predictions[k][i] for k in predictions}}
                             for i in range(n)]
                self._write("predictions", tid, pred_rows)
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
        row["end_time"] = _now()
        # an end without a final report is written at once: Tune's record of the trial (result.json) has no final
        # report either, so the resume's repair could not tell that it ended
        self._update(trial, "terminated", now=unreported)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._load()
        row = self._trial_row(trial)
        self._refresh_metrics(row)  # its last report's metrics, before the outcome says it ended
        text = self._error_text(trial)
        host_oom = host_oom_summary(text)
        row["outcome"] = "host_oom" if host_oom else "error"
        row["error"] = host_oom or (text[-4000:] if text else row.get("error"))
        row["end_time"] = _now()
        self._update(trial, "error", now=True)  # no final report either (see on_trial_complete)

    # --- repair ------------------------------------------------------------
    def misses(self, trial_id: str, eval_steps: set[int], predicted: bool) -> bool:
        """Whether the tables lack part of a finished trial: its final row, a report, or (`predicted`: it ended
        with predictions) its predictions."""
        self._load()
        row = self._trials.get(trial_id) or self._ended_row(trial_id, take=False)
        if row is None or row.get("outcome") in (None, "running") or row.get("status") != "terminated":
            return True
        if not eval_steps <= set(self._steps_of(trial_id)):
            return True
        return predicted and not self._path("predictions", trial_id).is_file()

    def replay(self, trial: Any, results: list[dict[str, Any]], predictions: Optional[dict[str, list]],
               ended: Optional[dt.datetime], attempts: int) -> None:
        """Rebuild a finished trial's rows from what Tune kept of it: its reported results in order, the
        predictions of its last checkpoint, and how many times it started (`attempts`, from its record; a row
        that reached the disk may have counted more). Tune never reports a finished trial again, so rows the sink
        could not write (a full disk) are otherwise lost for good; keyed as always (trial, step), nothing doubles."""
        self._load()
        for result in results:
            result = dict(result)
            if result.get(KIND_KEY) == "final" and predictions:
                result[PREDICTIONS_KEY] = predictions
            self.on_trial_result(0, [], trial, result)
        row = self._trial_row(trial)
        row["attempts"] = max(attempts, int(row.get("attempts") or 0))
        if results and row.get("start_time") is None:
            first = results[0]
            started = float(first.get("timestamp") or 0) - float(first.get("time_total_s") or 0)
            row["start_time"] = dt.datetime.fromtimestamp(started, dt.timezone.utc) if started > 0 else None
        if row.get("outcome") in (None, "running"):
            row["outcome"] = "stopped"  # ended by the scheduler before its final report
        row["end_time"] = row.get("end_time") or ended
        self._update(trial, "terminated")

    @staticmethod
    def _error_text(trial: Any) -> Optional[str]:
        """The trial's error file: every failure, the latest last."""
        path = getattr(trial, "error_file", None)
        try:
            if path and Path(path).is_file():
                return Path(path).read_text(errors="replace").strip()
        except OSError:
            pass
        return None


__all__ = ["ParquetSink", "write_atomic", "read_partition", "write_sweep_row", "write_trials_file", "partition_dir",
           "SCHEMA_VERSION", "METADATA_KEY"]
