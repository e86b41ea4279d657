"""The memory-lean options (8-bit and fused AdamW, LoRA, half-precision frozen and trained weights) still learn,
keep what they promise about types, resume exactly, and export as plain official-layout weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import TrainState
from trainer.job import run_job
from trainer.job_config import JobConfig
from trainer.job_model import build_job_model
from trainer.model.loading import load_model

# the shipped pretrained base reads captchas already, so 24 steps show a clear fall of the loss
BASE = dict(model="tiny-reader", val_fraction=0.25, batch_size=8, lr=1e-3, max_steps=24, eval_every=24,
            train_scope="text", attention="prefix", max_new_tokens=6, gradient_checkpointing=False,
            warmup_ratio=0.0)


def _config(data: Path, **overrides) -> JobConfig:
    return JobConfig(**{**BASE, "train_data": str(data), **overrides})


def _loss_fall(config: JobConfig) -> float:
    steps: list[dict] = []
    result = run_job(config, on_step=steps.append)
    assert result.outcome == "ok", result.error
    losses = [s["train_loss"] for s in steps]
    return sum(losses[:3]) / 3 - sum(losses[-3:]) / 3


@pytest.fixture(scope="module")
def adamw_fall(captcha_parquet) -> float:
    fall = _loss_fall(_config(captcha_parquet))
    assert fall > 0.3  # the baseline itself learns, or the comparisons below mean nothing
    return fall


@pytest.mark.parametrize("option", [
    dict(optimizer="adamw-fused"),
    dict(optimizer="adamw8bit"),
    dict(train_scope="lora", lr=3e-3),
    dict(frozen_dtype="bf16"),
    dict(trained_dtype="bf16"),
    dict(frozen_dtype="bf16", optimizer="adamw8bit"),
], ids=lambda option: ",".join(f"{k}={v}" for k, v in option.items()))
def test_each_lean_option_learns_about_as_well_as_adamw(captcha_parquet, adamw_fall, option):
    assert _loss_fall(_config(captcha_parquet, **option)) > 0.75 * adamw_fall


def test_weights_are_stored_in_the_types_asked_for():
    config = JobConfig(model="tiny", train_scope="text", frozen_dtype="bf16", trained_dtype="fp32")
    model = build_job_model(config).model
    model.store_weights(torch.float32, torch.bfloat16)
    assert {p.dtype for p in model.text.parameters()} == {torch.float32}
    assert {p.dtype for p in model.vision.parameters()} | {p.dtype for p in model.projection.parameters()} \
        == {torch.bfloat16}


def test_lora_trains_only_adapters_and_the_rest_stays_the_base():
    config = JobConfig(model="tiny", train_scope="lora", lora_rank=4, lora_targets="q_proj,fc2")
    model = build_job_model(config).model
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert {name.split(".")[-4] for name in trained} == {"q_proj", "fc2"}
    with pytest.raises(ValueError, match="match no linear layer"):
        build_job_model(JobConfig(model="tiny", train_scope="lora", lora_targets="q_proj,query"))


def test_lean_job_resumes_exactly(captcha_parquet, tmp_path):
    config = _config(captcha_parquet, train_scope="lora", optimizer="adamw8bit", frozen_dtype="bf16", lr=3e-3,
                     max_steps=8, eval_every=4)

    def keep_first(metrics, checkpoint):
        if metrics["step"] == 4:
            shutil.copytree(checkpoint, tmp_path / "at4")

    full = run_job(config, on_report=keep_first, checkpoint_dir=tmp_path / "full")
    resumed = run_job(config, checkpoint_dir=tmp_path / "resumed", resume_from=tmp_path / "at4")
    assert resumed.final_metrics["train_loss"] == full.final_metrics["train_loss"]
    a, b = TrainState.load(tmp_path / "full").model, TrainState.load(tmp_path / "resumed").model
    assert a.keys() == b.keys() and all(".lora_" in key for key in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_job_saves_merged_plain_weights_that_predict_as_it_did(captcha_parquet, tmp_path):
    config = _config(captcha_parquet, train_scope="lora", lr=3e-3, max_steps=12, eval_every=12,
                     save_model=str(tmp_path / "merged"))
    result = run_job(config)
    saved = load_model(str(tmp_path / "merged"))
    names = [name for name, _ in saved.model.named_parameters()]
    assert not any("lora" in name for name in names)
    from trainer.data.dataset import load_samples
    from trainer.predict import PredictSettings, predict

    samples = {p.sample_id for p in result.predictions}
    val = [s for s in load_samples(str(captcha_parquet)).samples if s.sample_id in samples]
    _metrics, predictions = predict(saved, val, PredictSettings(attention="prefix", max_new_tokens=6))
    expected = {p.sample_id: p.prediction for p in result.predictions}
    assert {p.sample_id: p.prediction for p in predictions} == expected
    base = load_model("tiny-reader").model.state_dict()
    changed = [k for k, v in saved.model.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(k.startswith("text.model.layers.") for k in changed)


@pytest.mark.parametrize("values, message", [
    (dict(precision="fp16", trained_dtype="bf16"), "trained_dtype=bf16 computes in bf16"),
    (dict(optimizer="sgd"), "optimizer must be one of"),
    (dict(frozen_dtype="int8"), "frozen_dtype must be one of"),
    (dict(lora_rank=0), "lora_rank must be ≥ 1"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be > 0"),
    (dict(lora_targets=" , "), "lora_targets must name at least one layer"),
])
def test_bad_lean_settings_are_refused_with_the_field_named(values, message):
    with pytest.raises(ValueError, match=message):
        JobConfig(**values)
