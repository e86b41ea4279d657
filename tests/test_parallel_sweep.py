"""A sweep whose trials each run on two Ray Train workers (`mdsweep run --workers-per-trial 2`, issue 31).

The same 2-trial sweep runs on one worker per trial and on two, on an embedded Ray of 3 logical CPUs: a 2-worker
trial needs 2 x 1 CPU and 0.25 for its driver, so only one fits at a time, and the second trial's workers can
start only once the first trial's have let go of their CPUs (Ray issue #54305). Each trial must train on the
samples of one worker and give its losses, and its checkpoint, written by rank 0, must be the one Tune holds.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from harness import job_flags, mdsweep, short_temp_dir
from orchestrator.results.store import read_partition

pytestmark = pytest.mark.slow  # two sweeps on real Ray clusters

SETTINGS = ["--space", "smoke", "--num-samples", "2", "--search-seed", "3", "--num-cpus", "3", "--cpus-per-trial",
            "1", "--progress-interval", "0", "--quiet"]


def _sweep(tmp: Path, name: str, data: Path, *extra: str, temp: Path) -> dict[tuple, dict]:
    """Run a sweep of SETTINGS to its end, its Ray's session under `temp`; its trials rows by their settings, each
    with its steps and predictions."""
    done = mdsweep("run", "--name", name, "--storage", str(tmp / "sweeps"), "--results", str(tmp / "results"),
                   *SETTINGS, *job_flags(data, 4), *extra, env={"TMPDIR": str(temp)}, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = {}
    for row in read_partition(tmp / "results", "trials", name):
        for table in ("steps", "predictions"):
            row[table] = sorted((r for r in read_partition(tmp / "results", table, name)
                                 if r["trial_id"] == row["trial_id"]), key=lambda r: (r["step"], r.get("sample_id")))
        trials[(row["lr"], row["grad_accum"], row["attention"])] = row
    return trials


def _left(temp: Path) -> list[int]:
    """The processes of a Ray session under `temp` still running (Ray's processes name their session's folder)."""
    time.sleep(1)
    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or ())]


def test_a_sweep_on_two_workers_per_trial_matches_one_and_leaves_nothing_running(captcha_parquet, tmp_path):
    timings = {}
    with short_temp_dir("mdq") as temp:
        started = time.perf_counter()
        one = _sweep(tmp_path, "one", captcha_parquet, temp=temp)
        timings[1] = time.perf_counter() - started
        started = time.perf_counter()
        two = _sweep(tmp_path, "two", captcha_parquet, "--workers-per-trial", "2", temp=temp)
        timings[2] = time.perf_counter() - started
        assert _left(temp) == []
    print(f"2-trial sweep: 1 worker per trial {timings[1]:.1f} s, 2 workers per trial {timings[2]:.1f} s")
    assert one.keys() == two.keys() and len(two) == 2
    # the job itself counted its workers; both share it as DDP (the default `parallel`)
    assert [r["workers"] for r in one.values()] == [1, 1] and [r["workers"] for r in two.values()] == [2, 2]
    assert {r["parallel"] for r in two.values()} == {"ddp"}
    for key, row in two.items():
        assert row["outcome"] == "ok", row["error"]
        ones, twos = one[key]["steps"], row["steps"]
        assert [(s["step"], s["samples_seen"]) for s in twos] == [(s["step"], s["samples_seen"]) for s in ones] \
            == [(2, 2 * 2 * key[1]), (4, 4 * 2 * key[1])]
        difference = max(abs(a["train_loss"] - b["train_loss"]) / a["train_loss"] for a, b in zip(ones, twos))
        print(f"trial {key}: per-evaluation losses, 1 vs 2 workers: max relative difference {difference:.1e}")
        assert difference < 1e-5
        assert [s["val_exact_match"] for s in twos] == [s["val_exact_match"] for s in ones]
        assert [(p["sample_id"], p["prediction"]) for p in row["predictions"]] == \
            [(p["sample_id"], p["prediction"]) for p in one[key]["predictions"]] and len(row["predictions"]) == 4
        # what Tune registered is rank 0's checkpoint of the last evaluation, which a retry or a resume loads
        checkpoint = Path(row["checkpoint_path"])
        assert checkpoint.parent.parent == tmp_path / "sweeps" / "two" and (checkpoint / "state.pt").is_file()
        assert json.loads((checkpoint / "mdsweep_report.json").read_text())["last"]["step"] == 4
    # one trial at a time: a trial's whole need (its workers and its driver) fits the cluster once
    first, second = sorted(two.values(), key=lambda r: r["start_time"])
    assert first["end_time"] <= second["start_time"], (first["end_time"], second["start_time"])
