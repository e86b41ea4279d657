"""The FLOP count behind `flops_per_sample`, `achieved_tflops` and `mfu`, against PyTorch's own FLOP counter on
a real forward and backward of the tiny preset; the attention kernel a job records, read from the dispatcher."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.job import run_job
from trainer.job_config import JobConfig
from trainer.model.attention import attention_kernel
from trainer.model.config import PRESETS
from trainer.model.flops import decoder_layers, lm_head, train_step_flops
from trainer.model.network import MoondreamModel

TINY = PRESETS["tiny"]


def test_the_tiny_decoders_forward_by_hand():
    # 2 rows of 1 + 64 image tokens + 7 text = 72 positions; width 96, MLP 192, 2 layers, vocabulary 128
    per_layer = 2 * 72 * (4 * 96 * 96 + 2 * 96 * 192) + 4 * 72 * 72 * 96
    assert decoder_layers(TINY.text, 2, 72).total == 2 * 2 * per_layer
    assert lm_head(TINY.text, 2, 8) == 2 * 2 * 8 * 96 * 128


@pytest.mark.parametrize("scope", ["text", "text+projection", "all"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_the_count_is_what_torch_measures_of_a_real_step(scope, checkpointing):
    """Eager attention, so that the counter sees attention's two products as plain matrix products."""
    torch.manual_seed(0)
    model = MoondreamModel(TINY, bos_id=0, attention_backend="eager-4d")
    model.set_train_scope(scope)
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    crops = torch.randn(5, 3, TINY.vision.crop_size, TINY.vision.crop_size)
    text = torch.randint(0, TINY.text.vocab_size, (2, 7))
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model.answer_loss(crops, [(1, 1), (1, 2)], text, text.clone(), "prefix")
        loss.backward()
    assert train_step_flops(TINY, scope, checkpointing, crops=5, images=2, text_len=7) == counter.get_total_flops()


def test_the_kernel_is_read_from_the_dispatcher_not_assumed():
    shape = dict(heads=2, head_dim=48, prefix_len=65, text_len=16, device=torch.device("cpu"), dtype=torch.float32)
    assert attention_kernel("prefix", "sdpa", **shape) == "flash-cpu"
    with sdpa_kernel(SDPBackend.MATH):
        assert attention_kernel("prefix", "sdpa", **shape) == "math"
    assert attention_kernel("prefix", "flex", **shape) == "flex"


def test_a_cpu_job_reports_its_flops_and_no_mfu_unless_given_a_peak(captcha_parquet):
    config = dict(train_data=str(captcha_parquet), model="tiny", device="cpu", max_steps=2, eval_every=2,
                  batch_size=4, max_val_samples=4, max_new_tokens=5)
    result = run_job(JobConfig(**config))
    final = result.final_metrics
    assert result.outcome == "ok" and final["flops_per_sample"] > 0 and final["achieved_tflops"] > 0
    assert final["mfu"] is None
    assert result.hardware == {"device_name": "cpu", "attention_kernel": "flash-cpu", "workers": 1}
    given = run_job(JobConfig(**config, peak_tflops=0.5)).final_metrics
    assert given["mfu"] == pytest.approx(given["achieved_tflops"] / 0.5)
