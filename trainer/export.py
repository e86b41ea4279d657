"""A trial's fine-tuned model out of its job checkpoint, in the official Moondream2 layout.

A job checkpoint holds only what trained (frozen weights come back from the base
model), so the export rebuilds the base exactly as the job did — same model spec,
same seed for a fresh preset — and lays the trained tensors over it. The result
loads here by path and in the official code, and carries a model card saying
which sweep, trial, settings and metrics it came from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.checkpoint import TrainState
from trainer.model.config import CONFIG_FILE, WEIGHTS_FILE
from trainer.job_config import JobConfig
from trainer.job_model import trained_model
from trainer.model.loading import LoadedModel, save_model
from trainer.model.tokenizer_source import TOKENIZER_FILE
from trainer.model.layouts import CheckpointError

MODEL_CARD = "model_card.json"
# what an export writes, and all that `replace` removes
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, MODEL_CARD)


def export_checkpoint(checkpoint_dir: Path, config: JobConfig, out: Path, card: dict[str, Any],
                      final_step: int, replace: bool = False) -> Path:
    """Write base + trained weights, config, tokenizer and `model_card.json` to `out`; returns `out`.

    `final_step` is the step the trial ran to: a checkpoint from an earlier step does not hold its
    final weights, and is refused before anything is written or, with `replace`, removed from `out`.
    `replace` removes the files of a previous export in `out` (EXPORT_FILES), never anything else.
    """
    loaded, n_trained = checkpoint_model(checkpoint_dir, config, final_step)
    out = Path(out)
    refuse_overwriting_sources(out, loaded, config.model)
    if replace:  # only the files an export writes: anything else in `out` is not ours to delete
        for name in EXPORT_FILES:
            (out / name).unlink(missing_ok=True)
    save_model(loaded, out)
    card = {**card, "base_model": config.model, "trained_tensors": n_trained,
            **loaded.tokenizer_choice.as_record(), "job_config": config.to_dict()}
    (out / MODEL_CARD).write_text(json.dumps(card, indent=1, default=str))
    return out


def refuse_overwriting_sources(out: Path, loaded: LoadedModel, model: str) -> None:
    """An export reads the trial's base model (its weights were read already, its tokenizer.json is copied after
    the old files are removed): an `out` that is or holds them would lose the tokenizer and overwrite the
    weights it came from, so it is refused before anything is removed or written."""
    target = out.expanduser().resolve()
    for source in (loaded.source_dir, loaded.tokenizer_choice.path):
        if source is not None and Path(source).resolve().is_relative_to(target):
            raise CheckpointError(f"--out {out} is or holds the trial's --model {model} ({source}), which the "
                                  "export reads; choose a directory of its own")


def checkpoint_model(checkpoint_dir: Path, config: JobConfig, final_step: int) -> tuple[LoadedModel, int]:
    """The model a trial ended with, rebuilt from its checkpoint (base + trained tensors, fp32, LoRA merged), and
    how many tensors it trained. `final_step` is the step the trial ran to: a checkpoint from an earlier step
    does not hold its final weights, and is refused."""
    state = TrainState.load(checkpoint_dir)
    step = state.progress.step
    if step != final_step:
        raise CheckpointError(f"{checkpoint_dir}: the checkpoint is at step {step}, but the trial ran to step "
                              f"{final_step}; its final weights were not kept")
    return trained_model(config, state.model, str(checkpoint_dir)), len(state.model)


def read_model_card(model_dir: Path) -> dict[str, Any]:
    """The card of an exported model, or {} for any other model directory."""
    path = Path(model_dir) / MODEL_CARD
    return json.loads(path.read_text()) if path.is_file() else {}
