"""`--storage s3://...` end to end, against a local server that speaks the S3 protocol (moto in server mode,
reached through `AWS_ENDPOINT_URL` as a real endpoint would be).

One sweep of two trials, both with a worker that dies at step 5, ended by SIGTERM while its second trial runs:
every checkpoint, Tune's state and the searcher's state live only in the bucket, so the retries, the resume and
the export can only work if they read them back from there.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port, mdsweep, short_temp_dir, signal_driver_when, wait_until
from orchestrator.results.store import read_partition

BUCKET = "sweeps"
STORAGE = f"s3://{BUCKET}/runs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A moto S3 server of this module's own, on a free port, with one empty bucket; the environment that points
    the AWS SDKs (pyarrow's and boto3's) at it."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    def listening() -> bool:
        assert server.poll() is None, "moto server ended"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_until(listening, "the moto server listening", deadline_s=60, interval_s=0.2)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _cli_env(s3_env: dict, home: Path, temp: Path) -> dict:
    """What the commands' environment adds: the S3 endpoint, and a HOME and TMPDIR of the test's own (TMPDIR holds
    Ray's session and the trials' scratch folders), so every local place a sweep could write can be looked at."""
    return {**s3_env, "HOME": str(home), "TMPDIR": str(temp)}


def _bucket_files(s3_env: dict, prefix: str) -> dict[str, int]:
    """Every object under `prefix` of the bucket with its size, read through pyarrow as the project reads it."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test",
                           region="us-east-1")
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path: i.size for i in infos if i.type == pafs.FileType.File}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The sweep's HOME and TMPDIR (short: Ray's sockets live under it)."""
    with short_temp_dir("mds3") as temp:
        yield {"home": tmp_path_factory.mktemp("s3-home"), "temp": temp}


@pytest.fixture(scope="module")
def resumed(s3_env, local, tmp_path_factory, captcha_parquet):
    """The sweep run until its first trial is done and the second has a checkpoint, ended by SIGTERM, resumed."""
    tmp = tmp_path_factory.mktemp("s3-sweep")
    results = tmp / "results"
    env = _cli_env(s3_env, local["home"], local["temp"])
    before: dict[str, dict] = {}

    def first_done_second_checkpointed() -> bool:
        trials = read_partition(results, "trials", "bucketed")
        done = {t["trial_id"] for t in trials if t["outcome"] == "ok"}
        later = {s["trial_id"] for s in read_partition(results, "steps", "bucketed") if s["step"] >= 2} - done
        before.update({t["trial_id"]: t for t in trials})
        return len(done) == 1 and bool(later)

    code = signal_driver_when(
        ["run", "--name", "bucketed", "--space", "smoke", "--num-samples", "2", "--max-concurrent", "1",
         "--num-cpus", "2", "--storage", STORAGE, "--results", str(results), "--progress-interval", "1",
         "--train-data", str(captcha_parquet), "--max-steps", "8", "--eval-every", "2", "--batch-size", "2",
         "--max-val-samples", "4", "--set", "max_new_tokens=5", "--set", "fault=crash@5"],
        first_done_second_checkpointed, tmp / "driver.log", env, cwd=tmp)
    interrupted = (tmp / "driver.log").read_text()
    proc = mdsweep("resume", "bucketed", "--storage", STORAGE, env=env, cwd=tmp)
    return tmp, code, interrupted, before, proc


def test_the_interrupted_sweep_says_how_to_resume_from_the_bucket(resumed):
    tmp, code, interrupted, _, _ = resumed
    assert code == 143, interrupted[-3000:]
    assert "SIGTERM received" not in interrupted and "Traceback" not in interrupted  # Ray's native handler's dump
    assert f"continue it with `mdsweep resume bucketed --storage {STORAGE}`" in interrupted
    assert "already reported" not in interrupted  # Optuna's warning when a retried trial re-reports its checkpoint


def test_resume_from_the_bucket_finishes_every_trial_with_each_row_once(resumed):
    tmp, _, _, before, proc = resumed
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = tmp / "results"
    trials = {t["trial_id"]: t for t in read_partition(results, "trials", "bucketed")}
    assert len(trials) == 2 and all(t["outcome"] == "ok" for t in trials.values())
    (first,) = [tid for tid, t in before.items() if t["outcome"] == "ok"]
    assert trials[first]["end_time"] == before[first]["end_time"]  # finished before SIGTERM: not rerun
    # the first trial's worker died at step 5 and went on from the step-4 checkpoint in the bucket; the second,
    # interrupted, went on from its latest checkpoint there (a resumed attempt does not crash again)
    assert (trials[first]["num_failures"], trials[first]["restored_from_step"]) == (1, 4)
    (second,) = set(trials) - {first}
    assert trials[second]["attempts"] >= 2 and trials[second]["restored_from_step"] >= 2
    assert trials[second]["start_time"] == before[second]["start_time"]
    steps = [(s["trial_id"], s["step"]) for s in read_partition(results, "steps", "bucketed")]
    assert sorted(steps) == sorted((tid, s) for tid in trials for s in (2, 4, 6, 8))
    (sweep_row,) = read_partition(results, "sweeps", "bucketed")
    assert sweep_row["status"] == "finished"


def test_checkpoints_and_state_are_in_the_bucket_and_nowhere_local(resumed, s3_env, local):
    tmp = resumed[0]
    files = _bucket_files(s3_env, "runs/bucketed")
    names = {p.rsplit("/", 1)[1] for p in files}
    assert {"mdsweep_sweep.json", "tuner.pkl"} <= names
    assert any(n.startswith("experiment_state-") for n in names) and any(n.startswith("searcher-state-") for n in names)
    for t in read_partition(tmp / "results", "trials", "bucketed"):
        ckpt = f"{BUCKET}/runs/bucketed/trial_{t['trial_id']}/{t['checkpoint_path'].rsplit('/', 1)[1]}/state.pt"
        assert files.get(ckpt, 0) > 0, sorted(files)
    # no local folder named after the URI (a classic of s3:// paths handled as local ones)
    assert sorted(p.name for p in tmp.iterdir()) == ["driver.log", "results"]
    # and nothing of Tune's anywhere local: the results hold the tables, Ray's log and the report only; HOME no
    # ray_results; TMPDIR (Ray's session, the trials' scratch) no checkpoint and no scratch folder. Tune's and the
    # searcher's state appear in one local place only: the driver's staging copy in its Ray session's
    # `driver_artifacts`, which Tune uploads from and a resume (another session) never reads
    assert sorted(p.name for p in (tmp / "results").iterdir()) == ["logs", "predictions", "report-bucketed.html",
                                                                   "steps", "sweeps", "trials"]
    assert not (local["home"] / "ray_results").exists()
    tunes = ("state.pt", "mdsweep_sweep.json", "tuner.pkl", "experiment_state-*", "searcher-state-*")
    for place in (tmp, local["home"], local["temp"]):
        found = [p for pattern in tunes for p in place.rglob(pattern)]
        assert [str(p) for p in found if p.name == "state.pt" or p.parent.name != "driver_artifacts"] == [], place
    assert not list(local["temp"].glob("mdsweep-trial-*"))


def test_export_copies_the_best_checkpoint_out_of_the_bucket(resumed, s3_env, local, tmp_path):
    import pyarrow.fs as pafs
    import torch

    from trainer.checkpoint import load_checkpoint
    from trainer.export import read_model_card
    from trainer.model.loading import load_model

    tmp = resumed[0]
    out = tmp_path / "best"
    proc = mdsweep("export", str(tmp / "results"), "--sweep", "bucketed", "--best", "--out", str(out),
                   env=_cli_env(s3_env, local["home"], local["temp"]), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = read_model_card(out)
    row = next(t for t in read_partition(tmp / "results", "trials", "bucketed") if t["trial_id"] == card["trial_id"])
    fs = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test",
                           region="us-east-1")
    name = row["checkpoint_path"].rsplit("/", 1)[1]
    local = tmp_path / "from-bucket"
    local.mkdir()
    pafs.copy_files(f"{BUCKET}/runs/bucketed/trial_{row['trial_id']}/{name}", str(local), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    trained = load_checkpoint(local)["model"]
    exported = load_model(str(out)).model.state_dict()
    assert trained and all(torch.equal(exported[k], v) for k, v in trained.items())
