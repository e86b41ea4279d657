"""A small space for smoke tests and demos on a CPU: short trials, cheap settings.

Same parameters as `captcha`, with gradient accumulation limited to 1-2 so a
trial of a few steps stays a few seconds long.
"""
from __future__ import annotations

from typing import Any

from search_spaces.captcha import ATTENTION, LR_RANGE


def paired(trial: Any) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", *LR_RANGE, log=True),
        "grad_accum": trial.suggest_categorical("grad_accum", [1, 2]),
    }


def space(trial: Any) -> dict[str, Any]:
    return {**paired(trial), "attention": trial.suggest_categorical("attention", list(ATTENTION))}
