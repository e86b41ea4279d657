"""The model a job trains, built the same way for training, for its saved model and for an export.

A job trains some tensors of a base model (a scope, or LoRA adapters); everything
else is the base as loaded, or a preset's seeded random weights. Building through
one function is what lets an export rebuild exactly the model a trial trained and
lay the trial's tensors over it.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from trainer.job_config import JobConfig
from trainer.model.loading import LoadedModel, load_model
from trainer.model.lora import add_lora, merge_lora
from trainer.model.layouts import CheckpointError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_job_model(config: JobConfig) -> LoadedModel:
    """Base model (seeded), LoRA adapters when the scope asks for them, and the train scope set."""
    seed_everything(config.seed)
    loaded = load_model(config.model, revision=config.revision, tokenizer=config.tokenizer,
                        attention_backend=config.attention_backend)
    if config.train_scope == "lora":
        add_lora(loaded.model.text, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets)
    loaded.model.set_train_scope(config.train_scope)
    return loaded


def trained_model(config: JobConfig, trained: dict[str, torch.Tensor], origin: str) -> LoadedModel:
    """The job's base with its `trained` tensors laid over it in fp32, LoRA merged: ready for the official
    layout. `origin` names where the tensors came from, for errors."""
    loaded = build_job_model(config)
    current = loaded.model.state_dict()
    unknown = sorted(set(trained) - set(current))
    if unknown:
        raise CheckpointError(f"{origin}: tensor {unknown[0]!r} is not in model {config.model!r} "
                              f"({len(unknown)} such); was the base model changed since the sweep?")
    for key, tensor in trained.items():
        if tuple(tensor.shape) != tuple(current[key].shape):
            raise CheckpointError(f"{origin}: tensor {key!r} has shape {tuple(tensor.shape)}, the base "
                                  f"model {config.model!r} has {tuple(current[key].shape)}")
        current[key].copy_(tensor)
    merge_lora(loaded.model.text)
    return loaded
