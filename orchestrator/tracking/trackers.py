"""`--log-to KIND[=WHERE]`: which trackers a sweep (or `mdsweep train`) writes to, checked before Ray starts.

Each value names a tracker and where its runs go; the package each needs is an optional extra, so a missing one
is one line naming the extra to install, not an import error inside a running sweep.
"""
from __future__ import annotations

import importlib.util
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.tracking.mlflow_runs import DEFAULT_URI, MlflowRuns
from orchestrator.tracking.tensorboard_runs import DEFAULT_FOLDER, TensorboardRuns
from orchestrator.tracking.trial_mirror import TrialMirror
from orchestrator.tracking.wandb_runs import DEFAULT_WANDB_FOLDER, WandbRuns, login_problem

TRAIN_GROUP = "mdsweep-train"  # the experiment (MLflow), group (W&B) or folder (TensorBoard) of `train`'s runs
USAGE = "mlflow[=URI], wandb[=DIR] or tensorboard[=DIR]"
LOG_TO_HELP = ("also log each trial as one run, named SWEEP/TRIAL, in an experiment tracker: its settings, and "
               "each evaluation's metrics by samples seen; a resumed trial goes on in its run. mlflow[=URI]: a "
               "tracking server, sqlite:///PATH.db or a folder (default ./mlruns; extra [mlflow]); wandb[=DIR]: "
               "Weights & Biases, project $WANDB_PROJECT (default mdsweep), files in DIR/SWEEP/TRIAL (default "
               "./wandb; WANDB_MODE=offline works without a network; extra [wandb]); tensorboard[=DIR]: event "
               "files in DIR/SWEEP/TRIAL (default ./tensorboard; extra [tensorboard]); repeatable")


class TrackerError(ValueError):
    """A --log-to that cannot work; the message names the flag and what to do."""


@dataclass(frozen=True)
class Tracker:
    """One --log-to value: the tracker, where its runs go, and the package it needs."""
    kind: str
    where: str
    flag: str  # the value as given, for messages

    def local_folder(self) -> Optional[str]:
        """The folder on this machine the tracker writes into (a SQLite file's folder), or None for a server."""
        if self.kind != "mlflow":
            return self.where
        if self.where.startswith("sqlite:///"):
            return str(Path(self.where.removeprefix("sqlite:///")).parent)
        plain = self.where.removeprefix("file://")
        return None if "://" in plain else plain

    def runs(self, sweep: str, metric: str) -> TrialMirror:
        """The tracker's runs for one sweep (or one `train`, whose output folder names it)."""
        if self.kind == "mlflow":
            return MlflowRuns(self.flag, sweep, self.where, metric)
        if self.kind == "wandb":
            return WandbRuns(self.flag, sweep, self.where)
        return TensorboardRuns(self.flag, sweep, self.where)


# tracker -> (where its runs go when no =WHERE is given, the module it needs, the extra that installs it)
KINDS = {"mlflow": (DEFAULT_URI, "mlflow", "mlflow"),
         "wandb": (DEFAULT_WANDB_FOLDER, "wandb", "wandb"),
         "tensorboard": (DEFAULT_FOLDER, "tensorboard", "tensorboard")}


def installed(module: str) -> bool:
    """Whether `module` can be imported here, without importing it (trackers take seconds to import). A module
    marked not importable (None in sys.modules) is not installed."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules as None, or without a spec
        return False


def absolute_tracker(value: str) -> str:
    """A --log-to value whose place is on this machine (a folder, given or the default, or a SQLite file) made
    absolute: `resume` may run from another directory. Servers stay as given."""
    kind, _, where = value.partition("=")
    if kind not in KINDS:
        return value  # refused as given by parse_trackers
    where = where or KINDS[kind][0]
    if where.startswith("sqlite:///"):
        return f"{kind}=sqlite:///{Path(where.removeprefix('sqlite:///')).expanduser().resolve()}"
    return f"{kind}={Path(where).expanduser().resolve()}" if where and "://" not in where else value


def parse_trackers(log_to: list[str]) -> list[Tracker]:
    """The trackers of `--log-to` values: a tracker this version writes to, its package installed, no place
    named twice."""
    trackers = []
    for value in log_to:
        kind, _, where = value.partition("=")
        if kind not in KINDS:
            raise TrackerError(f"--log-to {value}: {kind!r} is not a tracker mdsweep writes to; use {USAGE}")
        default, module, extra = KINDS[kind]
        if not installed(module):
            raise TrackerError(f"--log-to {value}: {module} is not installed; pip install 'moondream-sweep[{extra}]'")
        if kind == "wandb" and (problem := login_problem()):
            raise TrackerError(f"--log-to {value}: {problem}")
        trackers.append(Tracker(kind, where or default, value))
    places = [(t.kind, t.where) for t in trackers]
    if len(set(places)) < len(places):
        raise TrackerError(f"--log-to: {', '.join(log_to)} name one place twice")
    return trackers


def train_run_id(out: Path) -> str:
    """The run of one `mdsweep train` output folder: its name, with a checksum of its absolute path so that two
    folders of one name elsewhere get two runs, and `--resume` in the same folder finds its own."""
    return f"{out.name}-{zlib.crc32(str(out.expanduser().resolve()).encode()):08x}"
