"""`mdsweep train` writes its outcome and metrics as JSON and Parquet."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from orchestrator.cli import main


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
    assert main(args + ["--max-steps", "4"]) == 0
    steps = pq.read_table(out / "steps.parquet").column("step").to_pylist()
    assert steps == [3, 4]  # the second invocation started after the step-2 checkpoint


def test_train_names_the_missing_file(tmp_path, capsys):
    code = main(["train", "--train-data", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_failed_outcome_has_its_own_exit_code(captcha_parquet, tmp_path):
    code = main(["train", "--train-data", str(captcha_parquet), "--max-steps", "4", "--val-fraction", "0.25",
                 "--fault", "oom@2", "--out", str(tmp_path / "o")])
    assert code == 3
    assert json.loads((tmp_path / "o" / "result.json").read_text())["outcome"] == "oom"
