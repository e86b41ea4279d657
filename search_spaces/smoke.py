"""A small space for smoke tests and demos on a CPU: short trials, cheap settings.

Same parameters as `captcha`, with gradient accumulation limited to 1-2 so a
trial of a few steps stays a few seconds long.
"""
from __future__ import annotations

from typing import Any

from search_spaces.captcha import LR_RANGE, suggest_attention, suggest_lr_and_accum


def paired(trial: Any) -> dict[str, Any]:
    return suggest_lr_and_accum(trial, LR_RANGE, (1, 2))


def space(trial: Any) -> dict[str, Any]:
    return {**paired(trial), "attention": suggest_attention(trial)}
