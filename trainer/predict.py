"""Run a model on new images: the same cropping, prompt and KV-cached greedy decoding as validation.

Prediction goes through `evaluate`, so an exported trial's answers on its own
validation set are the answers the trial recorded, and labelled data gets the
same exact match, interval and CER the sweep reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from trainer.model.choices import AttentionMode
from trainer.data.batching import encode_samples
from trainer.data.dataset import Sample
from trainer.evaluation.evaluate import evaluate
from trainer.devices import autocast_dtype_of, resolve_device
from trainer.job_config import Prediction
from trainer.model.loading import LoadedModel
from trainer.memory.precision import plan_precision


@dataclass
class PredictSettings:
    attention: AttentionMode = "prefix"
    batch_size: int = 8
    question: str = "What does the text say?"
    prompt_template: Optional[str] = None  # None: the template that goes with the model's tokenizer
    max_new_tokens: int = 16
    device: Optional[str] = None
    precision: Optional[str] = None


def predict(loaded: LoadedModel, samples: Sequence[Sample], settings: PredictSettings,
            on_batch: Optional[Callable[[int], None]] = None) -> tuple[dict[str, float], list[Prediction]]:
    """(metrics against the samples' labels, one prediction per sample in input order)."""
    if settings.batch_size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {settings.batch_size}")
    device = resolve_device(settings.device)
    autocast_dtype = autocast_dtype_of(plan_precision(settings.precision, "fp32", None, device.type == "cuda"))
    model = loaded.model.to(device)
    encoded = encode_samples(samples, model.config.vision, loaded.tokenizer, loaded.template(settings.prompt_template),
                             settings.question)
    with torch.inference_mode():
        metrics, predictions = evaluate(model, encoded, loaded.tokenizer, settings.attention,
                                        batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                                        device=device, autocast_dtype=autocast_dtype, on_batch=on_batch)
    order = {s.sample_id: i for i, s in enumerate(samples)}
    return metrics, sorted(predictions, key=lambda p: order[p.sample_id])
