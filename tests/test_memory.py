"""Sizes as people write them, and the per-job GPU cap: what fraction of which GPU's allocator it sets, when it
sets none, and what an out-of-memory outcome says about it. torch.cuda is a stand-in here (no GPU needed)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

import trainer.job
from trainer.job import run_job
from trainer.job_config import JobConfig, cap_fraction, parse_bytes
from trainer.memory.sizes import apply_gpu_cap

GiB = 2 ** 30
# two GPUs of different sizes, so a cap computed against the wrong one shows
DEVICE_MEMORY = {0: 80 * GiB, 1: 24 * GiB}


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * 2**30), ("512MB", 512 * 10**6), ("1.5e10", 15 * 10**9),
                                           (2**30, 2**30), ("4 gi", 4 * 2**30)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "16XB", "-1GB", "0"])
def test_parse_bytes_names_the_bad_text(text):
    with pytest.raises(ValueError, match="size|unit|positive"):
        parse_bytes(text)


def test_cap_fraction_from_bytes_or_fraction():
    assert cap_fraction("0.25", 80 * 2**30) == 0.25
    assert cap_fraction("20GiB", 80 * 2**30) == 0.25
    with pytest.raises(ValueError, match="not within"):
        cap_fraction("100GiB", 80 * 2**30)


@pytest.fixture
def fake_cuda(monkeypatch) -> list[tuple[float, Optional[torch.device]]]:
    """torch.cuda on a machine with the GPUs of DEVICE_MEMORY; the allocator caps set are recorded (fraction,
    device), not applied."""
    caps: list[tuple[float, Optional[torch.device]]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=DEVICE_MEMORY[torch.device(device).index]))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: caps.append((fraction, device)))
    return caps


@pytest.mark.parametrize("cap,fraction", [("20GiB", 20 / 24), ("0.25", 0.25)], ids=["bytes", "fraction"])
def test_the_cap_is_max_gpu_memory_over_the_total_of_the_jobs_own_gpu(fake_cuda, cap, fraction):
    """The allocator of the job's GPU (index 1, 24 GiB), not of GPU 0, is capped: a fraction of the wrong total
    would let the job push its neighbours out, or stop it early."""
    assert apply_gpu_cap(cap, torch.device("cuda", 1)) == pytest.approx(fraction * 24 * GiB, abs=1)
    [(applied, device)] = fake_cuda
    assert applied == pytest.approx(fraction)
    assert device is not None and torch.device(device) == torch.device("cuda", 1)


@pytest.mark.parametrize("cap,device", [(None, "cuda:1"), ("20GiB", "cpu")])
def test_no_cap_without_max_gpu_memory_or_off_the_gpu(fake_cuda, cap, device):
    assert apply_gpu_cap(cap, torch.device(device)) is None
    assert fake_cuda == []


def _oom_at_step_1(data: Path, **overrides) -> JobConfig:
    return JobConfig(model="tiny", train_data=str(data), val_fraction=0.25, batch_size=8, max_steps=2,
                     fault="oom@1", **overrides)


def test_an_oom_under_a_cap_says_the_cap(captcha_parquet, monkeypatch):
    """Whoever reads an `oom` outcome learns whether the job ran out of the GPU or of the share it was capped at."""
    caps: list[tuple[Optional[str], torch.device]] = []

    def cap_as_on_a_gpu(cap: Optional[str], device: torch.device) -> int:
        caps.append((cap, device))
        return 6 * GiB

    monkeypatch.setattr(trainer.job, "apply_gpu_cap", cap_as_on_a_gpu)
    result = run_job(_oom_at_step_1(captcha_parquet, max_gpu_memory="0.25"))
    assert caps == [("0.25", torch.device("cpu"))]  # the job's own cap, on the job's own device
    assert result.outcome == "oom" and f"(cap {6 * GiB} bytes)" in result.error, result.error


def test_an_oom_without_a_cap_names_no_cap(captcha_parquet):
    result = run_job(_oom_at_step_1(captcha_parquet))
    assert result.outcome == "oom" and "cap" not in result.error, result.error


def test_an_oom_while_moving_the_model_names_the_cap_only_when_there_is_one(captcha_parquet, monkeypatch):
    """The first allocation on the GPU is the model itself: an oom there says so, and 'cap None' never appears."""
    real_prepare = trainer.job.prepare_model

    def prepare_a_model_too_big_to_move(*args, **kwargs):
        loaded = real_prepare(*args, **kwargs)

        def out_of_memory(*_args, **_kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")
        loaded.model.to = out_of_memory  # an instance attribute, over nn.Module.to
        return loaded

    monkeypatch.setattr(trainer.job, "prepare_model", prepare_a_model_too_big_to_move)
    config = JobConfig(model="tiny", train_data=str(captcha_parquet), val_fraction=0.25, batch_size=8, max_steps=2)
    result = run_job(config)
    assert result.outcome == "oom" and result.error == "out of memory moving the model to cpu"
    monkeypatch.setattr(trainer.job, "apply_gpu_cap", lambda cap, device: 6 * GiB)
    result = run_job(config)
    assert result.error == f"out of memory moving the model to cpu (cap {6 * GiB} bytes)"
