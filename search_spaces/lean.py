"""The memory-lean options as a search: full text fine-tune with 8-bit or fp32 AdamW, or LoRA of a searched rank.

Conditional: LoRA gets its own learning-rate range (adapters start at zero and want larger
steps) and a rank, which Optuna records as separate parameters. Sized for
`--gpu-memory-per-trial auto`, where each shape gets the GPU share it needs; see what
they need with `mdsweep plan --space lean --model moondream2`.
"""
from __future__ import annotations

from typing import Any

from search_spaces.captcha import GRAD_ACCUM, suggest_attention

LR_RANGES = {"text": (1e-6, 1e-4), "lora": (1e-5, 1e-3)}
LORA_RANKS = (8, 16, 32)
OPTIMIZERS = ("adamw8bit", "adamw")


def space(trial: Any) -> dict[str, Any]:
    scope = trial.suggest_categorical("train_scope", list(LR_RANGES))
    chosen: dict[str, Any] = {
        "train_scope": scope,
        "lr": trial.suggest_float(f"lr_{scope}", *LR_RANGES[scope], log=True),
        "grad_accum": trial.suggest_categorical("grad_accum", list(GRAD_ACCUM)),
        "optimizer": trial.suggest_categorical("optimizer", list(OPTIMIZERS)),
        "attention": suggest_attention(trial),
    }
    if scope == "lora":
        chosen["lora_rank"] = trial.suggest_categorical("lora_rank", list(LORA_RANKS))
        chosen["lora_alpha"] = 2.0 * chosen["lora_rank"]
    return chosen
