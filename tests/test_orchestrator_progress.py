"""The live progress table (driven like Ray Tune drives callbacks; no cluster)."""
from __future__ import annotations

import io
from dataclasses import dataclass

from orchestrator.progress import ProgressTable
from orchestrator.trainable import KIND_KEY


@dataclass
class FakeTrial:
    trial_id: str
    config: dict


def test_table_shows_status_params_step_and_metric():
    out = io.StringIO()
    table = ProgressTable("val_exact_match", ["lr", "attention"], interval_s=1, total=3, stream=out)
    a, b, c = (FakeTrial(f"t{i}", {"lr": 1e-4 * (i + 1), "attention": "prefix", "_group": i}) for i in range(3))
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
        t = FakeTrial(f"t{i:02d}", {"lr": 1e-4})
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
    t = FakeTrial("t0", {"lr": 1e-4})
    table.on_trial_start(0, [], t)
    table.on_step_end(0, [])
    table.on_experiment_end([])
    assert out.getvalue() == ""
