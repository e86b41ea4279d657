"""The experiment-state backup: a state file left empty or truncated by a killed driver is put back from the last
complete copy, so the sweep can still be resumed."""
from __future__ import annotations

import json
import pickle

from orchestrator.cluster.tune_state import BACKUP_DIR, back_up, complete, restore_incomplete


def test_complete_tells_whole_files_from_cut_ones():
    state = json.dumps({"trials": [1, 2, 3]}).encode()
    assert complete("experiment_state-x.json", state) and not complete("experiment_state-x.json", state[:-3])
    blob = pickle.dumps({"searcher": list(range(100))})
    assert complete("searcher-state-x.pkl", blob) and not complete("searcher-state-x.pkl", blob[:-1])
    assert not complete("experiment_state-x.json", b"")


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
