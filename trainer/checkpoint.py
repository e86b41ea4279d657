"""Job checkpoints: everything needed to continue a job exactly where it stopped.

Frozen weights are not stored (they come back from the model source, or from the
seeded initialisation of a preset), so a checkpoint of a 1.9 B model that trains
only the text tower holds the text tower, optimizer and counters.

`TrainState` is the one home of the file's keys: its field names are the keys, and
the job saves, `--resume` and the sweep's retries load, and export and repair read
through it, so a part cannot be written under one name and read under another.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.files import atomic_path
from trainer.job_config import JobConfig, Prediction

if TYPE_CHECKING:
    from trainer.parallel.replica import Replica

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


@dataclass
class Progress:
    """Counters that a checkpoint must carry for a resumed job to continue exactly."""

    step: int = 0  # optimizer steps completed
    micro_batches: int = 0  # micro-batches consumed since the start (fixes the data position)
    samples_seen: int = 0  # training samples consumed since the start
    nonfinite_streak: int = 0
    scaler_skipped_steps: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainState:
    """What a job checkpoint holds, one field per key of the file (`STATE_FILE` in the checkpoint directory).

    On disk it is a plain dict of those keys, `progress` and `predictions` as dicts, so every checkpoint written
    before this class existed loads. Every part has an empty default: export and repair read only `model`,
    `progress` and `predictions`, and a file without the rest is still theirs to read (resuming from one fails
    where the missing part is restored).
    """

    model: dict[str, torch.Tensor] = field(default_factory=dict)  # the trained tensors only
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    rng: dict[str, Any] = field(default_factory=dict)  # python, numpy, torch (and cuda): the draws to come
    config: dict[str, Any] = field(default_factory=dict)  # the job's settings, for whoever reads the file
    final: dict[str, Any] = field(default_factory=dict)  # the report of the evaluation the checkpoint follows
    predictions: list[Prediction] = field(default_factory=list)  # that evaluation's, one per validation sample

    @classmethod
    def capture(cls, model: torch.nn.Module, optimizer_state: dict[str, Any],
                scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, *,
                progress: Progress, config: JobConfig, final: dict[str, Any],
                predictions: list[Prediction]) -> TrainState:
        """A running job's state now, RNGs included, so that a job resumed from it draws what this one would.
        `model` and `optimizer_state` whole, as one worker has them (trainer.parallel gathers them
        from FSDP's shards), so the file is the same whatever the number of workers that wrote it."""
        return cls(model=trainable_state(model), optimizer=optimizer_state,
                   scheduler=scheduler.state_dict(),
                   scaler=scaler.state_dict(), progress=progress, rng=rng_state(), config=config.to_dict(),
                   final=final, predictions=predictions)

    def restore(self, replica: Replica, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> None:
        """Put this state into a job built afresh with the same settings (on any number of workers: each takes
        its shard of the whole tensors), and into the RNGs. Not strict about the model: its frozen tensors are
        not in the checkpoint, they were built from the model source."""
        replica.load_trained(self.model)
        replica.load_optimizer_state(optimizer, self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        scaler.load_state_dict(self.scaler)
        restore_rng(self.rng)

    @staticmethod
    def exists(directory: Path) -> bool:
        """Whether `directory` holds a job checkpoint (what `--resume` and repair test before loading one)."""
        return (Path(directory) / STATE_FILE).is_file()

    def save(self, directory: Path) -> None:
        """Write the checkpoint into `directory`, atomically (see `save_checkpoint`)."""
        state = {part.name: getattr(self, part.name) for part in fields(self)}
        state.update(progress=asdict(self.progress), predictions=[asdict(p) for p in self.predictions])
        save_checkpoint(Path(directory), state)

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        """The checkpoint in `directory`; FileNotFoundError when there is none."""
        state = load_checkpoint(directory)
        state.update(progress=Progress(**state.get("progress", {})),
                     predictions=[Prediction(**p) for p in state.get("predictions", [])])
        return cls(**state)
