"""The default captcha space: learning rate, gradient accumulation, attention layout.

`space` searches all three. `paired` leaves attention out, for sweeps that run
every proposal under both layouts (`mdsweep run --space captcha:paired --cross
attention`), which makes the causal/prefix comparison paired and fair.
"""
from __future__ import annotations

from typing import Any

LR_RANGE = (1e-6, 1e-3)
GRAD_ACCUM = (1, 2, 4, 8, 16)
ATTENTION = ("causal", "prefix")


def paired(trial: Any) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", *LR_RANGE, log=True),
        "grad_accum": trial.suggest_categorical("grad_accum", list(GRAD_ACCUM)),
    }


def space(trial: Any) -> dict[str, Any]:
    return {**paired(trial), "attention": trial.suggest_categorical("attention", list(ATTENTION))}
