"""`--log-to tensorboard[=DIR]`: each trial's curves as one TensorBoard run, DIR/SWEEP/TRIAL.

Tune's own TensorBoard logger is switched off here for speed (it writes every result of every trial, steps
counted in Tune's iterations). This one writes only the evaluations, by `samples_seen`, so trials with other
batch sizes or accumulation share an x axis, and `tensorboard --logdir DIR` lists each trial as SWEEP/TRIAL.
A resumed trial appends a new event file to its folder (TensorBoard reads a folder's files as one run); the
samples_seen it already logged are read back from the files, so nothing is drawn twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from orchestrator.tracking.trial_mirror import TrialMirror

DEFAULT_FOLDER = "./tensorboard"


def logged_samples(folder: Path) -> set[int]:
    """The steps of every scalar in a run folder's event files (none for a new folder)."""
    if not folder.is_dir():
        return set()
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point, not a sample
    events.Reload()
    return {point.step for tag in events.Tags()[SCALARS] for point in events.Scalars(tag)}


class TensorboardRuns(TrialMirror):
    """One TensorBoard run folder per trial, written with PyTorch's SummaryWriter."""

    kind = "tensorboard"

    def __init__(self, flag: str, sweep: str, folder: str):
        super().__init__(flag, sweep)
        self.folder = Path(folder)
        self._writers: list[Any] = []

    def transient_state(self) -> dict[str, Any]:
        return {"_writers": []}

    def open_run(self, trial_id: str, run_name: str, settings: dict[str, Any]) -> tuple[Any, set[int]]:
        from torch.utils.tensorboard import SummaryWriter

        path = self.folder / self.sweep / trial_id
        new, logged = not path.is_dir(), logged_samples(path)
        writer = SummaryWriter(log_dir=str(path))
        self._writers.append(writer)
        if new:  # the settings once, as a table on the Text tab
            rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(settings.items()))
            writer.add_text("settings", f"| setting | value |\n|---|---|\n{rows}", 0)
            writer.flush()
        return writer, logged

    def write(self, run: Any, samples_seen: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            run.add_scalar(name, value, samples_seen)
        run.flush()  # a killed driver keeps every evaluation written so far

    def finish(self, run: Any, outcome: str) -> None:
        run.add_text("outcome", outcome, 0)
        run.flush()

    def tag_best(self, run: Any, report: Optional[Path]) -> None:
        where = f"; the sweep's report: {report}" if report is not None else ""
        run.add_text("best", f"the best trial of sweep {self.sweep}{where}", 0)
        run.flush()

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []
