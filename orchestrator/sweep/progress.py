"""A compact live progress table, printed by the driver while the sweep runs."""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional, TextIO

from ray.tune import Callback

from orchestrator.results.spaces import split_suggestion
from orchestrator.sweep.trainable import KIND_KEY


def _gib(n: Any) -> str:
    return f"{n / 2**30:.2f}" if isinstance(n, (int, float)) and n else "-"


def _peak(measured: Any, predicted: Any) -> str:
    """The measured peak, with the memory model's prediction beside it where there is one (GPU trials)."""
    return f"{_gib(measured)} of {_gib(predicted)} predicted" if predicted else _gib(measured)


def _short(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}"
    return "-" if v is None else str(v)


# Off a terminal (a log file, CI) a table is printed only when it changed, and at most this often: the log holds
# no copies, and a thousand-trial sweep, whose trials change state every second, does not flood it.
LOG_INTERVAL_S = 30.0


class ProgressTable(Callback):
    """One line per trial: redrawn in place on a terminal every `interval_s` seconds and on every change of
    state; off a terminal, printed only when something changed, at most every 30 s. `interval_s` 0: never
    printed (`--quiet`); a resumed sweep gets a new table from the resuming command, so its choice holds."""

    def __init__(self, metric: str, searched: list[str], interval_s: float = 15.0, total: Optional[int] = None,
                 stream: Optional[TextIO] = None, mode: str = "max", max_rows: int = 20, redraw: bool = True):
        self.metric = metric
        self.mode = mode
        self.max_rows = max_rows
        self.searched = list(searched)
        self.interval_s = interval_s
        self.total = total
        self._stream = stream
        self._last_print = 0.0
        self._state: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self.redraw = redraw
        self._last_body: Optional[str] = None
        self._lines_drawn = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stream"] = None
        state["_state"] = {}
        state["_last_body"], state["_lines_drawn"] = None, 0
        return state

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def _entry(self, trial: Any) -> dict[str, Any]:
        e = self._state.get(trial.trial_id)
        if e is None:
            params, _ = split_suggestion(dict(trial.config))
            e = {"params": params, "status": "pending", "step": None, "value": None, "best": None,
                 "peak": None, "predicted": None}
            self._state[trial.trial_id] = e
        return e

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._entry(trial)["status"] = "running"
        self._dirty = True

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        e = self._entry(trial)
        e["step"] = result.get("step", e["step"])
        e["peak"] = result.get("peak_memory_bytes") or e["peak"]
        e["predicted"] = result.get("predicted_peak_bytes") or e["predicted"]
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            e["value"] = v
        if result.get(KIND_KEY) == "final":
            e["status"] = result.get("outcome", "done")
            self._dirty = True

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        e = self._entry(trial)
        if e["status"] == "running":
            e["status"] = "stopped"
        self._dirty = True

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._entry(trial)["status"] = "error"
        self._dirty = True

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._entry(trial)["status"] = "retrying"
        self._dirty = True

    def _on_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.interval_s <= 0:
            return
        now = time.time()
        since = now - self._last_print
        if self._on_terminal():
            due = since >= self.interval_s or (self._dirty and since > 2)
        else:
            due = since >= max(self.interval_s, LOG_INTERVAL_S) and self._body() != self._last_body
        if not due:
            return
        self._last_print = now
        self._dirty = False
        self.print_table()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.interval_s > 0:
            self.print_table()

    def print_table(self) -> None:
        """Print the table; on a terminal, over the one printed last."""
        body = self._body()
        if body is None:
            return
        text = f"[{time.strftime('%H:%M:%S')}] {body}"
        if self.redraw and self._lines_drawn and self._on_terminal():
            text = f"\x1b[{self._lines_drawn}A\x1b[J" + text  # up over the last table, clear to the end
        print(text, file=self.stream, flush=True)
        self._last_body = body
        self._lines_drawn = body.count("\n") + 1

    def _body(self) -> Optional[str]:
        """The table without its time stamp (None before any trial), so an unchanged one is seen as such."""
        if not self._state:
            return None
        counts: dict[str, int] = {}
        for e in self._state.values():
            counts[e["status"]] = counts.get(e["status"], 0) + 1
        head = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        total = f" of {self.total}" if self.total else ""
        lines = [f"trials{total}: {head}"]
        cols = ["trial", "status", *self.searched, "step", self.metric, "peak GiB"]
        items = sorted(self._state.items())
        hidden = 0
        if len(items) > self.max_rows:
            # the live ones, then the best finished ones
            live = [(t, e) for t, e in items if e["status"] in ("running", "pending", "retrying")]
            done = [(t, e) for t, e in items if e["status"] not in ("running", "pending", "retrying")]
            done.sort(key=lambda te: (te[1]["value"] is None, -(te[1]["value"] or 0) if self.mode == "max"
                                      else (te[1]["value"] or 0)))
            keep = live + done[:max(0, self.max_rows - len(live))]
            hidden = len(items) - len(keep)
            items = keep
        rows = []
        for tid, e in items:
            rows.append([tid, e["status"], *(_short(e["params"].get(p)) for p in self.searched), _short(e["step"]),
                         _short(e["value"]), _peak(e["peak"], e["predicted"])])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)
        if hidden:
            lines.append(f"... and {hidden} more finished trial(s)")
        return "\n".join(lines)
