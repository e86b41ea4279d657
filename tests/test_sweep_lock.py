"""One driver per sweep: the lock refuses a second driver while the first lives, and is taken over once it died."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from harness import ROOT, mdsweep, running_driver, wait_until
from orchestrator.results.store import read_partition
from orchestrator.sweep.lock import LOCK_FILE, SweepLock, describe_stale, sweep_lock
from orchestrator.sweep.settings import SweepError



def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    first = SweepLock("x", [tmp_path / "a", tmp_path / "b"], "run").acquire()
    with pytest.raises(SweepError, match=rf"--name x: sweep x is being run now by another driver \(mdsweep run, "
                                         rf"pid {os.getpid()} on .* since .*\); wait for it to end"):
        SweepLock("x", [tmp_path / "b"], "resume").acquire()
    first.release()
    with SweepLock("x", [tmp_path / "b"], "resume") as second:
        assert describe_stale(second) is None  # released properly: nothing stale


def test_the_results_partition_alone_refuses_a_second_driver(tmp_path):
    """Two drivers of sweep x on different storage (or on object storage, which has no lock) but the same
    results: the lock on the results partition is what refuses the second, before Ray or the storage check."""
    results = str(tmp_path / "results")
    with sweep_lock("x", str(tmp_path / "storage-a" / "x"), results, "run"):
        for experiment_path in (str(tmp_path / "storage-b" / "x"), "s3://bucket/sweeps/x"):
            with pytest.raises(SweepError, match=r"--name x: sweep x is being run now by another driver \(mdsweep run"):
                sweep_lock("x", experiment_path, results, "resume").acquire()
    assert (tmp_path / "results" / "sweeps" / "sweep=x" / LOCK_FILE).read_text() == ""  # released


def test_a_lock_whose_holder_died_is_taken_over_and_named(tmp_path):
    # a driver killed with -9 leaves its lock file written but its kernel lock gone with the process
    died = subprocess.run([sys.executable, "-c", f"""
from pathlib import Path
from orchestrator.sweep.lock import SweepLock
SweepLock("x", [Path({str(tmp_path)!r})], "run").acquire()
import os; os._exit(9)
"""], cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert died.returncode == 9
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    with SweepLock("x", [tmp_path], "resume") as lock:
        assert lock.stale == holder
        assert describe_stale(lock) == (f"took over the lock of a driver that ended without releasing it (mdsweep run, "
                                         f"pid {holder['pid']} on {holder['host']} since {holder['since']})")


@pytest.mark.slow
def test_a_second_run_of_the_same_name_is_refused_while_the_first_runs(tmp_path, captcha_parquet):
    """Two `mdsweep run --name X` on the same storage and results used to merge into one sweep."""
    argv = ["run", "--name", "twice", "--space", "smoke", "--num-samples", "1", "--num-cpus", "2", "--storage",
            str(tmp_path / "sweeps"), "--results", str(tmp_path / "results"), "--train-data", str(captcha_parquet),
            "--max-steps", "2000", "--batch-size", "2", "--max-val-samples", "4", "--quiet"]
    lock = tmp_path / "sweeps" / "twice" / LOCK_FILE
    with running_driver(argv) as first:  # a trial far longer than the test: the first runs throughout
        wait_until(lambda: lock.is_file() and lock.read_text(), "the first driver's lock", 120, first, 0.05)
        # its trial under way (seen: a second refused within seconds let the Ctrl-C land before the first had
        # started any trial, and then no trials row existed for the check below)
        wait_until(lambda: read_partition(tmp_path / "results", "trials", "twice"), "the first driver's trial", 240,
                   first)
        second = mdsweep(*argv, timeout=120)
        assert first.poll() is None  # undisturbed by the second
        os.killpg(first.pid, signal.SIGINT)  # then ended as a user would, with Ctrl-C
        out, err = first.communicate(timeout=120)
    assert first.returncode == 3, err[-2000:]
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith(
        "mdsweep run: error: --name twice: sweep twice is being run now by another driver (mdsweep run, pid "
        f"{first.pid} on ")
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "results" / "trials").num_rows == 1
    assert lock.read_text() == ""  # released at the end


@pytest.mark.slow
def test_a_sweep_name_from_another_storage_in_the_same_results_is_refused(tmp_path):
    from orchestrator.results.store import write_sweep_row
    from orchestrator.sweep.driver import check_name_is_free
    from orchestrator.sweep.settings import SweepSettings

    write_sweep_row(tmp_path / "r", "same", {"experiment_path": str(tmp_path / "elsewhere" / "same")})
    s = SweepSettings(name="same", storage=str(tmp_path / "s"), results=str(tmp_path / "r"), fixed={"train_data": "x"})
    with pytest.raises(SweepError, match=r"--name same: --results .* already hold a sweep same \(its state is in "):
        check_name_is_free(s)
