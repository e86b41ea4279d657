"""The default captcha space: learning rate, gradient accumulation, attention layout.

`space` searches all three. `paired` leaves attention out, for sweeps that run
every proposal under both layouts (`mdsweep run --space captcha:paired --cross
attention`), which makes the causal/prefix comparison paired and fair.
"""
from __future__ import annotations

import typing
from typing import Any

from trainer.model.choices import AttentionMode

LR_RANGE = (1e-6, 1e-3)
GRAD_ACCUM = (1, 2, 4, 8, 16)
ATTENTION: tuple[str, ...] = typing.get_args(AttentionMode)


def suggest_lr_and_accum(trial: Any, lr_range: tuple[float, float] = LR_RANGE,
                         grad_accum: tuple[int, ...] = GRAD_ACCUM) -> dict[str, Any]:
    """Learning rate (log scale) and gradient accumulation: the two every captcha space searches."""
    return {
        "lr": trial.suggest_float("lr", *lr_range, log=True),
        "grad_accum": trial.suggest_categorical("grad_accum", list(grad_accum)),
    }


def suggest_attention(trial: Any) -> str:
    return trial.suggest_categorical("attention", list(ATTENTION))


def paired(trial: Any) -> dict[str, Any]:
    return suggest_lr_and_accum(trial)


def space(trial: Any) -> dict[str, Any]:
    return {**paired(trial), "attention": suggest_attention(trial)}
