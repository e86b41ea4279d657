"""One fine-tuning job end to end on the tiny config (CPU)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.checkpoint import TrainState, load_checkpoint
from trainer.data.dataset import DataError
from trainer.job import run_job
from trainer.job_config import REPORT_METRICS, JobConfig


def _config(data: Path, **overrides) -> JobConfig:
    values = dict(model="tiny", train_data=str(data), val_fraction=0.25, batch_size=8, lr=2e-3, max_steps=8,
                  eval_every=4, train_scope="all", attention="prefix", max_new_tokens=6)
    values.update(overrides)
    return JobConfig(**values)


def test_job_runs_end_to_end_and_the_loss_falls(captcha_parquet):
    steps, reports = [], []
    result = run_job(_config(captcha_parquet, max_steps=12), on_step=steps.append,
                     on_report=lambda metrics, ckpt: reports.append(metrics))
    assert result.outcome == "ok" and result.step == 12
    assert [r["step"] for r in reports] == [4, 8, 12]
    assert sum(s["train_loss"] for s in steps[-3:]) < sum(s["train_loss"] for s in steps[:3])
    assert len(result.predictions) == reports[-1]["val_n"] == 24
    # the contract: exactly the declared metrics, which the Parquet schema and the sweep's --metric read
    assert all(set(r) == set(REPORT_METRICS) for r in reports), set(reports[-1]) ^ set(REPORT_METRICS)
    assert all(isinstance(r[k], REPORT_METRICS[k].type) or (k == "mfu" and r[k] is None)  # no peak on CPU
               for r in reports for k in r), reports[-1]
    assert reports[-1]["val_exact_match_low"] <= reports[-1]["val_exact_match"] <= reports[-1]["val_exact_match_high"]


def test_resume_from_checkpoint_matches_uninterrupted_run(captcha_parquet, tmp_path):
    config = _config(captcha_parquet, max_steps=8)
    saved_at_4 = tmp_path / "at4"

    def keep_first(metrics, checkpoint):
        if metrics["step"] == 4:
            shutil.copytree(checkpoint, saved_at_4)

    full = run_job(config, on_report=keep_first, checkpoint_dir=tmp_path / "full")
    resumed = run_job(config, checkpoint_dir=tmp_path / "resumed", resume_from=saved_at_4)
    assert resumed.final_metrics["train_loss"] == full.final_metrics["train_loss"]
    assert [p.prediction for p in resumed.predictions] == [p.prediction for p in full.predictions]
    a, b = TrainState.load(tmp_path / "full").model, TrainState.load(tmp_path / "resumed").model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the file keeps the keys and plain types of the checkpoints written before TrainState, so those still load
    raw = load_checkpoint(tmp_path / "full")
    assert set(raw) == {"model", "optimizer", "scheduler", "scaler", "progress", "rng", "config", "final",
                        "predictions"}
    assert raw["progress"]["step"] == 8 and raw["predictions"] and all(type(p) is dict for p in raw["predictions"])


def test_grad_accum_matches_one_large_batch(captcha_parquet, tmp_path):
    runs = {}
    for accum, batch in ((1, 8), (4, 2)):
        steps = []
        run_job(_config(captcha_parquet, max_steps=1, grad_accum=accum, batch_size=batch, max_grad_norm=1e9),
                on_step=steps.append, checkpoint_dir=tmp_path / str(accum))
        runs[accum] = (steps[0], TrainState.load(tmp_path / str(accum)).model)
    (large, large_weights), (small, small_weights) = runs[1], runs[4]
    assert small["grad_norm"] == pytest.approx(large["grad_norm"], rel=1e-4)
    assert small["train_loss"] == pytest.approx(large["train_loss"], rel=1e-5)
    for key in large_weights:
        # Adam's first update is lr·g/(|g|+eps): float rounding in near-zero gradients shows at ~1e-5
        torch.testing.assert_close(small_weights[key], large_weights[key], atol=2e-5, rtol=1e-4)


def test_injected_oom_ends_with_outcome_oom(captcha_parquet):
    result = run_job(_config(captcha_parquet, fault="oom@3"))
    assert result.outcome == "oom"
    assert result.step == 2
    assert result.peak_memory_bytes > 0
    assert "step 3" in result.error


def test_nonfinite_loss_ends_with_outcome_diverged(captcha_parquet):
    steps = []
    result = run_job(_config(captcha_parquet, fault="nan@2", diverge_patience=3), on_step=steps.append)
    assert result.outcome == "diverged"
    assert result.step == 4  # steps 2, 3, 4 were non-finite
    assert "3 consecutive" in result.error
    # reported as they happened: a finite first step, then NaN losses until the job gave up at the third
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert math.isfinite(steps[0]["train_loss"]) and all(math.isnan(s["train_loss"]) for s in steps[1:])


def test_fp16_scales_the_loss_and_still_learns_on_cpu(captcha_parquet, tmp_path):
    steps, scalers = [], []

    def keep_scaler(metrics, ckpt):
        if ckpt is not None:
            scalers.append(TrainState.load(ckpt).scaler)
    result = run_job(_config(captcha_parquet, max_steps=12, precision="fp16"), on_step=steps.append,
                     on_report=keep_scaler, checkpoint_dir=tmp_path / "ckpt")
    assert result.outcome == "ok"
    assert sum(s["train_loss"] for s in steps[-3:]) < sum(s["train_loss"] for s in steps[:3])
    # the scaler ran (a disabled one saves no state): it starts at 2**16 and halves on every skipped step
    skipped = result.final_metrics["scaler_skipped_steps"]
    assert scalers[-1]["scale"] == 2.0 ** 16 * 0.5 ** skipped


def _with_bad_row(source: Path, target: Path) -> Path:
    table = pq.read_table(source)
    images = table.column("image").to_pylist()
    images[5] = {"bytes": b"not an image", "path": "broken.png"}
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, type=table.schema.field("image").type))
    pq.write_table(table, target)
    return target


def test_bad_row_is_named_or_skipped_and_counted(captcha_parquet, tmp_path):
    bad = _with_bad_row(captcha_parquet, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet.*row 5"):
        run_job(_config(bad))
    result = run_job(_config(bad, on_bad_sample="skip", max_steps=2, eval_every=2))
    assert result.outcome == "ok"
    assert result.final_metrics["skipped_samples"] == 1


def test_resuming_a_finished_checkpoint_returns_its_evaluation(captcha_parquet, tmp_path):
    """A retried trial whose last checkpoint is its final step must still report metrics and predictions."""
    config = _config(captcha_parquet, max_steps=4)
    full = run_job(config, checkpoint_dir=tmp_path / "ckpt")
    again = run_job(config, resume_from=tmp_path / "ckpt")
    assert again.outcome == "ok" and again.step == 4
    assert again.final_metrics == full.final_metrics
    assert again.predictions == full.predictions


def _with_labels(source: Path, target: Path, labels: dict[int, str]) -> Path:
    table = pq.read_table(source)
    solutions = table.column("solution").to_pylist()
    for row, label in labels.items():
        solutions[row] = label
    table = table.set_column(table.schema.get_field_index("solution"), "solution", pa.array(solutions))
    pq.write_table(table, target)
    return target


def test_labels_the_model_cannot_write_are_named_or_skipped(captcha_parquet, tmp_path):
    # a character outside the char tokenizer, and an answer longer than tiny's 256-token context allows
    bad = _with_labels(captcha_parquet, tmp_path / "labels.parquet", {3: "12日4", 7: "9" * 300})
    with pytest.raises(DataError, match=r"sample 7: label '9{40}'… \(300 characters\) is 302 tokens with its end "
                                        r"token, the context leaves room for 147"):
        run_job(_config(bad))
    with pytest.raises(DataError, match=r"sample 3: label '12日4' cannot be encoded: character '日'"):
        run_job(_config(_with_labels(captcha_parquet, tmp_path / "one.parquet", {3: "12日4"})))
    result = run_job(_config(bad, on_bad_sample="skip", max_steps=2, eval_every=2))
    assert result.outcome == "ok" and result.final_metrics["skipped_samples"] == 2


def test_bad_data_fails_before_the_model_is_built(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,text\nnowhere.png,123\n")
    with pytest.raises(DataError, match="nowhere.png.*--on-bad-sample skip for `mdsweep train`"):
        # the real-size model takes many seconds to build and says so on stderr: it must not be reached
        run_job(JobConfig(model="moondream2", train_data=str(bad), device="cpu"))
    assert "stands in" not in capsys.readouterr().err


def test_train_test_data_scores_the_final_model_as_predict_does(captcha_parquet, captcha_test_parquet, tmp_path):
    from trainer.data.dataset import load_samples
    from trainer.job_config import TEST_METRICS
    from trainer.model.loading import load_model
    from trainer.predict import PredictSettings, predict

    config = _config(captcha_parquet, save_model=str(tmp_path / "model"))
    result = run_job(config, test_data=str(captcha_test_parquet))
    tested = result.test_metrics
    assert set(tested) == set(TEST_METRICS) and all(isinstance(tested[k], TEST_METRICS[k].type) for k in tested)
    assert tested["test_n"] == 24 and "test_n" not in result.final_metrics  # validation stays validation
    settings = PredictSettings(attention=config.attention, batch_size=config.batch_size,
                               max_new_tokens=config.max_new_tokens)
    metrics, _ = predict(load_model(config.save_model), load_samples(captcha_test_parquet).samples, settings)
    assert (metrics["val_exact_match"], metrics["val_cer"]) == (tested["test_exact_match"], tested["test_cer"])
    assert run_job(config).test_metrics == {}
