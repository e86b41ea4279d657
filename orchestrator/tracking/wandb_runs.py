"""`--log-to wandb[=DIR]`: one Weights & Biases run per trial, through W&B's own client.

Ray's `WandbLoggerCallback` is not used: it merged trials into one run (ray #28919) and starts a new run when a
trial resumes. Here a trial's run id is fixed by its sweep and trial id, so a retried or resumed trial writes into
the run it started (`resume="allow"`), each trial's files stay in its own folder DIR/SWEEP/TRIAL, and the
samples_seen already logged are kept beside them so that the evaluations a resumed trial repeats are not logged
twice. The project is W&B's own `WANDB_PROJECT` (default `mdsweep`); `WANDB_MODE=offline` writes without a
network, and `wandb sync DIR/SWEEP/*/wandb/offline-run-*` uploads later (a resumed trial's pieces, which share
its run id, become one run).
"""
from __future__ import annotations

import json
import netrc
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from orchestrator.tracking.trial_mirror import TrialMirror
from trainer.files import atomic_path

DEFAULT_WANDB_FOLDER = "./wandb"
DEFAULT_PROJECT = "mdsweep"
LOGGED_FILE = "mdsweep_logged.json"


def login_problem() -> Optional[str]:
    """Why W&B would refuse to start a run here, found before Ray starts, or None: online (W&B's default) it needs
    an API key, from WANDB_API_KEY or the ~/.netrc entry `wandb login` writes for its host."""
    if os.environ.get("WANDB_MODE", "online") in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one that cannot be read
        pass
    return (f"no W&B API key for {host}: run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to "
            "write the runs to disk and `wandb sync` them later")


def run_id(sweep: str, trial_id: str) -> str:
    """A W&B run id (letters, digits, - and _) that one sweep's trial always gets, and no other trial does."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", sweep)[:40]
    if slug != sweep:  # two names that slug alike stay apart
        slug = f"{slug}-{zlib.crc32(sweep.encode()):08x}"
    return f"{slug}-{trial_id}"


class WandbRuns(TrialMirror):
    """One W&B run per trial of one sweep, grouped by the sweep."""

    kind = "wandb"

    def __init__(self, flag: str, sweep: str, folder: str):
        super().__init__(flag, sweep)
        self.folder = Path(folder)

    def trial_folder(self, trial_id: str) -> Path:
        return self.folder / self.sweep / trial_id

    def _init(self, trial_id: str, run_name: str, settings: dict[str, Any]) -> Any:
        import wandb

        folder = self.trial_folder(trial_id)
        folder.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, group=self.sweep, name=run_name,
            id=run_id(self.sweep, trial_id), resume="allow", reinit="create_new", dir=str(folder),
            config={**settings, "trial_id": trial_id}, tags=[f"attention:{settings.get('attention', '')}"],
            # the driver's machine is not the trial's: no system metrics; and no console lines between the
            # progress table's
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False))

    def open_run(self, trial_id: str, run_name: str, settings: dict[str, Any]) -> tuple[Any, set[int]]:
        run = self._init(trial_id, run_name, settings)
        run.define_metric("samples_seen")
        run.define_metric("*", step_metric="samples_seen")  # trials of other batch sizes share an x axis
        logged = self.trial_folder(trial_id) / LOGGED_FILE
        return run, set(json.loads(logged.read_text())) if logged.exists() else set()

    def write(self, run: Any, samples_seen: int, metrics: dict[str, float]) -> None:
        run.log({"samples_seen": samples_seen, **metrics})
        trial_id = run.config["trial_id"]
        with atomic_path(self.trial_folder(trial_id) / LOGGED_FILE) as tmp:
            tmp.write_text(json.dumps(sorted(self._logged[trial_id] | {samples_seen})))

    def finish(self, run: Any, outcome: str) -> None:
        run.tags = (*run.tags, f"outcome:{outcome}")
        run.summary["outcome"] = outcome
        run.finish(exit_code=1 if outcome == "error" else 0)
        self._runs.pop(run.config["trial_id"], None)  # a finished run is opened again if it is needed again

    def tag_best(self, run: Any, report: Optional[Path]) -> None:
        run.tags = (*run.tags, "outcome:ok", "best")  # the run opened again: its tags start from init's
        run.summary["mdsweep.best"] = True
        if report is not None:  # among the run's files: a copy in its folder (W&B would link to it, and say so)
            copy = Path(shutil.copy(report, Path(run.dir) / report.name))
            run.save(str(copy), base_path=run.dir, policy="now")
        run.finish()
        self._runs.pop(run.config["trial_id"], None)

    def close(self) -> None:
        import wandb

        wandb.teardown()  # ends W&B's service process with the sweep
