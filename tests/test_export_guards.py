"""Where `mdsweep export --out` may write, decided before anything is read or written (no sweep needed).

Asserted by what the guard decides, not by its wording: a refusal for one reason must not pass for another.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli.export import out_problem
from trainer.export import MODEL_CARD


def _previous_export(folder: Path) -> Path:
    """A folder that looks like an earlier export (its model card), which --force may replace."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_CARD).write_text("{}")
    return folder


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory of its own, so that guarding it refuses none of the folders below."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_the_results_are_never_an_export_even_when_they_look_like_a_previous_one(tmp_path, elsewhere):
    """RESULTS, a folder holding it and a folder inside it, each with a model card: the --force check alone would
    let them be replaced, so only the results guard refuses them."""
    outer = _previous_export(tmp_path / "outer")
    results = _previous_export(outer / "results")
    inside = _previous_export(results / "trials")
    storage = tmp_path / "sweeps" / "demo"
    for out in (results, outer, inside):
        assert out_problem(out, True, results, str(storage)) is not None, out
    # the same kind of folder outside the results and the storage is a previous export: replaced with --force
    assert out_problem(_previous_export(tmp_path / "models" / "best"), True, results, str(storage)) is None


def test_force_replaces_only_a_previous_export(tmp_path, elsewhere):
    results, storage = tmp_path / "results", str(tmp_path / "sweeps" / "demo")
    someone = tmp_path / "someone"
    someone.mkdir()
    (someone / "data.bin").write_text("theirs")
    assert out_problem(someone, True, results, storage) is not None  # files, but no model card
    assert out_problem(someone, False, results, storage) is not None
    previous = _previous_export(tmp_path / "previous")
    assert out_problem(previous, False, results, storage) is not None  # a previous export needs --force
    assert out_problem(previous, True, results, storage) is None
    (tmp_path / "empty").mkdir()
    assert out_problem(tmp_path / "empty", False, results, storage) is None
    assert out_problem(tmp_path / "new", False, results, storage) is None
