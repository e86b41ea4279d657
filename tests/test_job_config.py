"""JobConfig checks its own values, so train, run, --dry-run and the space probe reject them alike."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.job_config import JobConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("values, message", [
    (dict(lr=float("inf")), "lr must be a positive finite number"),
    (dict(lr=0.0), "lr must be a positive finite number"),
    (dict(batch_size=0), "batch_size must be ≥ 1"),
    (dict(max_steps=0), "max_steps must be ≥ 1"),
    (dict(max_steps=-3), "max_steps must be ≥ 1"),
    (dict(max_samples=100, max_steps=5), "not both"),
    (dict(fault="explode@3"), "fault 'explode@3' must be KIND@STEP"),
    (dict(max_gpu_memory="abc"), "max_gpu_memory: cannot read 'abc' as a size"),
    (dict(device="tpu"), "device must be cpu, cuda or cuda:N"),
    (dict(attention="bidirectional"), "attention must be one of causal, prefix"),
    (dict(val_fraction=1.0), "val_fraction must be between 0 and 1"),
    (dict(warmup_ratio=-0.1), "warmup_ratio must be in"),
    (dict(prompt_template="chatml"), "prompt_template must be one of"),
    (dict(lora_targets="q_proj, qproj"), "lora_targets qproj match no linear layer of the text decoder; it has "
                                         "q_proj, k_proj, v_proj, dense, fc1, fc2"),
    (dict(adam_beta2=1.0), r"adam_beta2 must be in \[0, 1\)"),
    (dict(adam_eps=0.0), "adam_eps must be > 0"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),  # numpy's range: every trial failed
    (dict(seed=2**32), r"seed must be an integer in \[0, 2\*\*32\)"),
])
def test_values_that_cannot_work_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        JobConfig(**values)


def test_good_values_pass():
    config = JobConfig(lr=1e-3, max_gpu_memory="16GiB", device="cuda:1", fault="oom@3", max_samples=100,
                       eval_every_samples=50, lora_targets="q_proj, fc2", adam_beta2=0.95)
    assert config.problems() == [] and (config.lr, config.max_gpu_memory, config.adam_beta2) == (1e-3, "16GiB", 0.95)
    assert JobConfig.from_dict(config.to_dict()) == config
    assert JobConfig(max_gpu_memory="0.25", precision="bf16").problems() == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    # no GPU visible, also on a machine that has one: "--device cuda" must then be refused in one line
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(ROOT))


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "lr must be a positive finite number"),
    (["--max-steps", "0"], "max_steps must be ≥ 1"),
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N"),
])
def test_train_says_one_line_instead_of_a_traceback(tmp_path, captcha_parquet, capsys, flags, message):
    # in this process (the command's own entry point, as test_cli_train.py calls it): a traceback would be an
    # exception out of main(), or one printed to stderr
    from orchestrator.cli.main import main

    code = main(["train", "--train-data", str(captcha_parquet), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mdsweep train: error: "), lines


def test_train_on_cuda_without_a_gpu_says_one_line_instead_of_a_traceback(tmp_path, captcha_parquet):
    # a process of its own: CUDA_VISIBLE_DEVICES is read once per process, when CUDA first starts
    proc = _cli("train", "--train-data", str(captcha_parquet), "--out", str(tmp_path / "o"), "--device", "cuda")
    assert proc.returncode == 2 and "sees no CUDA GPU here" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch_size must be ≥ 1"),
    (["--set", "fault=explode@3"], "fault 'explode@3'"),
    (["--set", "max_gpu_memory=abc"], "max_gpu_memory: cannot read 'abc'"),
])
def test_a_dry_run_rejects_bad_fixed_settings_before_ray_starts(tmp_path, captcha_parquet, capsys, flags, message):
    from orchestrator.cli.main import main

    code = main(["run", "--dry-run", "--train-data", str(captcha_parquet), "--storage", str(tmp_path / "s"),
                 "--results", str(tmp_path / "r"), *flags])
    assert code == 2 and f"job settings: {message}" in capsys.readouterr().err
    assert not (tmp_path / "r" / "logs").exists()  # Ray never started: its log file is made when it does
