"""Job checkpoints: everything needed to continue a job exactly where it stopped.

Frozen weights are not stored (they come back from the model source, or from the
seeded initialisation of a preset), so a checkpoint of a 1.9 B model that trains
only the text tower holds the text tower, optimizer and counters.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.files import atomic_path

STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in trainable}


def save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    """Write atomically: a reader (or a crash) never sees a half-written state file."""
    with atomic_path(directory / STATE_FILE) as tmp:
        torch.save(state, tmp)


def load_checkpoint(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no job checkpoint here")
    # our own file: it holds RNG states and counters besides tensors
    return torch.load(path, map_location="cpu", weights_only=False)
