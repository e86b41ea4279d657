"""Validation: greedy answers, exact match with its interval, character error rate."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from trainer.model.choices import AttentionMode
from trainer.data.batching import EncodedSample, collate
from trainer.evaluation.generate import greedy_decode
from trainer.job_config import Prediction
from trainer.evaluation.metrics import character_error_rate, wilson_interval
from trainer.model.network import MoondreamModel
from trainer.model.tokenizer import Tokenizer


def evaluate(model: MoondreamModel, samples: Sequence[EncodedSample], tokenizer: Tokenizer, mode: AttentionMode, *,
             batch_size: int, max_new_tokens: int, device: torch.device,
             autocast_dtype: torch.dtype | None,
             on_batch: Optional[Callable[[int], None]] = None) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics (`val_*`) and one `Prediction` per sample; exact match compares stripped strings.

    `on_batch(n)` is called after each decoded batch of n samples (progress bars).
    """
    was_training = model.training
    model.eval()
    predictions: list[Prediction] = []
    for start in range(0, len(samples), batch_size):
        # a chunk at a time: a cached dataset reads its crops from disk only when indexed
        chunk = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
        groups: dict[int, list[EncodedSample]] = {}  # a batch shares one prompt length
        for s in chunk:
            groups.setdefault(len(s.prompt_ids), []).append(s)
        for group in groups.values():
            batch = collate(group, tokenizer.eos_id).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                answers = greedy_decode(model, batch, mode, eos_id=tokenizer.eos_id, max_new_tokens=max_new_tokens)
            for s, ids in zip(group, answers):
                text = tokenizer.decode(ids).strip()
                target = s.target.strip()
                predictions.append(Prediction(s.sample_id, target, text, text == target,
                                              character_error_rate(text, target)))
            if on_batch is not None:
                on_batch(len(group))
    model.train(was_training)
    n = len(predictions)
    correct = sum(p.correct for p in predictions)
    low, high = wilson_interval(correct, n)
    metrics = {
        "val_exact_match": correct / n if n else 0.0,
        "val_exact_match_low": low,
        "val_exact_match_high": high,
        "val_cer": sum(p.cer for p in predictions) / n if n else 0.0,
        "val_n": n,
    }
    return metrics, predictions
