"""The search spaces shipped in search_spaces/: they load, validate and stay in range."""
from __future__ import annotations

import math

import optuna
import pytest

from orchestrator.results.spaces import list_spaces, load_space_function, validate_space

FIXED = {"train_data": "/data/train.parquet"}


def test_every_shipped_space_validates():
    names = list_spaces()
    assert {"captcha", "captcha_wide", "lean", "smoke"} <= set(names)
    for name in names:
        info = validate_space(name, FIXED)
        assert info.searched, name


def _samples(spec: str, n: int = 64) -> list[dict]:
    fn = load_space_function(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    out = []
    for _ in range(n):
        t = study.ask()
        out.append(fn(t))
        study.tell(t, 0.0)
    return out


def test_captcha_space_searches_lr_on_a_log_scale_grad_accum_and_attention():
    samples = _samples("captcha")
    assert all(set(s) == {"lr", "grad_accum", "attention"} for s in samples)
    lrs = [s["lr"] for s in samples]
    assert 1e-6 <= min(lrs) and max(lrs) <= 1e-3
    # log scale: samples spread over decades, not bunched near the top
    assert sum(1 for v in lrs if v < 1e-4) > len(lrs) / 2
    assert {s["grad_accum"] for s in samples} <= {1, 2, 4, 8, 16}
    assert {s["attention"] for s in samples} == {"causal", "prefix"}


def test_paired_variant_leaves_attention_out():
    assert all(set(s) == {"lr", "grad_accum"} for s in _samples("captcha:paired", 8))


def test_wide_space_is_conditional():
    samples = _samples("captcha_wide", 128)
    for s in samples:
        assert set(s) == {"train_scope", "lr", "grad_accum", "batch_size", "warmup_ratio", "attention"}
        if s["train_scope"] == "all":
            assert s["lr"] <= 1e-4
        assert 0.0 <= s["warmup_ratio"] <= 0.2 and s["batch_size"] in (4, 8, 16)
    assert {s["train_scope"] for s in samples} == {"text", "text+projection", "all"}
    info = validate_space("captcha_wide", FIXED)
    # the branch-specific suggestion names are Optuna's, not the job's
    assert "lr" in info.searched and all(a.startswith("lr_") for a in info.auxiliary)


def test_smoke_space_keeps_trials_short():
    assert {s["grad_accum"] for s in _samples("smoke", 32)} <= {1, 2}
    assert all(math.isfinite(s["lr"]) for s in _samples("smoke", 4))


def test_lean_space_searches_lora_rank_only_under_lora():
    samples = _samples("lean", 64)
    assert {s["train_scope"] for s in samples} == {"text", "lora"}
    for s in samples:
        assert ("lora_rank" in s) == (s["train_scope"] == "lora")
        assert s["optimizer"] in ("adamw8bit", "adamw")
        assert s["lr"] <= (1e-3 if s["train_scope"] == "lora" else 1e-4)


@pytest.mark.parametrize("name", ["captcha", "captcha_wide", "smoke"])
def test_spaces_are_define_by_run_functions_of_one_argument(name):
    import inspect

    fn = load_space_function(name)
    assert len(inspect.signature(fn).parameters) == 1
