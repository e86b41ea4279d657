"""Held-out test evaluation: a model's exact match, interval and CER on data no choice was made on.

A sweep picks its best trial by the validation metric, so that trial's validation
number is optimistic; its `test_*` numbers, measured once at the end on a separate
set, are not. `mdsweep train --test-data` tests its final model the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from trainer.devices import autocast_dtype_of, resolve_device, resolve_precision
from trainer.evaluation.evaluate import evaluate
from trainer.export import checkpoint_model
from trainer.job_config import JobConfig
from trainer.job_data import SampleView, open_dataset, tokenised
from trainer.model.loading import LoadedModel
from trainer.model.network import MoondreamModel


def test_metrics(model: MoondreamModel, loaded: LoadedModel, config: JobConfig, path: str, *, device: torch.device,
                 autocast_dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """`model` (the trained one; `loaded` gives its tokenizer and config) on the dataset at `path`, read through
    the preprocessing cache like training data; labels it cannot write are handled per on_bad_sample."""
    store = open_dataset(path, config, loaded.model.config.vision)
    view, _unusable = tokenised(SampleView(store, list(range(len(store)))), config, loaded)
    with torch.inference_mode():
        metrics, _predictions = evaluate(model, view, loaded.tokenizer, config.attention,
                                        batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                                        device=device, autocast_dtype=autocast_dtype)
    return {"test_" + name.removeprefix("val_"): value for name, value in metrics.items()}


def test_checkpoint(checkpoint_dir: Path, config: JobConfig, path: str, final_step: int) -> dict[str, Any]:
    """A trial's final model, rebuilt from its checkpoint as `mdsweep export` does, tested on `path`."""
    device = resolve_device(config.device)
    loaded, _ = checkpoint_model(Path(checkpoint_dir), config, final_step)
    model = loaded.model.to(device)
    return test_metrics(model, loaded, config, path, device=device,
                        autocast_dtype=autocast_dtype_of(resolve_precision(config, device)))
