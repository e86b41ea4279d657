"""`mdsweep train` writes its outcome and metrics as JSON and Parquet."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from harness import mdsweep, running_driver, wait_until
from orchestrator.cli.main import main


def test_train_writes_result_metrics_predictions_and_model(captcha_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--train-data", str(captcha_parquet), "--max-steps", "4", "--eval-every", "2",
                 "--val-fraction", "0.25", "--train-scope", "all", "--lr", "1e-3", "--out", str(out),
                 "--save-model", str(tmp_path / "model")])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["outcome"] == "ok" and result["step"] == 4
    assert pq.read_table(out / "steps.parquet").num_rows == 4
    assert pq.read_table(out / "reports.parquet").column("step").to_pylist() == [2, 4]
    assert pq.read_table(out / "predictions.parquet").num_rows == 24
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert "val exact match" in capsys.readouterr().out


def test_train_resume_continues_from_the_checkpoint(captcha_parquet, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--train-data", str(captcha_parquet), "--eval-every", "2", "--val-fraction", "0.25",
            "--out", str(out), "--resume"]
    assert main(args + ["--max-steps", "2"]) == 0
    first = pq.read_table(out / "steps.parquet").to_pylist()
    assert main(args + ["--max-steps", "4"]) == 0
    # the second invocation started after the step-2 checkpoint and kept the first one's rows
    assert pq.read_table(out / "steps.parquet").column("step").to_pylist() == [1, 2, 3, 4]
    assert pq.read_table(out / "reports.parquet").column("step").to_pylist() == [2, 4]
    # ...as the first one wrote them, timings included: a job that started over (training is deterministic)
    # would write the same steps and losses, but not the same samples per second
    assert pq.read_table(out / "steps.parquet").to_pylist()[:2] == first


@pytest.mark.slow
def test_a_crashed_train_resumes_with_every_row_once_and_the_weights_of_an_uninterrupted_run(captcha_parquet,
                                                                                             tmp_path):
    """The process dies at step 3 (after the step-2 checkpoint); `--resume` must keep steps 1-2 and the step-2
    report, run steps 3-4 once, and end where an uninterrupted run ends. Both starts log to one MLflow run."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    from orchestrator.tracking.trackers import TRAIN_GROUP, train_run_id

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def train(out, *extra):
        return mdsweep("train", "--train-data", str(captcha_parquet), "--max-steps", "4", "--eval-every", "2",
                       "--val-fraction", "0.25", "--out", str(out), "--save-model", str(out / "model"), *extra)

    crashed = train(tmp_path / "run", "--fault", "crash@3", "--log-to", f"mlflow={tracking}")
    assert crashed.returncode != 0
    assert pq.read_table(tmp_path / "run" / "steps.parquet").column("step").to_pylist() == [1, 2]  # on disk already
    resumed = train(tmp_path / "run", "--resume", "--log-to", f"mlflow={tracking}")
    assert resumed.returncode == 0, resumed.stderr
    assert pq.read_table(tmp_path / "run" / "steps.parquet").column("step").to_pylist() == [1, 2, 3, 4]
    reports = pq.read_table(tmp_path / "run" / "reports.parquet").to_pylist()
    assert [r["step"] for r in reports] == [2, 4]
    client = mlflow.MlflowClient(tracking_uri=tracking)
    (run,) = client.search_runs([client.get_experiment_by_name(TRAIN_GROUP).experiment_id])
    assert run.info.run_name == f"{TRAIN_GROUP}/{train_run_id(tmp_path / 'run')}" and run.info.status == "FINISHED"
    assert run.data.tags["outcome"] == "ok" and run.data.params["max_steps"] == "4"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_cer")) == \
        [(r["samples_seen"], r["val_cer"]) for r in reports]
    whole = train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    a, b = load_file(tmp_path / "run" / "model" / "model.safetensors"), load_file(tmp_path / "whole" / "model" /
                                                                                  "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = {r["step"]: r for r in pq.read_table(tmp_path / "run" / "steps.parquet").to_pylist()}
    whole_rows = {r["step"]: r for r in pq.read_table(tmp_path / "whole" / "steps.parquet").to_pylist()}
    assert [rows[s]["train_loss"] for s in rows] == [whole_rows[s]["train_loss"] for s in rows]


def test_train_names_the_missing_file(tmp_path, capsys):
    code = main(["train", "--train-data", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_failed_outcome_has_its_own_exit_code(captcha_parquet, tmp_path):
    code = main(["train", "--train-data", str(captcha_parquet), "--max-steps", "4", "--val-fraction", "0.25",
                 "--fault", "oom@2", "--out", str(tmp_path / "o")])
    assert code == 3
    assert json.loads((tmp_path / "o" / "result.json").read_text())["outcome"] == "oom"


@pytest.mark.slow
def test_ctrl_c_is_one_line_naming_the_last_checkpoint_and_resume_finishes(captcha_parquet, tmp_path):
    import os
    import signal

    out = tmp_path / "run"
    # evaluations (with generation) are most of a step's time: few of them keep the test short on a busy machine
    argv = ["train", "--train-data", str(captcha_parquet), "--max-steps", "60", "--eval-every", "10", "--batch-size",
            "2", "--max-val-samples", "4", "--val-fraction", "0.25", "--out", str(out)]
    with running_driver(argv) as job:
        wait_until(lambda: (out / "reports.parquet").is_file(), "the first report", 120, job)
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: to the job's whole process group
        _, err = job.communicate(timeout=60)
    assert job.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("mdsweep train: interrupted at step ") and "Traceback" not in err
    assert "the last checkpoint is at step " in last and "add --resume to the same command" in last
    checkpoint_step = int(last.split("the last checkpoint is at step ")[1].split()[0])
    steps = pq.read_table(out / "steps.parquet").column("step").to_pylist()
    assert steps[:checkpoint_step] == list(range(1, checkpoint_step + 1))
    resumed = mdsweep(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert pq.read_table(out / "steps.parquet").column("step").to_pylist() == list(range(1, 61))
    assert pq.read_table(out / "reports.parquet").column("step").to_pylist() == list(range(10, 61, 10))


def test_an_output_that_cannot_be_written_is_one_line(captcha_parquet, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    for flag in ("--out", "--cache-dir", "--save-model"):
        argv = ["train", "--train-data", str(captcha_parquet), "--out", str(tmp_path / "o"), flag,
                str(tmp_path / "a-file" / "x")]
        assert main(argv) == 2
        blocker = tmp_path / "a-file"
        assert capsys.readouterr().err.strip().splitlines() == [
            f"mdsweep train: error: {flag} {blocker / 'x'}: {blocker} is a file, not a directory"]


def test_train_with_a_bad_model_config_is_one_line_naming_the_file(captcha_parquet, tmp_path, capsys):
    from trainer.model.loading import load_model, save_model

    save_model(load_model("tiny"), tmp_path / "model")
    config = tmp_path / "model" / "mdsweep_config.json"
    for text in ("{not json", '{"text": {"n_heads": 0}}'):
        config.write_text(text)
        code = main(["train", "--model", str(tmp_path / "model"), "--train-data", str(captcha_parquet),
                     "--max-steps", "1", "--out", str(tmp_path / "o")])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("train:")]
        assert code == 2 and len(err) == 1 and err[0].startswith(f"mdsweep train: error: {config}: "), err


def test_max_new_tokens_0_is_one_line_naming_the_flag_in_train_and_predict(captcha_parquet, tmp_path, capsys):
    for command in (["train", "--train-data", str(captcha_parquet), "--out", str(tmp_path / "o")],
                    ["predict", "--model", "tiny", "--data", str(captcha_parquet)]):
        assert main([*command, "--max-new-tokens", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "max-new-tokens" in err[0].replace("_", "-") and "got 0" in err[0], err
