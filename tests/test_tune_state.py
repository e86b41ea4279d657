"""The experiment-state backup: a state file left empty or truncated by a killed driver is put back from the last
complete copy, so the sweep can still be resumed."""
from __future__ import annotations

import json
import pickle

import pytest

from orchestrator.cluster.tune_state import BACKUP_DIR, StateLost, back_up, complete, restore_incomplete


def test_complete_tells_whole_files_from_cut_ones():
    state = json.dumps({"trials": [1, 2, 3]}).encode()
    assert complete(state) and not complete(state[:-3])
    blob = pickle.dumps({"searcher": list(range(100))})
    assert complete(blob) and not complete(blob[:-1]) and not complete(blob[:len(blob) // 2])
    assert not complete(b"")


def test_a_state_file_cut_by_a_kill_is_put_back_from_its_last_complete_copy(tmp_path):
    state = tmp_path / "experiment_state-2026-11-26_01-52-11.json"
    searcher = tmp_path / "searcher-state-2026-11-26_01-52-11.pkl"
    state.write_text(json.dumps({"checkpoints": ["trial_a"]}))
    searcher.write_bytes(pickle.dumps({"told": {"g00000": "COMPLETE"}}))
    seen: dict = {}
    assert back_up(str(tmp_path), seen) == 2
    assert back_up(str(tmp_path), seen) == 0  # unchanged files are not copied again
    good_state, good_searcher = state.read_bytes(), searcher.read_bytes()

    state.write_bytes(b"")  # the driver was killed while Tune rewrote them
    searcher.write_bytes(good_searcher[:10])
    assert back_up(str(tmp_path), seen) == 0  # an incomplete file never replaces a good copy
    assert sorted(restore_incomplete(str(tmp_path))) == [state.name, searcher.name]
    assert state.read_bytes() == good_state and searcher.read_bytes() == good_searcher
    assert restore_incomplete(str(tmp_path)) == []
    assert sorted(p.name for p in (tmp_path / BACKUP_DIR).iterdir()) == [state.name, searcher.name]


def _tune_saves_its_searcher(folder, session: str) -> None:
    """Save a searcher's state the way Tune does at each experiment checkpoint: `SearchGenerator.save_to_dir`
    writes `searcher-state-*.pkl` and `search_gen_state-*.json` (a cloudpickle, despite its name)."""
    from ray.tune.search import SearchGenerator
    from ray.tune.search.optuna import OptunaSearch

    from optuna.distributions import FloatDistribution

    searcher = OptunaSearch(space={"lr": FloatDistribution(1e-5, 1e-3, log=True)}, metric="loss", mode="min")
    generator = SearchGenerator(searcher)
    searcher.suggest("t1")
    generator.save_to_dir(str(folder), session)


def test_tunes_searcher_state_files_are_backed_up_and_put_back(tmp_path):
    _tune_saves_its_searcher(tmp_path, "2026-12-03_16-09-29")
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == ["search_gen_state-2026-12-03_16-09-29.json", "searcher-state-2026-12-03_16-09-29.pkl"]
    assert back_up(str(tmp_path)) == 2  # both whole, both kept
    saved = {n: (tmp_path / n).read_bytes() for n in names}
    for n in names:
        (tmp_path / n).write_bytes(b"")  # the driver was killed while they were uploaded
    assert sorted(restore_incomplete(str(tmp_path))) == names
    assert {n: (tmp_path / n).read_bytes() for n in names} == saved


def test_resuming_refuses_when_the_newest_state_file_is_cut_and_no_copy_was_kept(tmp_path):
    _tune_saves_its_searcher(tmp_path, "2026-12-03_16-09-29")
    _tune_saves_its_searcher(tmp_path, "2026-12-03_16-10-05")  # a later session's files
    (tmp_path / "search_gen_state-2026-12-03_16-09-29.json").write_bytes(b"")  # older session: Tune never reads it
    assert restore_incomplete(str(tmp_path)) == []
    (tmp_path / "search_gen_state-2026-12-03_16-10-05.json").write_bytes(b"\x80\x05")
    with pytest.raises(StateLost, match="search_gen_state-2026-12-03_16-10-05.json"):
        restore_incomplete(str(tmp_path))
