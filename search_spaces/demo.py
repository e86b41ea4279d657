"""The CPU demo's space: fine-tuning the shipped `tiny-reader` base on captchas.

The learning-rate range spans what does too little (1e-5: the base barely moves
from its zero-shot score in a demo's budget) through what works to what is too
much, so a sweep of a few trials has real differences to find. grad_accum is
searched under a sample budget (`--max-samples`), so every value sees the same
data and the comparison rewards the setting, not the compute.
"""
from __future__ import annotations

from typing import Any

from search_spaces.captcha import ATTENTION

LR_RANGE = (1e-5, 1e-2)
GRAD_ACCUM = (1, 2, 4)


def paired(trial: Any) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", *LR_RANGE, log=True),
        "grad_accum": trial.suggest_categorical("grad_accum", list(GRAD_ACCUM)),
    }


def space(trial: Any) -> dict[str, Any]:
    return {**paired(trial), "attention": trial.suggest_categorical("attention", list(ATTENTION))}
