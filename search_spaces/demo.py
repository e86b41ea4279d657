"""The CPU demo's space: fine-tuning a shipped base (`tiny-reader-v2`, `tiny-reader`) on captchas.

The learning-rate range spans what does too little (around 1e-6 the base moves
little from its zero-shot score in a demo's budget; 2e-5 already learns) through
what works, so a sweep of a few trials has real differences to find. grad_accum is
searched under a sample budget (`--max-samples`), so every value sees the same
data and the comparison rewards the setting, not the compute.
"""
from __future__ import annotations

from typing import Any

from search_spaces.captcha import suggest_attention, suggest_lr_and_accum

LR_RANGE = (1e-6, 1e-2)
GRAD_ACCUM = (1, 2, 4)


def paired(trial: Any) -> dict[str, Any]:
    return suggest_lr_and_accum(trial, LR_RANGE, GRAD_ACCUM)


def space(trial: Any) -> dict[str, Any]:
    return {**paired(trial), "attention": suggest_attention(trial)}
