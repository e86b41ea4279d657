"""`--log-to` trackers without a sweep around them: where a value points, and a tracker that breaks mid-sweep.

The sweep-level promises (one run per trial across a Ctrl-C and a resume, in MLflow, W&B offline and TensorBoard)
are tested on a real sweep in test_orchestrator_embedded.py; `train --log-to` in test_cli_train.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.tracking.mlflow_runs import MlflowRuns
from orchestrator.tracking.tensorboard_runs import TensorboardRuns, logged_samples
from orchestrator.tracking.trackers import TrackerError, absolute_tracker, parse_trackers


@pytest.mark.parametrize("value, expected", [
    ("mlflow", "mlflow={cwd}/mlruns"),
    ("mlflow=sqlite:///store/m.db", "mlflow=sqlite:///{cwd}/store/m.db"),
    ("mlflow=http://tracking:5000", "mlflow=http://tracking:5000"),
    ("wandb", "wandb={cwd}/wandb"),
    ("tensorboard=tb", "tensorboard={cwd}/tb"),
    ("comet=x", "comet=x"),  # not a tracker: refused later, as the user wrote it
])
def test_a_place_on_this_machine_is_made_absolute_so_resume_finds_it_from_anywhere(value, expected, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracker(value) == expected.format(cwd=tmp_path.resolve())


def test_a_tracker_that_breaks_mid_sweep_is_one_warning_and_nothing_is_raised(tmp_path, capsys):
    """The MLflow store is destroyed between two evaluations: the second is one warning line naming the flag, the
    calls after it are silent, and no call raises into Ray Tune's loop (which would end the sweep): each only
    queues its work for the tracker's writer thread."""
    store = tmp_path / "mlflow.db"
    runs = MlflowRuns(f"mlflow=sqlite:///{store}", "s", f"sqlite:///{store}", "val_exact_match")
    settings = {"lr": 1e-4, "attention": "prefix"}
    runs.start("t1", settings)
    runs.log("t1", settings, {"samples_seen": 8, "val_exact_match": 0.5})
    assert runs.flush(60) and capsys.readouterr().err == ""
    store.write_bytes(b"not a database any more" * 100)
    runs.log("t1", settings, {"samples_seen": 16, "val_exact_match": 0.6})
    runs.start("t2", settings)
    runs.end("t1", settings, "ok")
    assert runs.flush(60)  # the calls after the failure are skipped, not stuck
    runs.shutdown()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"mdsweep: warning: --log-to mlflow=sqlite:///{store}: ")
    assert line.endswith("this process logs nothing more there (the sweep goes on, and its Parquet results keep "
                         "every row)")


def test_a_resumed_tensorboard_run_logs_each_evaluation_once(tmp_path):
    """A second driver (a resumed sweep) writes into the trial's folder and skips the evaluations it repeats."""
    settings = {"lr": 1e-4}
    first = TensorboardRuns("tensorboard", "s", str(tmp_path))
    for samples in (4, 8):
        first.log("t1", settings, {"samples_seen": samples, "val_cer": samples / 10})
    first.shutdown()
    second = TensorboardRuns("tensorboard", "s", str(tmp_path))
    for samples in (4, 8, 12):
        second.log("t1", settings, {"samples_seen": samples, "val_cer": samples / 10})
    second.shutdown()
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(Path(tmp_path) / "s" / "t1"), size_guidance={SCALARS: 0})
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("val_cer")] == [(4, 0.4), (8, 0.8), (12, 1.2)]
    assert logged_samples(tmp_path / "s" / "t1") == {4, 8, 12}


@pytest.mark.parametrize("value, extra", [("mlflow=sqlite:///m.db", "mlflow"), ("wandb", "wandb"),
                                          ("tensorboard=tb", "tensorboard")])
def test_a_tracker_whose_package_is_missing_names_the_extra_to_install(value, extra, monkeypatch):
    """Python's own mark of a module that cannot be imported (None in sys.modules) stands for a missing package."""
    monkeypatch.setitem(sys.modules, extra, None)
    with pytest.raises(TrackerError) as e:
        parse_trackers([value])
    assert str(e.value) == f"--log-to {value}: {extra} is not installed; pip install 'moondream-sweep[{extra}]'"


def test_wandb_online_without_a_key_is_one_line_before_anything_starts(tmp_path, monkeypatch):
    """W&B's default mode needs a login: without one the sweep is refused up front (not a warning at its first
    trial); offline mode, a key in the environment or in the netrc file `wandb login` writes are each enough."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(TrackerError, match=r"^--log-to wandb: no W&B API key for api.wandb.ai: run `wandb login` "
                                           r"\(or set WANDB_API_KEY\), or set WANDB_MODE=offline"):
        parse_trackers(["wandb"])
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    assert parse_trackers(["wandb"])[0].kind == "wandb"
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert parse_trackers(["wandb"])[0].kind == "wandb"
