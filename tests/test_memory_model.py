"""The memory model against exact parameter and optimizer-state bytes of real modules, against allocations
measured on CPU during real training steps, and the figures the README quotes for the real model."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trainer.data.batching import Batch
from trainer.model.config import PRESETS
from trainer.devices import autocast_dtype_of, resolve_precision
from trainer.job import accumulate_gradients, optimizer_step, prepare_model
from trainer.job_config import JobConfig
from trainer.memory.sizes import track_allocations
from trainer.memory.estimate import GIB, Workload, estimate_memory, optimizer_state_bytes, parameter_tensors
from trainer.model.network import MoondreamModel
from trainer.memory.optimizers import build_optimizer

CPU = torch.device("cpu")
TEXT_TOKENS = 12


def _prepared(config: JobConfig):
    """The job's model with weights in their storage types, as run_job prepares it, and its trained params."""
    plan = resolve_precision(config, CPU)
    model = prepare_model(config, plan).model
    return model.train(), plan, [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("model", ["tiny", "small"])
@pytest.mark.parametrize("scope", ["text", "text+projection", "all", "lora"])
def test_parameter_tensors_match_the_real_modules_exactly(model, scope):
    config = JobConfig(model=model, train_scope=scope, lora_rank=4, lora_targets="q_proj,dense,fc2")
    real, _, _ = _prepared(config)
    predicted = parameter_tensors(PRESETS[model], scope, lora_rank=4, lora_targets="q_proj,dense,fc2")
    assert sorted((t.numel, t.trains) for t in predicted) == \
        sorted((p.numel(), p.requires_grad) for p in real.parameters())


def test_parameter_count_of_the_real_model():
    with torch.device("meta"):
        real = MoondreamModel(PRESETS["moondream2"], bos_id=0)
    predicted = parameter_tensors(PRESETS["moondream2"], "text")
    assert sum(t.numel for t in predicted) == sum(p.numel() for p in real.parameters())
    assert sum(t.numel for t in predicted if t.trains) == sum(p.numel() for p in real.text.parameters())
    assert round(sum(t.numel for t in predicted) / 1e9, 2) == 1.87


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-fused", "adamw8bit"])
@pytest.mark.parametrize("trained_dtype", ["fp32", "bf16"])
def test_optimizer_state_bytes_match_the_real_optimizers_exactly(optimizer, trained_dtype):
    config = JobConfig(model="small", train_scope="text", optimizer=optimizer, trained_dtype=trained_dtype)
    model, _, params = _prepared(config)
    real = build_optimizer(optimizer, params, lr=1e-3, weight_decay=0.0)
    for p in params:
        p.grad = torch.ones_like(p)
    real.step()
    measured = sum(v.numel() * v.element_size() for state in real.state.values() for v in state.values()
                   if torch.is_tensor(v))
    tensors = parameter_tensors(PRESETS["small"], "text")
    assert optimizer_state_bytes(optimizer, tensors, trained_bytes=params[0].element_size()) == measured


def _measured_training_peak(config: JobConfig) -> int:
    """Peak bytes allocated by two real optimizer steps (model, batches and weights already in memory)."""
    model, plan, params = _prepared(config)
    optimizer = build_optimizer(config.optimizer, params, lr=1e-3, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    size, crop = config.batch_size, PRESETS[config.model].vision.crop_size
    generator = torch.Generator().manual_seed(0)

    def batch() -> Batch:
        ids = torch.randint(0, 100, (size, TEXT_TOKENS), generator=generator)
        return Batch(crops=torch.randn(size * 2, 3, crop, crop, generator=generator), tilings=[(1, 1)] * size,
                     text_ids=ids, labels=ids.clone(), samples=[None] * size, prompt_len=4)

    steps = [[batch() for _ in range(config.grad_accum)] for _ in range(2)]
    with track_allocations() as tracker:
        for group in steps:
            accumulate_gradients(model, group, config.attention, scaler, CPU, autocast_dtype_of(plan))
            optimizer_step(optimizer, scaler, params, 1.0, finite_loss=True)
    return tracker.peak


@pytest.mark.parametrize("settings", [
    dict(precision="fp32"),
    dict(precision="bf16"),
    dict(precision="fp32", gradient_checkpointing=False),
    dict(precision="bf16", gradient_checkpointing=False),
    dict(precision="bf16", train_scope="lora"),
    dict(precision="fp32", train_scope="all"),
    dict(precision="bf16", attention_backend="eager-4d"),
    dict(precision="bf16", attention_backend="eager-4d", gradient_checkpointing=False),
    dict(precision="bf16", optimizer="adamw8bit"),
    dict(trained_dtype="bf16"),
    dict(precision="fp32", grad_accum=3),
], ids=lambda settings: ",".join(f"{k}={v}" for k, v in settings.items()))
def test_predicted_peak_is_close_above_the_allocations_of_real_steps(settings):
    # fused AdamW: on CPU torch's plain AdamW loops per tensor, while the model predicts CUDA's multi-tensor one
    config = JobConfig(**{"model": "small", "batch_size": 8, "optimizer": "adamw-fused", **settings})
    estimate = estimate_memory(config, workload=Workload(text_tokens=TEXT_TOKENS, crops_per_image=2))
    vision = PRESETS["small"].vision
    inputs = config.batch_size * (2 * 3 * vision.crop_size ** 2 * 4 + 2 * TEXT_TOKENS * 8)  # made before measuring
    predicted = estimate.allocator_peak - estimate.weights - inputs
    measured = _measured_training_peak(config)
    assert 0.95 <= predicted / measured <= 1.3, (predicted, measured)


def _real_text_finetune(**settings) -> int:
    return estimate_memory(JobConfig(model="moondream2", train_scope="text", batch_size=8,
                                     **settings)).device_total


def test_the_real_text_finetune_fits_the_gpus_people_have():
    lean = _real_text_finetune(optimizer="adamw8bit")
    assert lean <= 18e9 and lean < 24e9 and int(80 * GIB // lean) >= 4
    assert _real_text_finetune(optimizer="adamw8bit", trained_dtype="fp16") <= 12e9
    assert estimate_memory(JobConfig(model="moondream2", train_scope="lora", batch_size=8)).device_total <= 8e9
    assert _real_text_finetune() > 24e9  # fp32 AdamW, the old default, does not fit a 24 GB card
    assert _real_text_finetune(optimizer="adamw8bit", attention_backend="eager-4d") > lean + GIB // 2


def test_memory_model_imports_without_torch():
    code = "import sys, trainer.memory.estimate; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
