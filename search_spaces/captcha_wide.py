"""A wider captcha space: the default one plus what is trained, batch size and warmup.

Conditional: training the vision tower as well (`all`) is given a lower learning
rate ceiling, a define-by-run branch Optuna records as separate parameters.
"""
from __future__ import annotations

from typing import Any

from search_spaces.captcha import ATTENTION, GRAD_ACCUM


def space(trial: Any) -> dict[str, Any]:
    scope = trial.suggest_categorical("train_scope", ["text", "text+projection", "all"])
    lr_high = 1e-4 if scope == "all" else 1e-3
    return {
        "train_scope": scope,
        "lr": trial.suggest_float(f"lr_{scope}", 1e-6, lr_high, log=True),
        "grad_accum": trial.suggest_categorical("grad_accum", list(GRAD_ACCUM)),
        "batch_size": trial.suggest_categorical("batch_size", [4, 8, 16]),
        "warmup_ratio": trial.suggest_float("warmup_ratio", 0.0, 0.2),
        "attention": trial.suggest_categorical("attention", list(ATTENTION)),
    }
