"""The live progress table (driven like Ray Tune drives callbacks; no cluster)."""
from __future__ import annotations

import io

from orchestrator.cluster.tune_internals import TrialView
from orchestrator.sweep.progress import ProgressTable
from orchestrator.sweep.trainable import KIND_KEY


def test_table_shows_status_params_step_and_metric():
    out = io.StringIO()
    table = ProgressTable("val_exact_match", ["lr", "attention"], interval_s=1, total=3, stream=out)
    a, b, c = (TrialView(f"t{i}", {"lr": 1e-4 * (i + 1), "attention": "prefix", "_group": i}) for i in range(3))
    for t in (a, b, c):
        table.on_trial_start(0, [], t)
    table.on_trial_result(0, [], a, {"step": 20, "val_exact_match": 0.25, KIND_KEY: "eval",
                                     "peak_memory_bytes": 3 * 2**29, "predicted_peak_bytes": 2**31})
    table.on_trial_result(0, [], b, {"step": 10, "val_exact_match": float("nan"), "outcome": "oom", KIND_KEY: "final",
                                     "peak_memory_bytes": 2**30})  # a CPU trial: its RSS, nothing predicted
    table.on_trial_complete(0, [], b)
    table.on_trial_recover(0, [], c)
    table.print_table()
    text = out.getvalue()
    assert "trials of 3: 1 oom, 1 retrying, 1 running" in text
    lines = text.splitlines()
    assert lines[1].split() == ["trial", "status", "lr", "attention", "step", "val_exact_match", "peak", "GiB"]
    assert lines[2].split() == ["t0", "running", "0.0001", "prefix", "20", "0.25", "1.50", "of", "2.00", "predicted"]
    assert lines[3].split() == ["t1", "oom", "0.0002", "prefix", "10", "-", "1.00"]


def test_long_sweeps_show_live_trials_and_the_best_finished():
    out = io.StringIO()
    table = ProgressTable("val_exact_match", ["lr"], interval_s=1, stream=out, max_rows=5)
    for i in range(30):
        t = TrialView(f"t{i:02d}", {"lr": 1e-4})
        table.on_trial_start(0, [], t)
        if i < 27:
            table.on_trial_result(0, [], t, {"step": 4, "val_exact_match": i / 100, "outcome": "ok",
                                             KIND_KEY: "final"})
    table.print_table()
    lines = out.getvalue().splitlines()
    shown = [line.split()[0] for line in lines[2:-1]]
    assert shown == ["t27", "t28", "t29", "t26", "t25"]  # running first, then the best finished
    assert lines[-1] == "... and 25 more finished trial(s)"


def test_quiet_table_prints_nothing():
    out = io.StringIO()
    table = ProgressTable("val_exact_match", ["lr"], interval_s=0, stream=out)
    t = TrialView("t0", {"lr": 1e-4})
    table.on_trial_start(0, [], t)
    table.on_step_end(0, [])
    table.on_experiment_end([])
    assert out.getvalue() == ""


class Clock:
    """time.time for the table, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_table_is_printed_when_it_changed_at_most_every_30_s(monkeypatch):
    """A log holds each changed table once, never a copy, and no more than one per 30 s however many trials change
    state (a thousand-trial sweep changes every second)."""
    clock = Clock()
    monkeypatch.setattr("orchestrator.sweep.progress.time.time", clock)
    out = io.StringIO()
    table = ProgressTable("val_exact_match", ["lr"], interval_s=15, stream=out)
    t = TrialView("t0", {"lr": 1e-4})
    table.on_trial_start(0, [], t)
    table.on_step_end(0, [])                       # the first table: at once
    for _ in range(10):                            # five minutes with nothing new: nothing
        clock.now += 30
        table.on_step_end(0, [])
    assert out.getvalue().count("trials:") == 1
    table.on_trial_result(0, [], t, {"step": 5, "val_exact_match": 0.5, KIND_KEY: "eval"})
    table.on_step_end(0, [])                       # new numbers, 30 s and more since the last table: printed
    assert out.getvalue().count("trials:") == 2
    for i in range(1, 20):                         # trials starting every second: one table per 30 s
        table.on_trial_start(0, [], TrialView(f"t{i}", {"lr": 1e-4}))
        clock.now += 1
        table.on_step_end(0, [])
    assert out.getvalue().count("trials:") == 2
    clock.now += 11
    table.on_step_end(0, [])
    assert out.getvalue().count("trials:") == 3 and out.getvalue().rsplit("trials:", 1)[1].startswith(" 20 running")
    assert "\x1b[" not in out.getvalue()


def test_on_a_terminal_the_table_is_redrawn_in_place(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("orchestrator.sweep.progress.time.time", clock)
    out = Terminal()
    table = ProgressTable("val_exact_match", ["lr"], interval_s=15, stream=out)
    for i in range(2):
        table.on_trial_start(0, [], TrialView(f"t{i}", {"lr": 1e-4}))
    table.on_step_end(0, [])
    first = out.getvalue()
    assert first.startswith("[") and first.count("\n") == 4    # head, column names, two trials
    clock.now += 15
    table.on_step_end(0, [])                       # same content: on a terminal it still refreshes the clock
    assert out.getvalue()[len(first):].startswith("\x1b[4A\x1b[J[")
