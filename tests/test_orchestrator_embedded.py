"""End to end on an embedded Ray (the default: no --address, no RAY_ADDRESS), through the CLI.

One sweep of four short real jobs, one per outcome: a clean run, an injected OOM
(recorded as `oom`, not retried, FAIL in Optuna), a worker that dies mid-run
(retried from its checkpoint) and a loss that turns NaN (`diverged`).
"""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness import ROOT, job_flags, mdsweep, running_driver, short_temp_dir, wait_until

FAULT_SPACE = """
FAULTS = {1: "oom@2", 2: "crash@3", 3: "nan@1"}

def space(trial):
    return {"lr": trial.suggest_float("lr", 1e-5, 1e-4, log=True), "fault": FAULTS.get(trial.number)}
"""


@pytest.fixture(scope="module")
def scratch_dir():
    """The module sweep's TMPDIR: where its trials keep their scratch folders, and Ray its session."""
    with short_temp_dir("mds") as path:
        yield path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, captcha_parquet, captcha_test_parquet, scratch_dir):
    tmp = tmp_path_factory.mktemp("embedded")
    space = tmp / "fault_space.py"
    space.write_text(textwrap.dedent(FAULT_SPACE))
    proc = mdsweep("run", "--name", "faults", "--space", f"{space}:space", "--num-samples", "4", "--storage",
                   str(tmp / "sweeps"), "--results", str(tmp / "results"), "--num-cpus", "2", "--max-failures", "1",
                   "--progress-interval", "1", *job_flags(captcha_parquet), "--test-data", str(captcha_test_parquet),
                   "--test-top", "2", env={"TMPDIR": str(scratch_dir)}, timeout=400)
    return tmp, proc


def _trials(tmp: Path) -> dict[str, dict]:
    rows = pq.read_table(tmp / "results" / "trials").to_pylist()
    return {r["fault"] or "none": r for r in rows}


@pytest.mark.slow
def test_the_sweep_completes_despite_failures(sweep):
    tmp, proc = sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Started a local Ray instance" in (tmp / "results" / "logs" / "faults.log").read_text()  # embedded
    trials = _trials(tmp)
    assert set(trials) == {"none", "oom@2", "crash@3", "nan@1"}
    assert all(t["status"] == "terminated" for t in trials.values())


@pytest.mark.slow
def test_oom_is_an_outcome_with_its_peak_memory_and_is_not_retried(sweep):
    t = _trials(sweep[0])["oom@2"]
    assert t["outcome"] == "oom"
    assert t["peak_memory_bytes"] > 0 and "out of memory" in t["error"]
    assert t["attempts"] == 1 and t["num_failures"] == 0 and t["steps_completed"] == 1
    assert t["objective"] is None


@pytest.mark.slow
def test_a_dead_worker_is_retried_from_its_checkpoint(sweep):
    tmp = sweep[0]
    t = _trials(tmp)["crash@3"]
    assert t["outcome"] == "ok" and t["num_failures"] == 1 and t["attempts"] == 2
    assert t["restored_from_step"] == 2  # the checkpoint of the step-2 evaluation
    steps = pq.read_table(tmp / "results" / "steps", filters=[("trial_id", "=", t["trial_id"])]).to_pylist()
    assert [s["step"] for s in steps] == [2, 4]  # nothing lost, nothing twice


@pytest.mark.slow
def test_the_scratch_folder_of_the_killed_worker_is_removed_by_the_trials_after_it(sweep, scratch_dir):
    """The crash@3 trial's worker died by `os._exit` with a checkpoint in its scratch folder, so its own cleanup
    never ran; the trials started after it (its retry first) must have removed that folder, and every other trial
    its own: after the sweep only Ray's session and torch's kernel cache are left in the trials' temporary
    directory."""
    assert _trials(sweep[0])["crash@3"]["num_failures"] == 1  # the worker did die mid-trial
    left = [p.name for p in scratch_dir.iterdir() if p.name != "ray" and not p.name.startswith("torchinductor_")]
    assert left == []


@pytest.mark.slow
def test_divergence_is_an_outcome(sweep):
    t = _trials(sweep[0])["nan@1"]
    assert t["outcome"] == "diverged" and "non-finite" in t["error"] and t["attempts"] == 1


@pytest.mark.slow
def test_clean_trial_has_steps_predictions_and_placement(sweep):
    tmp = sweep[0]
    t = _trials(tmp)["none"]
    assert t["outcome"] == "ok" and t["steps_completed"] == 4 and t["n_reports"] == 2
    assert t["final_val_n"] == 4 and t["objective"] == t["final_val_exact_match"]
    assert t["node_id"] and t["hostname"] and t["start_time"] < t["end_time"]
    assert t["train_data"].endswith("train.parquet") and t["max_steps"] == 4 and t["searched"] == ["fault", "lr"]
    # one worker, as the job counted it: its peak is the only rank's (2-worker rows: test_parallel_sweep.py)
    assert t["workers"] == 1 and t["rank_peak_memory_bytes"] == [t["peak_memory_bytes"]] > [0]
    preds = pq.read_table(tmp / "results" / "predictions", filters=[("trial_id", "=", t["trial_id"])]).to_pylist()
    assert len(preds) == 4 and len({p["sample_id"] for p in preds}) == 4


@pytest.mark.slow
def test_optuna_learns_oom_as_failed_and_divergence_as_pruned(sweep):
    tmp = sweep[0]
    from optuna.trial import TrialState

    files = sorted(glob.glob(str(tmp / "sweeps" / "faults" / "searcher-state-*.pkl")))
    assert files
    with open(files[-1], "rb") as f:
        study = pickle.load(f)["_ot_study"]
    states = {t.params.get("lr"): t.state for t in study.trials}
    by_fault = {r["fault"] or "none": r["lr"] for r in _trials(tmp).values()}
    assert states[by_fault["oom@2"]] == TrialState.FAIL
    assert states[by_fault["nan@1"]] == TrialState.PRUNED
    assert states[by_fault["none"]] == TrialState.COMPLETE
    assert states[by_fault["crash@3"]] == TrialState.COMPLETE


@pytest.mark.slow
def test_progress_table_and_leaderboard_are_printed(sweep):
    out = sweep[1].stdout
    assert "trials of 4:" in out and "Leaderboard of sweep faults" in out
    assert "1 oom" in out and "1 diverged" in out


@pytest.mark.slow
def test_rays_own_lines_go_to_the_log_file_not_the_terminal(sweep):
    """The terminal holds the sweep's lines; Ray's INFO lines and token-auth notice land in RESULTS/logs/NAME.log."""
    tmp, proc = sweep
    log = (tmp / "results" / "logs" / "faults.log").read_text()
    assert "Started a local Ray instance" in log and "packaging.py" in log
    terminal = proc.stdout + proc.stderr
    for ray_line in ("packaging.py", "Token authentication", "Started a local Ray instance", "INFO"):
        assert ray_line not in terminal


@pytest.mark.slow
def test_query_reads_the_sweep(sweep):
    tmp = sweep[0]
    proc = mdsweep("query", str(tmp / "results"), "--group-by", "outcome", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("outcome,count,ok") and len(lines) == 4  # ok, oom, diverged


@pytest.mark.slow
def test_the_same_name_is_refused_and_points_to_resume(sweep, captcha_parquet):
    tmp = sweep[0]
    proc = mdsweep("run", "--name", "faults", "--storage", str(tmp / "sweeps"), "--results", str(tmp / "results"),
                   *job_flags(captcha_parquet))
    assert proc.returncode == 2 and "mdsweep resume faults" in proc.stderr


def test_invalid_space_fails_before_ray_starts(tmp_path, captcha_parquet):
    bad = tmp_path / "bad.py"
    bad.write_text("def space(trial):\n    return {'learning_rate': trial.suggest_float('learning_rate', 1e-5, 1e-3)}\n")
    proc = mdsweep("run", "--space", f"{bad}:space", "--storage", str(tmp_path / "s"), "--results",
                   str(tmp_path / "r"), *job_flags(captcha_parquet), timeout=60)
    assert proc.returncode == 2
    assert "--space" in proc.stderr and "'learning_rate' is not a JobConfig field" in proc.stderr
    assert not (tmp_path / "r" / "logs").exists() and not (tmp_path / "s").exists()  # Ray never started


def test_missing_train_data_names_the_flag(tmp_path):
    proc = mdsweep("run", "--storage", str(tmp_path / "s"), timeout=60)
    assert proc.returncode == 2 and "--train-data is required" in proc.stderr


def test_missing_test_data_fails_before_ray_starts_naming_the_flag(tmp_path, captcha_parquet):
    proc = mdsweep("run", "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"),
                   *job_flags(captcha_parquet), "--test-data", str(tmp_path / "held-out.parquet"), timeout=60)
    assert proc.returncode == 2 and f"--test-data: {tmp_path / 'held-out.parquet'}: path does not exist" in proc.stderr
    assert "Ray" not in proc.stderr


# --- the model out of the sweep: export, then predict --------------------------------------------------------


@pytest.fixture(scope="module")
def exported(sweep, tmp_path_factory):
    tmp = sweep[0]
    out = tmp_path_factory.mktemp("export") / "best"
    proc = mdsweep("export", str(tmp / "results"), "--sweep", "faults", "--best", "--out", str(out))
    return out, proc


@pytest.mark.slow
def test_export_best_writes_the_official_layout_and_a_card(sweep, exported):
    out, proc = exported
    assert proc.returncode == 0, proc.stderr
    import json

    card = json.loads((out / "model_card.json").read_text())
    best = max((t for t in _trials(sweep[0]).values() if t["outcome"] == "ok"),
               key=lambda t: (t["objective"], [-ord(c) for c in t["trial_id"]]))
    assert card["trial_id"] == best["trial_id"] and card["sweep"] == "faults"
    assert card["job_config"]["lr"] == best["lr"] and card["final_metrics"]["val_n"] == 4
    assert (out / "model.safetensors").is_file() and (out / "mdsweep_config.json").is_file()
    # the tokenizer the trial used, in its row and in the card (the tiny preset's built-in one)
    record = {"tokenizer_source": "char (built in)", "tokenizer_bos_id": 0, "tokenizer_eos_id": 0,
              "tokenizer_template": "moondream2-2025"}
    assert {k: card[k] for k in record} == record == {k: best[k] for k in record}
    assert f"exported trial {best['trial_id']}" in proc.stdout and "mdsweep predict --model" in proc.stdout


@pytest.mark.slow
def test_exported_weights_reload_bit_identical_to_the_trial(sweep, exported):
    import torch

    from trainer.checkpoint import load_checkpoint
    from trainer.export import read_model_card
    from trainer.job_model import seed_everything
    from trainer.model.loading import load_model

    out = exported[0]
    card = read_model_card(out)
    trial = _trials(sweep[0])
    row = next(t for t in trial.values() if t["trial_id"] == card["trial_id"])
    trained = load_checkpoint(Path(row["checkpoint_path"]))["model"]
    reloaded = load_model(str(out)).model.state_dict()
    assert trained and all(torch.equal(reloaded[k], v) for k, v in trained.items())
    seed_everything(row["seed"])  # the frozen parts are the trial's seeded base
    base = load_model(row["model"]).model.state_dict()
    frozen = [k for k in base if k not in trained]
    assert frozen and all(torch.equal(reloaded[k], base[k]) for k in frozen)


@pytest.mark.slow
def test_predict_cli_prints_metrics_and_writes_parquet(exported, captcha_parquet, tmp_path):
    out = exported[0]
    proc = mdsweep("predict", "--model", str(out), "--data", str(captcha_parquet), "--limit", "6", "--show", "2",
                   "--out", str(tmp_path / "p.parquet"))
    assert proc.returncode == 0, proc.stderr
    assert "exact match" in proc.stdout and "95 % Wilson interval, n=6" in proc.stdout and "images/s" in proc.stdout
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert len(rows) == 6 and {"sample_id", "prediction", "target", "correct", "cer"} <= set(rows[0])


@pytest.mark.slow
def test_predict_cli_reads_unlabelled_images(exported, tmp_path):
    from trainer.data.synth import generate_samples

    for label, png in generate_samples(3, length=4, seed=7):
        (tmp_path / f"img_{label}.png").write_bytes(png)
    proc = mdsweep("predict", "--model", str(exported[0]), "--images", str(tmp_path), "--out",
                   str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    assert "3 images in" in proc.stdout and "exact match" not in proc.stdout
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == '"sample_id","prediction"'


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--sweep", "nosuch", "--best"], "no sweep 'nosuch'"),
    (["--sweep", "faults", "--trial", "zzz"], "no trial 'zzz' in sweep 'faults'; its trials:"),
])
def test_export_errors_are_one_line(sweep, tmp_path, args, message):
    proc = mdsweep("export", str(sweep[0] / "results"), *args, "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault,outcome", [("oom@2", "oom"), ("nan@1", "diverged")])
def test_export_refuses_a_trial_that_did_not_end_ok(sweep, tmp_path, fault, outcome):
    trial = _trials(sweep[0])[fault]["trial_id"]
    proc = mdsweep("export", str(sweep[0] / "results"), "--sweep", "faults", "--trial", trial, "--out",
                   str(tmp_path / "m"))
    assert proc.returncode == 2 and f"trial {trial} ended '{outcome}'" in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_export_refuses_a_trial_that_ended_in_error(sweep, tmp_path):
    """An `error` trial (the job raised; Tune gave up on it) may have left a checkpoint: export must refuse it all the
    same. Shown on a copy of the sweep whose clean trial is recorded as `error`, its checkpoint still in place."""
    import shutil

    from orchestrator.results.store import update_trial_row

    results = tmp_path / "results"
    shutil.copytree(sweep[0] / "results", results)
    trial = _trials(sweep[0])["none"]
    assert Path(trial["checkpoint_path"]).is_dir()
    update_trial_row(results, "faults", trial["trial_id"], {"outcome": "error", "error": "RuntimeError: boom"})
    proc = mdsweep("export", str(results), "--sweep", "faults", "--trial", trial["trial_id"], "--out",
                   str(tmp_path / "m"))
    assert proc.returncode == 2 and f"trial {trial['trial_id']} ended 'error'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_export_says_when_storage_is_gone(sweep, tmp_path, capsys):
    """Through the CLI, on a copy of the sweep whose --storage was moved away: one line, exit 2, nothing written."""
    import shutil

    from orchestrator.cli.main import main

    from orchestrator.results.store import read_partition, update_trial_row

    tmp = tmp_path / "moved"
    shutil.copytree(sweep[0] / "results", tmp / "results")
    storage = str(sweep[0] / "sweeps")
    for trial in read_partition(tmp / "results", "trials", "faults"):  # as if that storage were now elsewhere
        if trial.get("checkpoint_path"):
            moved = trial["checkpoint_path"].replace(storage, str(tmp / "gone"))
            update_trial_row(tmp / "results", "faults", trial["trial_id"], {"checkpoint_path": moved})
    assert main(["export", str(tmp / "results"), "--sweep", "faults", "--best", "--out", str(tmp / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdsweep export: error: checkpoint ")
    assert err[0].endswith("was the sweep's --storage moved or deleted?") and not (tmp / "m").exists()


@pytest.mark.slow
def test_export_will_not_overwrite_without_force(sweep, exported):
    proc = mdsweep("export", str(sweep[0] / "results"), "--sweep", "faults", "--best", "--out", str(exported[0]))
    assert proc.returncode == 2 and "--force" in proc.stderr


def _snapshot(directory: Path) -> dict[str, int]:
    return {str(f.relative_to(directory)): f.stat().st_size for f in directory.rglob("*") if f.is_file()}


@pytest.mark.slow
def test_export_force_never_deletes_what_it_did_not_write(sweep, tmp_path, monkeypatch, capsys):
    """--force used to rmtree --out: the results it was reading, the current directory. Each refusal is one line
    and leaves every file where it was; a previous export is replaced file by file, other files kept."""
    from orchestrator.cli.main import main

    tmp = sweep[0]
    results, storage = tmp / "results", tmp / "sweeps"
    before = {d: _snapshot(d) for d in (results, storage)}
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "data.bin").write_text("theirs")
    for out, message in [(results, "is or holds the results"), (tmp, "is or holds the results"),
                         (results / "trials", "lies inside the results"), (storage, "is or holds the sweep's storage"),
                         (storage / "faults" / "x", "lies inside the sweep's storage"),
                         (Path("."), "is or holds the working directory"),
                         (tmp_path / "a-file", "is a file"),
                         (tmp_path / "someone", "holds files but no previous export")]:
        code = main(["export", str(results), "--sweep", "faults", "--best", "--out", str(out), "--force"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (out, err)
    assert {d: _snapshot(d) for d in (results, storage)} == before
    assert (work / "notes.txt").read_text() == "mine" and (tmp_path / "someone" / "data.bin").read_text() == "theirs"

    previous = tmp_path / "previous"
    assert main(["export", str(results), "--sweep", "faults", "--best", "--out", str(previous)]) == 0
    (previous / "notes.txt").write_text("kept")
    (previous / "model_card.json").write_text('{"old": true}')
    assert main(["export", str(results), "--sweep", "faults", "--best", "--out", str(previous), "--force"]) == 0
    assert (previous / "notes.txt").read_text() == "kept"
    assert "old" not in (previous / "model_card.json").read_text()


@pytest.mark.slow
def test_export_force_refuses_the_trials_own_model_and_home(sweep, exported, tmp_path, monkeypatch, capsys):
    """The probe's LOSS, through the CLI: a sweep whose --model is a previous export (here the best trial's row
    pointed at one), exported with --force into that export, lost its tokenizer.json and weights. Also `--out ~`,
    with HOME a temporary folder."""
    import shutil

    from orchestrator.cli.main import main
    from orchestrator.results.store import update_trial_row

    results, previous = tmp_path / "results", tmp_path / "previous"
    shutil.copytree(sweep[0] / "results", results)
    shutil.copytree(exported[0], previous)
    best = _trials(sweep[0])["none"]
    update_trial_row(results, "faults", best["trial_id"], {"model": str(previous)})
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    before = _snapshot(previous)
    for out, message in [(previous, f"is or holds the trial's --model {previous}"),
                         (Path("~"), "is or holds the home directory")]:
        assert main(["export", str(results), "--sweep", "faults", "--trial", best["trial_id"], "--out", str(out),
                     "--force"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (out, err)
    assert _snapshot(previous) == before and [f.name for f in home.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_the_best_trials_are_tested_on_held_out_data_as_their_export_scores(sweep, exported, captcha_test_parquet):
    from trainer.data.dataset import load_samples
    from trainer.export import read_model_card
    from trainer.model.loading import load_model
    from trainer.predict import PredictSettings, predict

    trials = list(_trials(sweep[0]).values())
    ranked = sorted((t for t in trials if t["outcome"] == "ok"), key=lambda t: (-t["objective"], t["trial_id"]))
    tested = {t["trial_id"]: t for t in trials if t["test_n"] is not None}
    assert len(ranked) >= 2 and set(tested) == {t["trial_id"] for t in ranked[:2]}  # --test-top 2, ok ones only
    assert all(t["test_n"] == 24 and t["test_data"] == str(captcha_test_parquet) for t in tested.values())

    card = read_model_card(exported[0])
    config = card["job_config"]
    settings = PredictSettings(attention=config["attention"], batch_size=config["batch_size"],
                               max_new_tokens=config["max_new_tokens"])
    metrics, _ = predict(load_model(str(exported[0])), load_samples(captcha_test_parquet).samples, settings)
    best = tested[card["trial_id"]]
    assert (metrics["val_exact_match"], metrics["val_cer"]) == (best["test_exact_match"], best["test_cer"])
    out = sweep[1].stdout
    assert "on held-out --test-data: exact match" in out and "test_exact_match" in out  # summary and leaderboard
    assert f"testing the 2 best trial(s) on --test-data {captcha_test_parquet}" in sweep[1].stderr
    page = (sweep[0] / "results" / "report-faults.html").read_text()
    assert f"held-out test</th><td>exact match {best['test_exact_match']:.3f}" in page and "test exact match" in page


@pytest.mark.slow
def test_sweep_prints_what_it_found(sweep):
    out = sweep[1].stdout
    assert "Best: trial" in out and "Its model: mdsweep export" in out


def test_a_sweep_in_which_no_trial_works_exits_non_zero_with_the_first_error(tmp_path):
    from PIL import Image

    # readable data (the driver's check passes) whose labels the model's tokenizer cannot write: every trial fails
    folder = tmp_path / "unwritable"
    folder.mkdir()
    for i, label in enumerate(("日本", "東京", "大阪", "京都")):
        Image.new("RGB", (200, 50), (255, 255, 255)).save(folder / f"{label}.png")
    proc = mdsweep("run", "--name", "broken", "--space", "smoke", "--num-samples", "1", "--storage",
                   str(tmp_path / "s"), "--results", str(tmp_path / "r"), "--num-cpus", "2", "--quiet",
                   *job_flags(folder), "--set", "val_fraction=0.5")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == ""  # --quiet: no table, no leaderboard; but the failure is said, on stderr
    assert "No trial ended ok" in proc.stderr and "First failure, trial" in proc.stderr
    assert "cannot be encoded" in proc.stderr
    assert f"on node {socket.gethostname()}" in proc.stderr  # data errors name the node that read the data


def test_a_corrupt_dataset_fails_before_ray_starts_naming_the_flag(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    proc = mdsweep("run", "--name", "broken", "--space", "smoke", "--num-samples", "1", "--storage",
                   str(tmp_path / "s"), "--results", str(tmp_path / "r"), "--num-cpus", "2",
                   "--progress-interval", "0", *job_flags(corrupt))
    assert proc.returncode == 2 and "--train-data" in proc.stderr and "corrupt.parquet" in proc.stderr
    assert not (tmp_path / "r" / "logs").exists() and not (tmp_path / "s" / "broken").exists()  # no Ray


@pytest.mark.slow
def test_a_multi_objective_sweep_prints_its_pareto_front(tmp_path, captcha_parquet):
    where = ["--storage", str(tmp_path / "sweeps")]
    proc = mdsweep("run", "--name", "pareto", "--space", "smoke", "--num-samples", "3", *where,
                   "--results", str(tmp_path / "results"), "--num-cpus", "2", "--progress-interval", "0",
                   "--objective", "val_exact_match:max", "--objective", "elapsed_s:min",
                   *job_flags(captcha_parquet))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = proc.stdout + proc.stderr
    assert "Pareto front over val_exact_match (max), elapsed_s (min)" in summary
    front = mdsweep("query", str(tmp_path / "results"), "--sweep", "pareto", "--pareto", "--format", "csv")
    assert front.returncode == 0, front.stderr
    header, *lines = front.stdout.strip().splitlines()
    assert "final_val_exact_match" in header and "final_elapsed_s" in header
    # the front, computed here from the trials table: ok trials no other ok trial beats on both objectives
    ok = [t for t in pq.read_table(tmp_path / "results" / "trials").to_pylist() if t["outcome"] == "ok"]

    def beaten(t: dict) -> bool:
        a, b = t["final_val_exact_match"], t["final_elapsed_s"]
        return any(o["final_val_exact_match"] >= a and o["final_elapsed_s"] <= b
                   and (o["final_val_exact_match"] > a or o["final_elapsed_s"] < b) for o in ok)

    expected = {t["trial_id"] for t in ok if not beaten(t)}
    column = header.replace('"', "").split(",").index("trial_id")
    assert {line.replace('"', "").split(",")[column] for line in lines} == expected and expected
    printed = {tid for tid in (t["trial_id"] for t in ok) if f"  {tid}: val_exact_match=" in summary}
    assert printed == expected
    sweep_row = pq.read_table(tmp_path / "results" / "sweeps").to_pylist()[0]
    assert sweep_row["objectives_json"] == '[["val_exact_match", "max"], ["elapsed_s", "min"]]'


def _evaluations(steps: list[dict], trial_id: str) -> list[tuple[int, float]]:
    """(samples_seen, val_exact_match) of a trial's evaluations, as the Parquet steps table has them."""
    return sorted((s["samples_seen"], s["val_exact_match"]) for s in steps
                  if s["trial_id"] == trial_id and s["val_exact_match"] is not None)


def _one_tensorboard_run_per_trial(folder: Path, trials: list[dict], steps: list[dict]) -> None:
    """One run folder per trial, read back with TensorBoard's own reader: each evaluation once, by samples."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator

    assert sorted(p.name for p in folder.iterdir()) == sorted(t["trial_id"] for t in trials)
    for trial in trials:
        events = EventAccumulator(str(folder / trial["trial_id"]), size_guidance={SCALARS: 0, TENSORS: 0})
        events.Reload()
        assert len(list((folder / trial["trial_id"]).glob("events.out.tfevents.*"))) == 2  # a driver each
        logged, expected = sorted((e.step, e.value) for e in events.Scalars("val_exact_match")), \
            _evaluations(steps, trial["trial_id"])
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected])  # TensorBoard keeps float32
        assert {tag.split("/")[0] for tag in events.Tags()[TENSORS]} == {"settings", "outcome", "best"}


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (`run-ID.wandb`), read with W&B's own protobuf messages. The file is
    a 7-byte header (":W&B", a magic number, a version) and then LevelDB's log format: 32 KiB blocks of records,
    each behind a 7-byte header (CRC, length, kind: 1 whole, 2 first, 3 middle, 4 last piece)."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, records, pending, pos, block = path.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a header: the rest of the block is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (kind, length) == (0, 0):
            break
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def _one_wandb_run_per_trial(folder: Path, sweep: str, trials: list[dict], steps: list[dict]) -> None:
    """One folder per trial, whose offline pieces (one per driver that ran it, and one that tags the best) share
    one run id, so `wandb sync` makes one run: the trial's settings as config, each evaluation once by samples."""
    import json

    from orchestrator.tracking.wandb_runs import run_id

    assert sorted(p.name for p in folder.iterdir()) == sorted(t["trial_id"] for t in trials)
    for trial in trials:
        pieces = sorted((folder / trial["trial_id"] / "wandb").glob("offline-run-*"))
        assert len(pieces) >= 2 and {p.name.rsplit("-", 1)[-1] for p in pieces} == \
            {run_id(sweep, trial["trial_id"]).rsplit("-", 1)[-1]}
        records = [r for p in pieces for r in _wandb_records(next(p.glob("run-*.wandb")))]
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert {r.run_id for r in runs} == {run_id(sweep, trial["trial_id"])}
        assert {r.display_name for r in runs} == {f"{sweep}/{trial['trial_id']}"}
        config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in runs[0].config.update}
        assert {k: config[k] for k in ("lr", "grad_accum", "attention")} == \
            {k: trial[k] for k in ("lr", "grad_accum", "attention")}
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        assert sorted((h["samples_seen"], h["val_exact_match"]) for h in history) == \
            _evaluations(steps, trial["trial_id"])
        assert "best" in {tag for r in runs for tag in r.tags}
        attached = (folder / trial["trial_id"] / "wandb").glob(f"offline-run-*/files/report-{sweep}.html")
        assert len(list(attached)) == 1  # the sweep's report, among the best run's files


def _one_mlflow_run_per_trial(tracking: str, sweep: str, trials: list[dict], steps: list[dict]) -> None:
    """MLflow holds exactly one run per trial, named SWEEP/TRIAL, with the trial's settings, each evaluation's
    metrics once at its samples_seen, its outcome, and the best trial tagged with the sweep's report attached."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name(sweep).experiment_id])
    assert sorted(r.data.tags["mdsweep.trial_id"] for r in runs) == sorted(t["trial_id"] for t in trials)
    for run in runs:
        (trial,) = [t for t in trials if t["trial_id"] == run.data.tags["mdsweep.trial_id"]]
        assert run.info.run_name == f"{sweep}/{trial['trial_id']}" and run.info.status == "FINISHED"
        assert run.data.tags["outcome"] == trial["outcome"]
        assert {k: run.data.params[k] for k in ("lr", "grad_accum", "attention")} == \
            {k: str(trial[k]) for k in ("lr", "grad_accum", "attention")}
        history = client.get_metric_history(run.info.run_id, "val_exact_match")
        expected = sorted((s["samples_seen"], s["val_exact_match"]) for s in steps if s["trial_id"] == trial["trial_id"])
        assert sorted((m.step, m.value) for m in history) == expected
    (best,) = [r for r in runs if r.data.tags.get("mdsweep.best") == "true"]
    assert [a.path for a in client.list_artifacts(best.info.run_id)] == [f"report-{sweep}.html"]  # the report
    store = Path(tracking.removeprefix("sqlite:///")).parent  # its files beside the database, not in ./mlruns
    assert best.info.artifact_uri.startswith((store / "mlartifacts" / sweep).as_uri())
    assert (Path(best.info.artifact_uri.removeprefix("file://")) / f"report-{sweep}.html").is_file()
    assert not (ROOT / "mlruns").exists()


@pytest.mark.slow
@pytest.mark.parametrize("table", ["sweeps", "trials"])
def test_export_names_a_results_file_that_is_not_parquet(sweep, tmp_path, table, capsys):
    import shutil

    from orchestrator.cli.main import main

    results = tmp_path / "results"
    shutil.copytree(sweep[0] / "results", results)
    broken = sorted((results / table / "sweep=faults").glob("*.parquet"))[0]
    broken.write_bytes(b"garbage")
    assert main(["export", str(results), "--sweep", "faults", "--best", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mdsweep export: error: {broken}: not readable Parquet (")
    assert not (tmp_path / "m").exists()


GATED_JOB = """
import os
import time
from pathlib import Path

from trainer.job import run_job

def job(config, on_step=None, **kwargs):
    print("the trial speaks", flush=True)
    gate = Path(os.environ["MDSWEEP_TEST_GATE"])

    def step(metrics):
        if on_step is not None:
            on_step(metrics)
        if metrics["step"] == 7:  # the report of step 6 has been taken: its checkpoint is registered
            (gate.parent / "at-the-gate").touch()
            while not gate.exists():
                time.sleep(0.1)

    return run_job(config, on_step=step, **kwargs)
"""


@pytest.mark.slow
def test_ctrl_c_after_the_results_disks_failed_saves_the_sweep_and_resume_puts_back_every_row(tmp_path,
                                                                                              captcha_parquet):
    """After its first rows, the steps table's disk fills up and the trials and predictions tables' disks turn
    read-only: the trial goes on in Tune and the rows not written are warned about. Then Ctrl-C in the terminal
    (SIGINT to the driver's whole process group, the embedded cluster's processes included), while the trial
    waits after step 7 (its job holds it there, so the moment is the same on a fast or a loaded machine): the state
    is saved, the line says how to resume, exit 3. Once space is freed and the disks are writable again, `mdsweep
    resume` goes on from the step-6 checkpoint, and every row is there once, the rows of steps 4 and 6 that the
    full disk refused included. SIGTERM, which reaches the driver alone, is tested on the same path in
    test_object_storage.py (exit 143).

    Linux refuses to make a mount read-only while a file on it is open for writing, and the sweep's lock stays open
    in the `sweeps` table for its whole life, so each of the other tables gets a tmpfs of its own. The sweep runs
    with `--ray-logs` and `--worker-logs` (the default is tested on the module's sweep): Ray's lines and the
    trial's own print reach the terminal, and no log file is written. It also logs to a real MLflow store, to W&B
    offline and to TensorBoard: one run for the trial across both drivers in each, each evaluation once."""
    from orchestrator.results.store import read_partition

    results, storage = tmp_path / "results", tmp_path / "sweeps"
    full, read_only = results / "steps", [results / "trials", results / "predictions"]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "gated_job.py").write_text(GATED_JOB)
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "MDSWEEP_TEST_GATE": str(tmp_path / "gate"),
           "WANDB_MODE": "offline", "WANDB_PROJECT": "tests"}
    argv = ["run", "--name", "disks", "--space", "smoke", "--num-samples", "1", "--num-cpus", "2", "--storage",
            str(storage), "--results", str(results), "--progress-interval", "1", "--ray-logs", "--worker-logs",
            "--job-fn", "gated_job:job", "--log-to", f"mlflow={tracking}", "--log-to", f"wandb={tmp_path / 'wandb'}",
            "--log-to", f"tensorboard={tmp_path / 'tb'}", *job_flags(captcha_parquet, 12)]
    mounted: list[Path] = []
    try:
        for folder in (full, *read_only):
            folder.mkdir(parents=True)
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)]).returncode != 0:
                pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
            mounted.append(folder)
        with running_driver(argv, env=env, log_path=tmp_path / "driver.log") as driver:
            wait_until(lambda: read_partition(results, "steps", "disks"), "a trial's first steps", 240, driver)
            with open(full / "filler", "wb") as filler:  # the steps disk is full from here on
                with contextlib.suppress(OSError):
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
            for folder in read_only:  # busy for the instant a row is being written: try again
                wait_until(lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)]).returncode == 0,
                           f"{folder} remounted read-only", 60, interval_s=0.05)
            wait_until(lambda: (tmp_path / "at-the-gate").exists(), "the trial at step 7", 240, driver)
            os.killpg(driver.pid, signal.SIGINT)
            code = driver.wait(timeout=120)
        terminal = (tmp_path / "driver.log").read_text()
        assert code == 3, terminal[-3000:]
        assert "Traceback" not in terminal
        assert f"sweep disks is interrupted: continue it with `mdsweep resume disks --storage {storage}`" in terminal
        assert read_partition(results, "sweeps", "disks")[0]["status"] == "interrupted"
        # the first three failed writes are warned about, whichever disk they met: steps 4 and 6 at least
        assert terminal.count("mdsweep: warning: could not write ") == 3, terminal[-3000:]
        assert "could not write steps" in terminal and "No space left on device" in terminal
        assert [s["step"] for s in read_partition(results, "steps", "disks")] == [2]  # the full disk lost rows
        assert "Started a local Ray instance" in terminal and not (results / "logs").exists()  # --ray-logs
        assert "the trial speaks" in terminal  # --worker-logs

        (full / "filler").unlink()
        for folder in read_only:
            subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=True)
        (tmp_path / "gate").touch()
        resumed = mdsweep("resume", "disks", "--storage", str(storage), "--quiet", env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        # quiet, although the run it resumes printed its progress table; its --worker-logs carry over
        assert [line for line in resumed.stdout.splitlines() if "the trial speaks" not in line] == []
        assert "the trial speaks" in resumed.stdout
        assert "warning" not in resumed.stderr, resumed.stderr[-3000:]  # no write and no tracker failed
        (trial,) = read_partition(results, "trials", "disks")
        assert trial["outcome"] == "ok" and trial["status"] == "terminated" and trial["restored_from_step"] == 6
        assert trial["attempts"] >= 1
        steps = read_partition(results, "steps", "disks")
        assert sorted((s["trial_id"], s["step"]) for s in steps) == [(trial["trial_id"], s) for s in range(2, 13, 2)]
        keys = [(p["trial_id"], p["sample_id"]) for p in read_partition(results, "predictions", "disks")]
        assert len(keys) == len(set(keys)) == 4
        assert read_partition(results, "sweeps", "disks")[0]["status"] == "finished"
        _one_mlflow_run_per_trial(tracking, "disks", [trial], steps)
        _one_wandb_run_per_trial(tmp_path / "wandb" / "disks", "disks", [trial], steps)
        _one_tensorboard_run_per_trial(tmp_path / "tb" / "disks", [trial], steps)
    finally:
        for folder in mounted:
            subprocess.run(["umount", "-l", str(folder)])


@pytest.mark.slow
def test_an_embedded_cluster_ends_with_its_driver_even_after_kill_9(tmp_path, captcha_parquet):
    """`kill -9` of the driver alone must not leave Ray's agents (or a trial's worker) alive: the watchdog the
    driver starts ends every process of the embedded cluster within seconds."""
    import psutil

    from orchestrator.results.store import read_partition

    results = tmp_path / "results"
    argv = ["run", "--name", "orphans", "--space", "smoke", "--num-samples", "1", "--num-cpus", "2", "--storage",
            str(tmp_path / "sweeps"), "--results", str(results), "--quiet", *job_flags(captcha_parquet, 400)]
    cluster: list[psutil.Process] = []
    try:
        with running_driver(argv, log_path=tmp_path / "driver.log") as driver:
            # a trial is running: every kind of process is up
            wait_until(lambda: read_partition(results, "steps", "orphans"), "a trial's first steps", 240, driver)
            cluster = psutil.Process(driver.pid).children(recursive=True)
            names = " ".join(p.name() + " " + " ".join(p.cmdline()) for p in cluster)
            assert "DashboardAgent" in names and "RuntimeEnvAgent" in names and "raylet" in names
            driver.send_signal(signal.SIGKILL)  # the driver alone: its cluster must end by itself
            driver.wait(timeout=30)
            _gone, alive = psutil.wait_procs(cluster, timeout=20)
            assert not alive, [p.name() for p in alive]
    finally:
        for process in cluster:
            with contextlib.suppress(psutil.Error):
                process.kill()


@pytest.mark.slow
def test_a_trial_rays_memory_monitor_kills_is_host_oom_with_a_short_account(tmp_path, captcha_parquet):
    """The node's host RAM, not the GPU's: a threshold of 1 % of the machine's memory makes Ray's memory monitor
    kill the trial's worker at once, every time."""
    from orchestrator.results.store import read_partition

    proc = mdsweep("run", "--name", "hostoom", "--space", "smoke", "--num-samples", "1", "--num-cpus", "2",
                   "--max-failures", "1", "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"),
                   "--quiet", *job_flags(captcha_parquet),
                   env={"RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    (trial,) = read_partition(tmp_path / "r", "trials", "hostoom")
    assert trial["outcome"] == "host_oom" and trial["num_failures"] == 2  # the first run and its one retry
    assert trial["error"].startswith("killed by Ray's memory monitor: the node ran low on host memory.")
    assert "OOM kill reason: Memory usage" in trial["error"] and len(trial["error"]) < 1500
    assert "First failure, trial" in proc.stderr and "(host_oom)" in proc.stderr

    # `resume --restart-errored` runs the errored trial's settings again from scratch (Tune gives the rerun a new
    # trial id): without the low threshold, to the end, in the trial's one row
    resumed = mdsweep("resume", "hostoom", "--storage", str(tmp_path / "s"), "--restart-errored", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (rerun,) = read_partition(tmp_path / "r", "trials", "hostoom")
    assert rerun["outcome"] == "ok" and rerun["trial_id"] != trial["trial_id"]
    assert rerun["lr"] == trial["lr"] and rerun["steps_completed"] == 4 and rerun["restored_from_step"] == 0
    assert rerun["attempts"] == trial["attempts"] + 1  # the errored row's count goes on
    assert {s["trial_id"] for s in read_partition(tmp_path / "r", "steps", "hostoom")} == {rerun["trial_id"]}


ASHA_SPACE = """
LRS = [1e-3, 1e-5, 3e-4, 2e-5]  # good, poor, best, poor: in this order ASHA keeps the good ones

def space(trial):
    return {"lr": LRS[trial.number % len(LRS)]}
"""


@pytest.mark.slow
def test_asha_stops_the_weak_trials_of_a_real_sweep_and_budgets_are_recorded(tmp_path, captcha_parquet):
    """ASHA on a real Tune run (the torch-free stand-in job: its metric follows lr): the trials far from the best
    learning rate end `stopped` at a rung, the others run to the end; every trial's samples seen is recorded."""
    space = tmp_path / "space.py"
    space.write_text(ASHA_SPACE)
    proc = mdsweep("run", "--name", "asha", "--space", f"{space}:space", "--num-samples", "4", "--max-concurrent",
                   "1", "--num-cpus", "2", "--job-fn", "trainer.standin_job:run_standin_job", "--train-data",
                   str(captcha_parquet), "--max-steps", "8", "--eval-every", "1", "--batch-size", "4",
                   "--early-stop", "asha", "--asha-grace", "2", "--asha-reduction-factor", "2", "--storage",
                   str(tmp_path / "s"), "--results", str(tmp_path / "r"), "--quiet",
                   env={"MDSWEEP_STANDIN_SECONDS": "0.05", "RAY_ADDRESS": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {t["lr"]: t for t in pq.read_table(tmp_path / "r" / "trials").to_pylist()}
    assert {lr: t["outcome"] for lr, t in trials.items()} == {1e-3: "ok", 3e-4: "ok", 1e-5: "stopped",
                                                              2e-5: "stopped"}
    for t in trials.values():
        ran = 8 if t["outcome"] == "ok" else t["steps_completed"]
        assert t["final_samples_seen"] == ran * 4  # batch 4 x grad_accum 1 per step
    assert all(t["steps_completed"] < 8 for t in trials.values() if t["outcome"] == "stopped")


# --- export guards that need no sweep ------------------------------------------------------------------------


def _previous_export(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory as an export leaves it (weights, config, tokenizer.json, card), and a step-2 job checkpoint
    that trained nothing: the probe's case of a sweep whose --model is a previous export."""
    from conftest import write_bpe_model
    from trainer.checkpoint import save_checkpoint
    from trainer.export import MODEL_CARD
    from trainer.model.synth_tokenizer import write_bpe_tokenizer

    previous = write_bpe_model(tmp_path / "previous")
    write_bpe_tokenizer(previous)
    (previous / MODEL_CARD).write_text("{}")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_checkpoint(checkpoint, {"progress": {"step": 2}, "model": {}})
    return previous, checkpoint


def test_export_refuses_to_replace_the_model_it_reads(tmp_path):
    """`export --out DIR --force` with DIR the trial's own --model (a previous export) removed DIR's tokenizer.json,
    then skipped copying it (source == destination), and overwrote the weights it was built from."""
    from trainer.export import export_checkpoint
    from trainer.job_config import JobConfig
    from trainer.model.layouts import CheckpointError

    previous, checkpoint = _previous_export(tmp_path)
    before = {f.name: f.read_bytes() for f in previous.iterdir()}
    assert "tokenizer.json" in before
    for out in (previous, previous.parent):
        with pytest.raises(CheckpointError, match=rf"--out {out} is or holds the trial's --model"):
            export_checkpoint(checkpoint, JobConfig(model=str(previous)), out, {}, final_step=2, replace=True)
    assert {f.name: f.read_bytes() for f in previous.iterdir()} == before


def test_export_out_under_a_file_or_home_is_one_line(tmp_path, monkeypatch):
    """`--out FILE/sub` was a NotADirectoryError traceback; `--out ~` is refused with HOME a temporary folder
    whose files stay as they were."""
    from orchestrator.cli.export import out_problem

    (tmp_path / "a-file").write_text("x")
    results = tmp_path / "results"
    results.mkdir()
    assert out_problem(tmp_path / "a-file" / "sub", False, results, None) == \
        f"--out {tmp_path / 'a-file' / 'sub'}: {tmp_path / 'a-file'} is a file, not a directory"
    home = tmp_path / "home"
    home.mkdir()
    (home / "model_card.json").write_text("{}")  # even what looks like a previous export
    monkeypatch.setenv("HOME", str(home))
    for force in (False, True):
        assert "is or holds the home directory" in out_problem(Path("~"), force, results, None)
    assert [f.name for f in home.iterdir()] == ["model_card.json"]
