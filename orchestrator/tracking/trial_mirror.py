"""What every `--log-to` tracker shares: one run per trial, found again after a retry or a resume, each evaluation
logged once at its `samples_seen`, and a tracker that fails mid-sweep warned about once and then left alone.

A tracker holds a copy; the Parquet results are the sweep's record. So a tracker that stops working (its server
down, its disk full) must not end the sweep or lose a row: its error becomes one warning line naming the flag, and
the tracker is skipped for the rest of the process. Nor may a tracker slow the sweep: Ray Tune calls its callbacks
on the driver's one loop, and a trial's run costs MLflow's SQLite store about 0.6 s and W&B about 0.3 s
(start, 20 evaluations, end; bench/scale.py), so every call goes to the tracker's own writer thread, in order,
and the sweep waits for it only at its end (or at the process's exit, after Ctrl-C), as long as it makes
progress. Subclasses only say how their tracker opens, writes and ends
a run; `MirrorCallback` (orchestrator.tracking.tune_callback) feeds them from Ray Tune, and `mdsweep train` feeds
one run directly.
"""
from __future__ import annotations

import atexit
import math
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.job_config import REPORT_METRICS

# the evaluation's numbers: every reported metric that is a number, but the step counters used as the x axis
LOGGED = [m for m, spec in REPORT_METRICS.items() if spec.type in (int, float) and m not in ("step", "samples_seen")]
TRIAL_TAG = "mdsweep.trial_id"
STUCK_AFTER_S = 120.0  # a tracker that finishes no queued call for this long is left behind at the sweep's end


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
        self._calls: Optional[queue.Queue] = None  # what the writer thread has still to do, in order
        self._writer: Optional[threading.Thread] = None
        self._done = 0  # calls the writer has finished: shutdown waits while this moves

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the experiment; clients, runs and the writer are made again after a
        resume."""
        return {**self.__dict__, **self.transient_state(), "failed": None, "_runs": {}, "_logged": {},
                "_calls": None, "_writer": None}

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

    def tag_best(self, run: Any, report: Optional[Path]) -> None:
        """Mark the sweep's best run, with the sweep's HTML report attached where the tracker keeps files."""
        raise NotImplementedError

    def running(self, run: Any) -> None:
        """Mark the run as running again (a retried or resumed trial starts); most trackers need nothing."""

    def connect(self) -> None:
        """Open the tracker's store before any trial runs, in the caller: a store made on first use (MLflow's
        tables) would otherwise be made by the writer thread while training runs, and a crash then would leave
        it half made. Most trackers need nothing."""

    def close(self) -> None:
        """Release what the tracker holds open when the sweep ends (writers, service processes)."""

    # what the callers use: `prepare` once, in the caller; the others queue their work for the writer thread and
    # return at once
    def prepare(self) -> None:
        self._guarded(self.connect)

    def start(self, trial_id: str, settings: dict[str, Any]) -> None:
        self._submit(lambda: self.running(self._run(trial_id, settings)))

    def log(self, trial_id: str, settings: dict[str, Any], result: dict[str, Any]) -> None:
        """One evaluation's metrics at its samples_seen, unless the run holds them already (a resumed trial
        evaluates again from its checkpoint)."""
        if result.get("samples_seen") is None:
            return
        step, metrics = int(result["samples_seen"]), evaluation_metrics(result)

        def write() -> None:
            run = self._run(trial_id, settings)
            if step not in self._logged[trial_id]:
                self.write(run, step, metrics)
                self._logged[trial_id].add(step)

        self._submit(write)

    def end(self, trial_id: str, settings: dict[str, Any], outcome: str) -> None:
        self._submit(lambda: self.finish(self._run(trial_id, settings), outcome))

    def best(self, trial_id: str, settings: dict[str, Any], report: Optional[Path] = None) -> None:
        self._submit(lambda: self.tag_best(self._run(trial_id, settings), report))

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until every call made so far is done (or skipped, after a failure); False on a timeout."""
        done = threading.Event()
        self._submit(done)
        return done.wait(timeout_s)

    def shutdown(self) -> None:
        """Write what is queued, release the tracker, and end the writer thread. A long queue is said in a line;
        a tracker that finishes no call for STUCK_AFTER_S is left behind with a warning, so that a hung server
        cannot hold the sweep's end."""
        if self._writer is None:
            return
        self._submit(self.close)
        self._calls.put(None)
        if (queued := self._calls.qsize()) >= 1000:
            print(f"mdsweep: --log-to {self.flag}: writing the {queued} calls still queued ...", file=sys.stderr,
                  flush=True)
        done, idle_s = self._done, 0.0
        while self._writer.is_alive() and idle_s < STUCK_AFTER_S:
            self._writer.join(1.0)
            done, idle_s = self._done, (idle_s + 1.0 if self._done == done else 0.0)
        if self._writer.is_alive():
            self._warn(f"no write finished for {STUCK_AFTER_S:.0f} s; the rest is left unwritten")
        self._writer, self._calls = None, None

    def _run(self, trial_id: str, settings: dict[str, Any]) -> Any:
        if trial_id not in self._runs:
            self._runs[trial_id], self._logged[trial_id] = self.open_run(trial_id, f"{self.sweep}/{trial_id}",
                                                                         settings)
        return self._runs[trial_id]

    def _submit(self, call: Callable[[], Any] | threading.Event) -> None:
        if self._writer is None:
            self._calls = queue.Queue()
            self._writer = threading.Thread(target=self._write_calls, args=(self._calls,), daemon=True,
                                            name=f"mdsweep-{self.kind}")
            self._writer.start()
            atexit.register(self.shutdown)  # a sweep ended by Ctrl-C still writes what it queued
        self._calls.put(call)

    def _write_calls(self, calls: queue.Queue) -> None:
        while (call := calls.get()) is not None:
            if isinstance(call, threading.Event):
                call.set()  # a flush's marker, set even after a failure
            elif self.failed is None:
                self._guarded(call)
            self._done += 1

    def _guarded(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - any tracker error: the sweep goes on without the copy
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            self._warn(f"{self.failed}; this process logs nothing more there")

    def _warn(self, what: str) -> None:
        print(f"mdsweep: warning: --log-to {self.flag}: {what} (the sweep goes on, and its Parquet results keep "
              "every row)", file=sys.stderr, flush=True)
