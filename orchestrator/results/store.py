"""The results dataset on disk: where each table's files are, and how they are read and written.

The dataset is one Parquet dataset per table (orchestrator.results.schema), each hive-partitioned by sweep:

    RESULTS/trials/sweep=NAME/trials.parquet           one row per trial; one file per sweep
    RESULTS/steps/sweep=NAME/<trial_id>.parquet        one row per report (evaluation); one file per trial
    RESULTS/predictions/sweep=NAME/<trial_id>.parquet  one row per validation sample; one file per trial
    RESULTS/sweeps/sweep=NAME/sweep.parquet            one row: how the sweep was run and where it stands

Every write replaces one whole file atomically (a temporary file in the same folder, then `os.replace`), so a
reader never sees a torn file, and rows are keyed so that a retried trial or a resumed sweep rewrites rather
than appends: `trials` by trial id, `steps` by (trial id, step), `predictions` by (trial id, sample id).
Temporary files start with '.', which pyarrow, pandas, polars and DuckDB globs (`*.parquet`) all skip, and so
does every reader here.

`steps` and `predictions` have a file per trial, so a report's steps row reaches disk when it arrives by
rewriting a few kB. `trials` has one file per sweep: with a file per trial, a query of a 1 000-trial sweep
opened 1 000 files of 120 columns (bench/scale.py). Sweeps written before that kept `<trial_id>.parquet` in
the trials folder; their rows are read with the rest, and move into `trials.parquet` at its next write
(`legacy_trial_files`). A running sweep's driver writes through a `SweepWriter`, which rewrites the trials
file at most every `ROW_INTERVAL_S` seconds; the sink (orchestrator.sweep.sink) says when a row changed and
when a change must reach disk at once. The reads here are one sweep's, for the driver and the commands that act
on a sweep; a query reads the tables across sweeps as Arrow datasets (orchestrator.results.query).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.results.schema import rows_to_table, schema_for, utc_now
from trainer.files import atomic_path

ROW_INTERVAL_S = 1.0  # shortest time between two writes of a sweep's trials file
WRITE_SHARE = 50  # and at least this many times the last write's duration
TRIALS_FILE = "trials.parquet"
SWEEP_FILE = "sweep.parquet"
ENDED = ("terminated", "error")  # Tune statuses of trials that have ended

# Per-trial `steps` files are a few kB, which compression does not shrink (measured: 5.9 kB zstd, 5.7 kB plain
# for 20 steps) but makes twice as slow to write; the trials file is rewritten often; `predictions` compress.
COMPRESSION = {"steps": "none", "trials": "none"}


class ResultsError(ValueError):
    """A results file that cannot be read: the message names it and what to do."""


def partition_dir(root: Path | str, table: str, sweep: str) -> Path:
    """The folder of one sweep's files of `table`."""
    return Path(root) / table / f"sweep={sweep}"


def trial_file(root: Path | str, table: str, sweep: str, trial_id: str) -> Path:
    """One trial's file of a per-trial table (`steps`, `predictions`)."""
    return partition_dir(root, table, sweep) / f"{trial_id}.parquet"


def write_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write `table` to `path` so that readers see the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)


def read_partition(root: Path | str, table: str, sweep: str) -> list[dict[str, Any]]:
    """Every row of one sweep's `table`, as the files hold them (no `sweep` column); none if it has no folder.
    A file that is not Parquet raises `ResultsError`: its rows would be silently missing otherwise."""
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
                rows.extend(read_rows(handle))
        except FileNotFoundError:
            continue
        except (pa.ArrowException, OSError) as e:
            reason = str(e).split(". ")[0]
            raise ResultsError(f"{f}: not readable Parquet ({reason}); restore it from a copy, or move it out of "
                               "the results to go on without its rows") from None
    return rows


def read_trial_rows(root: Path | str, table: str, sweep: str, trial_id: str) -> Optional[list[dict[str, Any]]]:
    """One trial's rows of a per-trial table, to go on writing them (a resumed or restarted trial); None when
    its file is not there or not readable, which the driver must survive (the query says what is wrong)."""
    path = trial_file(root, table, sweep, trial_id)
    if not path.is_file():
        return None
    with contextlib.suppress(OSError, pa.ArrowException):
        with open(path, "rb") as handle:
            return read_rows(handle)
    return None


def read_rows(handle: BinaryIO) -> list[dict[str, Any]]:
    """The rows of one open Parquet file, read whole into memory and decoded on this thread. Arrow's dataset
    reader (`pq.read_table`) hands the reading to its own threads, which call back into the Python file; one
    still alive when the interpreter exits aborts it (SIGABRT, "terminate called without an active
    exception", apache/arrow#34314) after the command has done its work. The tables are small."""
    return pq.ParquetFile(pa.BufferReader(handle.read())).read(use_threads=False).to_pylist()


def write_trial_rows(root: Path | str, table: str, sweep: str, trial_id: str, rows: list[dict[str, Any]]) -> None:
    """Replace one trial's file of a per-trial table with `rows`."""
    write_atomic(rows_to_table(rows, schema_for(table)), trial_file(root, table, sweep, trial_id),
                 COMPRESSION.get(table, "zstd"))


def write_sweep_row(root: Path | str, sweep: str, row: dict[str, Any]) -> None:
    """The one-row `sweeps` table: how the sweep was run and where it stands. `row`'s values that are not None
    replace those already there."""
    existing = read_partition(root, "sweeps", sweep)
    merged = dict(existing[0]) if existing else {}
    merged.update({k: v for k, v in row.items() if v is not None})
    merged["name"] = sweep
    now = utc_now()
    merged.setdefault("created_at", now)
    merged["updated_at"] = now
    write_atomic(rows_to_table([merged], schema_for("sweeps")), partition_dir(root, "sweeps", sweep) / SWEEP_FILE)


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
    rows = {r["trial_id"]: r for r in read_partition(root, "trials", sweep)}  # one per trial, as SweepWriter.load
    rows[trial_id].update(values)
    write_trials_file(root, sweep, rows_to_table(list(rows.values()), schema_for("trials")),
                      legacy_trial_files(root, sweep, set(rows)))


class SweepWriter:
    """A running sweep's writes, as its driver makes them: per-trial files at once, the trials file when due.

    A write that fails with an `OSError` (a full or read-only disk) must not kill the sweep: it is said, the
    first few times, and reported as False; what it would have written stays in memory for the next write, and
    the resume's repair (orchestrator.sweep.repair) rebuilds what never landed from Tune's own record.

    The trials file is rewritten at most every `ROW_INTERVAL_S` (longer when a write has grown to take more
    than 1/`WRITE_SHARE` of the driver's time); a change Tune's record cannot show is written at once
    (`due(force=True)`). The rows of ended trials are kept as an Arrow table, so a rewrite converts only the
    rows that changed; those of trials still running are the caller's, handed in at each write.
    """

    def __init__(self, root: Path | str, sweep: str):
        self.root = root
        self.sweep = sweep
        self.write_errors = 0
        self.dirty = False  # the trials file is behind the rows
        self._ended = rows_to_table([], schema_for("trials"))  # rows of ended trials, already converted
        self._ended_ids: set[str] = set()  # their ids: a trial is looked up without scanning the table
        self._ended_new: dict[str, dict[str, Any]] = {}  # ended since the last write, not yet converted
        self._legacy: list[Path] = []  # per-trial trials files of the earlier layout, to go once their rows moved
        self._written_at = float("-inf")  # monotonic time of the last trials-file write
        self._write_seconds = 0.0  # how long it took

    def _safely(self, table: str, what: str, write: Callable[[], None]) -> bool:
        try:
            write()
            return True
        except OSError as e:
            self.write_errors += 1
            if self.write_errors <= 3:
                print(f"mdsweep: warning: could not write {table} for {what}: {e}")
            return False

    def write_trial(self, table: str, trial_id: str, rows: list[dict[str, Any]]) -> bool:
        """Replace one trial's file of a per-trial table (`steps`, `predictions`) with `rows`."""
        return self._safely(table, trial_id, lambda: write_trial_rows(self.root, table, self.sweep, trial_id, rows))

    def move_trial(self, old: str, new: str) -> None:
        """Give trial `old`'s steps and predictions to trial `new` (Tune restarted an errored trial as a new one):
        written under `new`, then `old`'s files go. An unreadable file, or one whose move failed, stays."""
        for table in ("steps", "predictions"):
            rows = read_trial_rows(self.root, table, self.sweep, old)
            if rows is not None and (not rows or self.write_trial(table, new, [{**r, "trial_id": new} for r in rows])):
                with contextlib.suppress(OSError):
                    trial_file(self.root, table, self.sweep, old).unlink(missing_ok=True)

    def load(self) -> dict[str, dict[str, Any]]:
        """Read back the trials rows an earlier run of the sweep wrote (a resume, a second driver): the ended
        ones are kept here; those of trials that have not ended are returned, by trial id."""
        # by trial id: a driver killed while moving rows out of the one-file-per-trial layout left them twice
        rows = list({r["trial_id"]: r for r in read_partition(self.root, "trials", self.sweep)}.values())
        ended = [r for r in rows if r.get("status") in ENDED]
        self._ended = rows_to_table(ended, schema_for("trials"))
        self._ended_ids = {r["trial_id"] for r in ended}
        self._legacy = legacy_trial_files(self.root, self.sweep, {r["trial_id"] for r in rows})
        self.dirty = bool(self._legacy)  # rows of the one-file-per-trial layout move into the trials file
        return {r["trial_id"]: r for r in rows if r.get("status") not in ENDED}

    def has_ended(self, trial_id: str) -> bool:
        return trial_id in self._ended_ids

    def end(self, row: dict[str, Any]) -> None:
        """Keep the row of a trial that has just ended with the ended ones."""
        self._ended_new[row["trial_id"]] = row
        self._ended_ids.add(row["trial_id"])

    def ended_row(self, trial_id: str, take: bool) -> Optional[dict[str, Any]]:
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

    def errored_rows(self) -> list[dict[str, Any]]:
        """The rows of trials that ended in error: those Tune may restart under a new id."""
        kept = self._ended.filter(pc.equal(self._ended.column("status"), "error")).to_pylist()
        return [r for r in [*self._ended_new.values(), *kept] if r.get("status") == "error"]

    def due(self, force: bool = False) -> bool:
        """Whether a trials row changed and the last write is long enough ago (`force`: whatever the time)."""
        interval = max(ROW_INTERVAL_S, WRITE_SHARE * self._write_seconds)
        return self.dirty and (force or time.monotonic() - self._written_at >= interval)

    def write_trials(self, live: Iterable[dict[str, Any]]) -> bool:
        """Rewrite the trials file with the ended rows and `live`, the rows of trials still running."""
        started = time.monotonic()
        schema = schema_for("trials")
        if self._ended_new:
            self._ended = pa.concat_tables([self._ended, rows_to_table(list(self._ended_new.values()), schema)])
            self._ended = self._ended.combine_chunks()  # one chunk: a chunk per write would slow every later one
            self._ended_new = {}
        table = pa.concat_tables([self._ended, rows_to_table(list(live), schema)])
        written = self._safely("trials", f"sweep {self.sweep}",
                               lambda: write_trials_file(self.root, self.sweep, table, self._legacy))
        if written:
            self.dirty = False
            self._legacy = []
        self._written_at = time.monotonic()
        self._write_seconds = self._written_at - started
        return written
