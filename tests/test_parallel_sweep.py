"""A sweep whose trials each run on two Ray Train workers (`mdsweep run --workers-per-trial 2`, issue 31).

A 2-trial sweep runs on two workers per trial, on an embedded Ray of 3 logical CPUs: a 2-worker trial needs 2 x 1
CPU and 0.25 for its driver, so only one fits at a time, and the second trial's workers can start only once the
first trial's have let go of their CPUs (Ray issue #54305). Each trial must train on the samples of one worker and
give its losses (the same job run on one worker in this process), and its checkpoint, written by rank 0, must be
the one Tune holds. Then
3 trials of 2 workers share 4 logical GPUs, two at a time, and one killed worker costs its trial a retry from its
checkpoint, nothing more. SIGTERM to a driver of 2-worker trials leaves no worker running, and `resume` goes on
from the trial's checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from harness import job_flags, mdsweep, running_driver, short_temp_dir, wait_until
from orchestrator.cluster.train_workers import collective_backend, run_job_on_workers
from orchestrator.cluster.trial_checkpoint import job_config_of
from orchestrator.results.store import read_partition
from trainer.job import run_job
from trainer.job_config import JobConfig


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


@pytest.mark.slow  # a sweep on a real Ray cluster
def test_a_sweep_on_two_workers_per_trial_trains_as_one_worker_does_and_leaves_nothing_running(captcha_parquet,
                                                                                               tmp_path):
    """Each 2-worker trial's rows against the same job (its settings read back from its trials row) run on one
    worker, in this process: the same samples per evaluation, losses within 1e-5, the same answers. A 1-worker
    sweep here, as before, cost a whole sweep (45 s) to show what the in-process job shows; the 1-worker row's
    own columns are checked on the module sweep of test_orchestrator_embedded.py."""
    with short_temp_dir("mdq") as temp:
        started = time.perf_counter()
        two = _sweep(tmp_path, "two", captcha_parquet, "--workers-per-trial", "2", temp=temp)
        print(f"2-trial sweep, 2 workers per trial: {time.perf_counter() - started:.1f} s")
        assert _left(temp) == []
    assert len(two) == 2
    # the job itself counted its workers; both share it as DDP (the default `parallel`)
    assert [r["workers"] for r in two.values()] == [2, 2] and {r["parallel"] for r in two.values()} == {"ddp"}
    for key, row in two.items():
        assert row["outcome"] == "ok", row["error"]
        # each rank's peak (process RSS here), gathered by the job: rank 0's is the trial's peak_memory_bytes
        peaks = row["rank_peak_memory_bytes"]
        assert len(peaks) == 2 and min(peaks) > 0 and peaks[0] == row["peak_memory_bytes"], peaks
        reports: list[dict] = []
        one = run_job(job_config_of(row), on_report=lambda metrics, _checkpoint: reports.append(metrics),
                      checkpoint_dir=tmp_path / "one" / row["trial_id"])
        twos = row["steps"]
        assert [(s["step"], s["samples_seen"]) for s in twos] == [(r["step"], r["samples_seen"]) for r in reports] \
            == [(2, 2 * 2 * key[1]), (4, 4 * 2 * key[1])]
        difference = max(abs(r["train_loss"] - s["train_loss"]) / r["train_loss"] for r, s in zip(reports, twos))
        print(f"trial {key}: per-evaluation losses, 1 vs 2 workers: max relative difference {difference:.1e}")
        assert difference < 1e-5
        assert [s["val_exact_match"] for s in twos] == [r["val_exact_match"] for r in reports]
        assert [(p["sample_id"], p["prediction"]) for p in row["predictions"]] == \
            sorted((str(p.sample_id), p.prediction) for p in one.predictions) and len(row["predictions"]) == 4
        # what Tune registered is rank 0's checkpoint of the last evaluation, which a retry or a resume loads
        checkpoint = Path(row["checkpoint_path"])
        assert checkpoint.parent.parent == tmp_path / "sweeps" / "two" and (checkpoint / "state.pt").is_file()
        assert json.loads((checkpoint / "mdsweep_report.json").read_text())["last"]["step"] == 4
    # one trial at a time: a trial's whole need (its workers and its driver) fits the cluster once
    first, second = sorted(two.values(), key=lambda r: r["start_time"])
    assert first["end_time"] <= second["start_time"], (first["end_time"], second["start_time"])


def _session_processes(session: int) -> list[psutil.Process]:
    """The processes still running in the process session `session` (a driver started by running_driver leads its
    own): its embedded Ray's, which Ray renames (ray::RayTrainWorker...), so their command lines no longer name a
    folder. A zombie has ended; only its parent's wait is missing (a container's PID 1 may never reap it)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return found


def _most_at_once(rows: list[dict]) -> int:
    """The most trials that ran at the same moment, from their start and end times."""
    events = sorted([(r["start_time"], 1) for r in rows] + [(r["end_time"], -1) for r in rows],
                    key=lambda event: (event[0], event[1]))
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


@pytest.mark.slow  # a sweep of 8 Ray Train workers
def test_three_trials_of_two_workers_share_four_logical_gpus_two_at_a_time_and_survive_a_killed_worker(
        captcha_parquet, tmp_path):
    """3 trials x 2 workers of 1 logical GPU each on an embedded Ray of 4 GPUs: two trials at a time, the third
    queued (the GPUs bound it; the 5 CPUs would allow 2 x 2.25). Once two trials have checkpointed, one Ray Train
    worker is killed by its process id: its trial fails into Tune's retry, resumes from its checkpoint and ends ok,
    and every steps and predictions row lands exactly once. The workers train on the CPU over gloo (the GPUs are logical)."""
    name, sweeps, results = "gpus", tmp_path / "sweeps", tmp_path / "results"
    argv = ["run", "--name", name, "--storage", str(sweeps), "--results", str(results), "--space", "smoke",
            "--num-samples", "3", "--search-seed", "5", "--num-cpus", "5", "--num-gpus", "4", "--cpus-per-trial", "1",
            "--gpus-per-trial", "1", "--workers-per-trial", "2", "--progress-interval", "0", "--quiet",
            *job_flags(captcha_parquet, max_steps=8)]

    def checkpointed() -> set[str]:
        return {path.parent.parent.name for path in (sweeps / name).glob("*/checkpoint_*/mdsweep_report.json")}

    with short_temp_dir("mdg") as temp:
        with running_driver(argv, env={"TMPDIR": str(temp)}, log_path=tmp_path / "driver.log") as driver:
            wait_until(lambda: len(checkpointed()) >= 2, "two trials checkpointed", 400, driver, interval_s=0.2)
            workers = [p for p in _session_processes(driver.pid) if "RayTrainWorker" in " ".join(p.cmdline())]
            assert workers, "no Ray Train worker found in the driver's session"
            workers[0].kill()
            assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(1)
        assert _session_processes(driver.pid) == []
    trials = read_partition(results, "trials", name)
    assert len(trials) == 3 and {r["outcome"] for r in trials} == {"ok"}, [(r["outcome"], r["error"]) for r in trials]
    assert {r["workers"] for r in trials} == {2}
    assert _most_at_once(trials) == 2
    retried = [r for r in trials if r["num_failures"]]
    assert len(retried) == 1 and retried[0]["num_failures"] == 1 and retried[0]["restored_from_step"] >= 2, \
        [(r["num_failures"], r["restored_from_step"]) for r in trials]
    for row in trials:
        steps = [s["step"] for s in read_partition(results, "steps", name) if s["trial_id"] == row["trial_id"]]
        assert sorted(steps) == [2, 4, 6, 8], (row["trial_id"], steps)
        # the predictions of the trial's last evaluation, one row per validation sample
        predicted = [p["sample_id"] for p in read_partition(results, "predictions", name)
                     if p["trial_id"] == row["trial_id"]]
        assert len(predicted) == len(set(predicted)) == 4, (row["trial_id"], sorted(predicted))


def test_workers_given_logical_gpus_or_told_to_use_the_cpu_reduce_over_gloo():
    """NCCL cannot reduce CPU tensors: workers that train on the CPU, logical GPUs or not, need gloo."""
    assert collective_backend(JobConfig(device="cpu"), use_gpu=True, nvidia=True) == "gloo"
    assert collective_backend(JobConfig(), use_gpu=False, nvidia=True) == "gloo"
    assert collective_backend(JobConfig(), use_gpu=True, nvidia=False) == "gloo"  # logical GPUs: the job uses the CPU
    assert collective_backend(JobConfig(), use_gpu=True, nvidia=True) == "nccl"
    assert collective_backend(JobConfig(device="cuda:1"), use_gpu=True, nvidia=True) == "nccl"


def test_train_on_more_workers_than_the_machine_has_gpus_is_one_line_naming_the_flag(monkeypatch):
    """On a machine with CUDA GPUs each worker of `mdsweep train` takes one; this machine has none, so its count
    is set (the refusal comes before Ray starts)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--workers-per-trial 2: this machine has 1 GPU\(s\)"):
        run_job_on_workers(2, JobConfig())


@pytest.mark.slow  # a sweep of 2 Ray Train workers, interrupted and resumed
def test_sigterm_to_a_sweep_of_two_workers_per_trial_leaves_nothing_running_and_resume_goes_on_from_its_checkpoint(
        captcha_parquet, tmp_path):
    """SIGTERM to the driver alone (a batch scheduler's `kill PID`) once its 2-worker trial has checkpointed: exit
    143, the line saying how to resume, and no process of the driver's session left, its Ray Train workers
    included; `mdsweep resume` then continues the trial from that checkpoint, and each steps row lands once."""
    name, sweeps, results = "termed", tmp_path / "sweeps", tmp_path / "results"
    argv = ["run", "--name", name, "--storage", str(sweeps), "--results", str(results), "--space", "smoke",
            "--num-samples", "1", "--num-cpus", "3", "--cpus-per-trial", "1", "--workers-per-trial", "2",
            "--progress-interval", "0", "--quiet", *job_flags(captcha_parquet, max_steps=8)]

    def registered() -> int:
        """The step of a checkpoint Tune holds (one a resume restores), not only one on disk: a checkpoint's files
        exist before Tune's save round trip registers them, and Tune asks the trial for its next result only
        once that save is processed, so when the driver has written the step-4 row, step 2's checkpoint is
        registered (seen: SIGTERM right after step 2's files appeared resumed from step 0 on a loaded machine)."""
        step = max((s["step"] for s in read_partition(results, "steps", name)), default=0)
        return step - 2 if step >= 4 else 0

    started = time.perf_counter()
    with short_temp_dir("mdt") as temp:
        with running_driver(argv, env={"TMPDIR": str(temp)}, log_path=tmp_path / "driver.log") as driver:
            step = wait_until(registered, "a registered checkpoint", 300, driver, interval_s=0.2)
            driver.send_signal(signal.SIGTERM)
            code = driver.wait(timeout=120)
            time.sleep(1)
            left = _session_processes(driver.pid)
            named = [(p.pid, p.name()) for p in left]
            for process in left:  # a failing test leaves none running either
                process.kill()
        output = (tmp_path / "driver.log").read_text()
        assert code == 143, output[-3000:]
        assert f"sweep {name} is interrupted: continue it with `mdsweep resume {name} --storage {sweeps}`" in output
        assert named == [], named
        resumed = mdsweep("resume", name, "--storage", str(sweeps), "--num-cpus", "3", "--quiet",
                          env={"TMPDIR": str(temp)}, timeout=400)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    (trial,) = read_partition(results, "trials", name)
    print(f"SIGTERM with step {step}'s checkpoint registered, resumed from step {trial['restored_from_step']}: "
          f"{time.perf_counter() - started:.1f} s")
    assert trial["outcome"] == "ok" and trial["workers"] == 2, trial["error"]
    assert trial["restored_from_step"] >= step, (trial["restored_from_step"], step)
    assert sorted(s["step"] for s in read_partition(results, "steps", name)) == [2, 4, 6, 8]
