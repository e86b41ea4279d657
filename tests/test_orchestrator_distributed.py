"""End to end against a Ray cluster started by the test: two nodes with one logical GPU each.

`ray.cluster_utils.Cluster` runs a real head (GCS) and two raylets on this
machine; the sweeps attach to it with --address (or RAY_ADDRESS) from separate
driver processes, as they would to a remote cluster. GPUs are logical: Ray
schedules them, the tiny jobs run on the CPU. One cluster serves the module.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness import job_flags, mdsweep, running_driver, wait_until
from orchestrator.results.store import read_partition

pytestmark = pytest.mark.slow  # real Ray heads and sweeps: the fast lane (-m "not slow") leaves them out

GiB = 2**30


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=2, num_gpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def where(tmp: Path, name: str) -> list[str]:
    """Name, storage and results of a sweep under `tmp`, its progress table off."""
    return ["--name", name, "--storage", str(tmp / "sweeps"), "--results", str(tmp / "results"),
            "--progress-interval", "0"]


def _overlap(a: dict, b: dict) -> bool:
    return a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"]


def test_gpu_memory_per_trial_packs_two_trials_per_gpu(cluster, tmp_path, captcha_parquet):
    proc = mdsweep("run", *where(tmp_path, "packed"), "--address", cluster.address, "--space", "smoke",
                   "--num-samples", "4", "--gpu-memory-per-trial", "8GiB", "--node-gpu-memory", "16GiB",
                   *job_flags(captcha_parquet, 2))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "attached to the Ray cluster at" in proc.stderr and "0.5 GPU" in proc.stderr
    rows = read_partition(tmp_path / "results", "trials", "packed")
    assert len(rows) == 4 and all(r["outcome"] == "ok" for r in rows), [(r["outcome"], r["error"]) for r in rows]
    by_gpu: dict[tuple, list[dict]] = {}
    for r in rows:
        by_gpu.setdefault((r["node_id"], r["gpu_ids"]), []).append(r)
    # two nodes, one GPU each ("0" on its node), two trials on each GPU, running at the same time
    assert sorted(len(v) for v in by_gpu.values()) == [2, 2]
    assert {gpu for _node, gpu in by_gpu} == {"0"}
    for pair in by_gpu.values():
        assert _overlap(*pair)
    # and each trial's allocator cap is its share: 8 GiB
    assert {r["max_gpu_memory"] for r in rows} == {str(8 * GiB)}


@pytest.mark.parametrize("flags,flag", [
    (["--gpus-per-trial", "2"], "--gpus-per-trial"),
    (["--cpus-per-trial", "3", "--gpus-per-trial", "0"], "--cpus-per-trial"),
    (["--memory-per-trial", "64TiB", "--gpus-per-trial", "0"], "--memory-per-trial"),
    (["--gpu-memory-per-trial", "40GiB", "--node-gpu-memory", "16GiB"], "--gpu-memory-per-trial"),
    # 4 CPUs in the cluster, but a trial's 2 workers and its driver (2.25 CPU) must share one node of 2
    (["--workers-per-trial", "2", "--gpus-per-trial", "0"], "--workers-per-trial"),
])
def test_a_trial_that_fits_nowhere_is_an_error_up_front(cluster, tmp_path, captcha_parquet, capsys, flags, flag):
    # the command's entry point in this process, attached to the cluster as a driver process would be (as
    # run_sweep is below): the check reads the cluster's nodes, not anything of the process
    from orchestrator.cli.main import main

    code = main(["run", *where(tmp_path, "toolarge"), "--address", cluster.address, *flags,
                 *job_flags(captcha_parquet, 2)])
    err = capsys.readouterr().err
    assert code == 2 and flag in err, err[-2000:]
    assert "mdsweep run: error: " in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "sweeps" / "toolarge").exists()  # nothing was scheduled
    import ray

    assert not ray.is_initialized()  # and the driver let go of the cluster


def test_paired_attention_comparison_on_identical_settings(cluster, tmp_path, captcha_parquet):
    proc = mdsweep("run", *where(tmp_path, "paired"), "--address", cluster.address, "--space", "smoke:paired",
                   "--cross", "attention", "--num-samples", "1", "--gpus-per-trial", "0",
                   *job_flags(captcha_parquet, 2, val_samples=6))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_partition(tmp_path / "results", "trials", "paired")
    assert sorted(r["attention"] for r in rows) == ["causal", "prefix"]
    assert len({(r["lr"], r["grad_accum"], r["seed"], r["group_id"]) for r in rows}) == 1
    q = mdsweep("query", str(tmp_path / "results"), "--paired", "attention", "--format", "json", timeout=60)
    assert q.returncode == 0, q.stderr
    import json

    (pair,) = json.loads(q.stdout)
    assert (pair["a"], pair["b"]) == ("causal", "prefix") and pair["n"] == 6
    assert pair["both_correct"] + pair["a_only"] + pair["b_only"] + pair["both_wrong"] == 6
    assert 0 <= pair["mcnemar_p"] <= 1 and pair["ci_low"] <= pair["diff"] <= pair["ci_high"]


def test_a_killed_driver_is_resumed_with_nothing_lost_or_duplicated(cluster, tmp_path, captcha_parquet):
    results = tmp_path / "results"

    def first_done_second_halfway() -> bool:
        # the second trial past its second checkpoint, so that the experiment state
        # saved on storage surely knows one of its checkpoints
        trials = read_partition(results, "trials", "killed")
        steps = read_partition(results, "steps", "killed")
        done = [t["trial_id"] for t in trials if t["outcome"] == "ok"]
        halfway = {s["trial_id"] for s in steps if s["step"] >= 4} - set(done)
        return len(done) == 1 and bool(halfway)

    argv = ["run", *where(tmp_path, "killed"), "--address", cluster.address, "--space", "smoke", "--num-samples",
            "3", "--max-concurrent", "1", "--gpus-per-trial", "0", *job_flags(captcha_parquet, max_steps=8)]
    with running_driver(argv, log_path=tmp_path / "driver.log") as driver:
        wait_until(first_done_second_halfway, "one trial done and the next one halfway", 240, driver, 0.25)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    _wait_for_the_orphaned_trial_to_end(tmp_path / "sweeps" / "killed")
    before = {t["trial_id"]: t for t in read_partition(results, "trials", "killed")}
    (first,) = [tid for tid, t in before.items() if t["outcome"] == "ok"]
    (interrupted,) = [tid for tid, t in before.items() if t["outcome"] == "running"]
    _lose_the_reports_of_the_checkpoints(tmp_path, interrupted)

    # resume through RAY_ADDRESS this time
    proc = mdsweep("resume", "killed", "--storage", str(tmp_path / "sweeps"), env={"RAY_ADDRESS": cluster.address})
    (tmp_path / "resume.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    port = cluster.address.rsplit(":", 1)[1]
    assert f":{port} (RAY_ADDRESS {cluster.address})" in proc.stderr  # attached through RAY_ADDRESS
    assert "took over the lock of a driver that ended without releasing it (mdsweep run, pid " in proc.stderr

    trials = {t["trial_id"]: t for t in read_partition(results, "trials", "killed")}
    assert len(trials) == 3 and all(t["outcome"] == "ok" for t in trials.values())
    assert trials[first]["attempts"] == 1  # finished before the kill: not rerun
    assert trials[first]["end_time"] == before[first]["end_time"]
    assert trials[interrupted]["attempts"] == 2 and trials[interrupted]["restored_from_step"] >= 2
    assert trials[interrupted]["start_time"] == before[interrupted]["start_time"]
    steps = pq.read_table(results / "steps").to_pylist()
    keys = [(s["trial_id"], s["step"]) for s in steps]
    assert len(keys) == len(set(keys)) == 12  # 3 trials x steps 2, 4, 6, 8
    assert sorted(keys) == sorted((tid, s) for tid in trials for s in (2, 4, 6, 8))
    preds = pq.read_table(results / "predictions").to_pylist()
    assert sorted({(p["trial_id"], p["sample_id"]) for p in preds}) == sorted((p["trial_id"], p["sample_id"]) for p in preds)
    assert {p["trial_id"] for p in preds} == set(trials)
    (sweep_row,) = read_partition(results, "sweeps", "killed")
    assert sweep_row["status"] == "finished"


def _wait_for_the_orphaned_trial_to_end(sweep_dir: Path) -> None:
    """The trial's worker outlives a SIGKILLed driver until Ray notices the driver is gone, and may meanwhile
    upload one more checkpoint; wait until the sweep's files stop changing (two looks two seconds apart)."""
    def files() -> set[tuple[str, int]]:
        return {(str(f), f.stat().st_size) for f in sweep_dir.rglob("*") if f.is_file()}

    looks = [files()]

    def settled() -> bool:
        time.sleep(2)
        looks.append(files())
        return looks[-1] == looks[-2]

    wait_until(settled, "the killed driver's trial ended (its files kept changing)", 120)


def _lose_the_reports_of_the_checkpoints(tmp_path: Path, trial_id: str) -> None:
    """Leave the results as Tune's kill window does: the driver killed after a checkpoint of the trial reached
    storage (registered, or written by a worker that outlived the driver) but before the sink wrote that
    checkpoint's report. Whichever checkpoint the resumed trial continues from, its row is not in `steps`. A
    checkpoint folder without the report is one whose upload the worker's end cut short: Tune never registered
    it, so no trial resumes from it."""
    import json

    import pyarrow as pa

    (trial_dir,) = (tmp_path / "sweeps" / "killed").glob(f"trial_{trial_id}*")
    steps = {json.loads((c / "mdsweep_report.json").read_text())["last"]["step"]
             for c in trial_dir.glob("checkpoint_*") if (c / "mdsweep_report.json").exists()}
    path = tmp_path / "results" / "steps" / "sweep=killed" / f"{trial_id}.parquet"
    table = pq.read_table(path)
    kept = [r for r in table.to_pylist() if r["step"] not in steps]
    pq.write_table(pa.Table.from_pylist(kept, schema=table.schema), path)


# The first proposal's shape runs out of memory; the sixth and seventh ask for a batch predicted to need more
# than a whole GPU (never run: told to Optuna as failed and resampled); the rest fit three to a GPU.
PACKED_SPACE = """
def space(trial):
    batch = 4 if trial.number == 0 else 4096 if trial.number in (5, 6) else 2
    return {"lr": trial.suggest_float("lr", 1e-5, 1e-4, log=True), "batch_size": batch,
            "fault": "oom@1" if batch == 4 else None}
"""


def test_auto_gpu_memory_packs_by_prediction_and_never_runs_a_shape_that_cannot_fit(cluster, tmp_path,
                                                                                      captcha_parquet):
    """Four trials at once on two 2-CPU nodes with one (logical) GPU each: two share each GPU, each under a
    share of (predicted peak x 1.15 + CUDA context) / GPU; a shape predicted to need more than a GPU is
    rejected before it runs; the out-of-memory shape and the measured peaks are booked for later shares."""
    from orchestrator.cluster.resources import round_gpu_fraction
    from orchestrator.sweep.driver import run_sweep
    from orchestrator.sweep.gpu_memory import MARGIN, book_for
    from orchestrator.sweep.settings import SweepSettings
    from trainer.job_config import JobConfig
    from trainer.memory.estimate import CUDA_CONTEXT_BYTES, estimate_memory

    space = tmp_path / "space.py"
    space.write_text(PACKED_SPACE)
    fixed = {"model": "tiny", "train_data": str(captcha_parquet), "max_steps": 2, "eval_every": 2,
             "max_val_samples": 4, "max_new_tokens": 5}
    settings = SweepSettings(
        name="auto", storage=str(tmp_path / "sweeps"), results=str(tmp_path / "results"), space=f"{space}:space",
        fixed=fixed, num_samples=6, max_concurrent=4, cpus_per_trial=1, gpu_memory_per_trial="auto",
        node_gpu_memory="2GiB", address=cluster.address, progress_interval=0,
        job_fn="tests.gpu_readings:run_job_with_half_the_predicted_peak")
    outcome = run_sweep(settings, quiet=True)
    rows = read_partition(tmp_path / "results", "trials", "auto")
    assert outcome.status == "finished" and len(rows) == 6
    assert sorted(r["outcome"] for r in rows) == ["ok"] * 5 + ["oom"]
    (oom,) = [r for r in rows if r["outcome"] == "oom"]
    assert oom["batch_size"] == 4 and all(r["batch_size"] == 2 for r in rows if r is not oom)
    assert book_for("auto").rejected == 2  # the two batch-4096 proposals: resampled, never run

    predicted = estimate_memory(JobConfig(**{**fixed, "batch_size": 2})).allocator_peak
    assert {r["predicted_peak_bytes"] for r in rows if r is not oom} == {predicted}
    # before any measurement (the first trials): the prediction plus 15 % and the CUDA context, of a 2 GiB GPU;
    # measured peaks only lower later shares here. The cap is the share Ray assigned, which Ray holds in units of
    # 1e-4, truncating the request (a 0.2956 request is assigned as 0.2955)
    requested = round_gpu_fraction((int(predicted * MARGIN) + CUDA_CONTEXT_BYTES) / (2 * GiB))
    assert requested - 1e-4 <= max(float(r["max_gpu_memory"]) for r in rows if r is not oom) <= requested
    # two trials ran on the same GPU of the same node at the same time
    shared = [(a["trial_id"], b["trial_id"]) for a in rows for b in rows
              if a["trial_id"] < b["trial_id"] and (a["node_id"], a["gpu_ids"]) == (b["node_id"], b["gpu_ids"])
              and a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"]]
    assert shared
    # the driver's book learnt each finished trial's measured peak (half the prediction here), from which later
    # shares are cut (how a measurement changes a share: tests/test_gpu_memory.py)
    from trainer.memory.estimate import memory_shape

    small = JobConfig(**{**fixed, "batch_size": 2})
    assert book_for("auto").measured[memory_shape(small)] == estimate_memory(small).allocator_peak // 2
    assert memory_shape(JobConfig(**{**fixed, "batch_size": 4})) in book_for("auto").out_of_memory
