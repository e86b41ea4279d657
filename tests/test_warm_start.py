"""`--warm-start RESULTS:SWEEP`: an earlier sweep's finished trials told to the new search before its first
proposal, through Optuna's own API, from real Parquet results; what does not fit is skipped and counted. The
end-to-end run (the CLI, the sweep record, the report, nothing exported from a carried trial) is in
tests/test_report.py's fixture."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.results.schema import rows_to_table, schema_for
from orchestrator.results.spaces import validate_space
from orchestrator.results.store import write_sweep_row, write_trials_file
from orchestrator.results.study import StudyError, carried_trials
from orchestrator.sweep.search import make_searcher

SPACE = """
def space(trial):
    return {"lr": trial.suggest_float("lr", 1e-5, 1e-2, log=True)}
"""
FIXED = {"model": "tiny", "train_data": "/data/captchas.parquet", "max_steps": 8}
OBJECTIVE = [("val_exact_match", "max")]
BEST_LR = 3e-5


def score(lr: float) -> float:
    """A stand-in objective that peaks at BEST_LR."""
    return math.exp(-math.log10(lr / BEST_LR) ** 2)


def source_sweep(root: Path, name: str = "src", lrs: tuple[float, ...] = (), fixed: dict = FIXED,
                 mode: str = "max") -> str:
    """An earlier sweep's results on disk: its record and one ok trial per learning rate, one failed."""
    write_sweep_row(root, name, {"status": "finished", "space": "x", "metric": "val_exact_match", "mode": mode,
                                 "fixed_json": json.dumps(fixed)})
    rows = [{"trial_id": f"t{i:02d}", "group_id": i, "member": 0, "outcome": "ok", "searched": ["lr"],
             "params_json": json.dumps({"lr": lr}), "objective": score(lr), "final_val_exact_match": score(lr)}
            for i, lr in enumerate(lrs)]
    rows.append({"trial_id": "oom", "group_id": len(lrs), "member": 0, "outcome": "oom", "searched": ["lr"],
                 "params_json": json.dumps({"lr": 1e-3})})
    write_trials_file(root, name, rows_to_table(rows, schema_for("trials")), [])
    return f"{root}:{name}"


@pytest.fixture
def space(tmp_path) -> tuple[str, dict]:
    path = tmp_path / "space.py"
    path.write_text(SPACE)
    spec = f"{path}:space"
    return spec, validate_space(spec, FIXED).distributions


def first_proposal(spec: str, carried: list) -> tuple[float, int]:
    searcher = make_searcher(spec, "val_exact_match", "max", seed=0, expansions=[{}], max_concurrent=None,
                             warm_start=carried)
    config = searcher.suggest("trial-1")
    return config["lr"], len(searcher.study.trials)


def test_the_first_proposal_after_a_warm_start_comes_from_tpe(tmp_path, space):
    spec, distributions = space
    lrs = tuple(10 ** (-5 + 3 * i / 15) for i in range(16))  # 1e-5 .. 1e-2, evenly in log
    carried = carried_trials(source_sweep(tmp_path, lrs=lrs), distributions, OBJECTIVE, FIXED)
    assert len(carried.trials) == 16 and all(t.user_attrs["warm_start"] == carried.source for t in carried.trials)
    assert carried.notes == [f"1 proposal(s) of {carried.source} skipped: they did not finish with a value "
                             "(failed, out of memory or pruned)"]
    warm, told = first_proposal(spec, carried.trials)
    cold, _ = first_proposal(spec, [])
    # 16 finished trials are past TPE's 10 random start-up ones: the first proposal is TPE's, near the optimum;
    # the cold search's first one is a random draw of the same seed
    assert told == 17
    assert abs(math.log10(warm / BEST_LR)) < 0.5 < abs(math.log10(cold / BEST_LR))


def test_values_outside_the_new_space_are_skipped_and_counted(tmp_path, space):
    _, distributions = space
    carried = carried_trials(source_sweep(tmp_path, lrs=(1e-4, 3e-4, 0.05)), distributions, OBJECTIVE, FIXED)
    assert sorted(t.params["lr"] for t in carried.trials) == [1e-4, 3e-4]
    assert carried.notes[0].startswith(f"1 proposal(s) of {carried.source} skipped: a value outside this space's "
                                       "bounds or choices (first: ")


def test_a_source_run_under_other_meaning_settings_is_skipped_whole(tmp_path, space):
    _, distributions = space
    source = source_sweep(tmp_path, lrs=(1e-4, 3e-4), fixed={**FIXED, "max_steps": 100})
    carried = carried_trials(source, distributions, OBJECTIVE, FIXED)
    assert carried.trials == []
    assert carried.notes == [f"all 3 trial(s) of {source} skipped: they ran with another max_steps (100, here 8)"]


@pytest.mark.parametrize("source, says", [
    ("results", "--warm-start results: expected RESULTS:SWEEP, e.g. results:demo"),
    ("{tmp}/nowhere:src", "--warm-start {tmp}/nowhere:src: "),
    ("{tmp}:other", "--warm-start {tmp}:other: "),
])
def test_a_source_that_does_not_exist_is_refused_naming_the_flag(tmp_path, space, source, says):
    source_sweep(tmp_path, lrs=(1e-4,))
    with pytest.raises(StudyError) as e:
        carried_trials(source.format(tmp=tmp_path), space[1], OBJECTIVE, FIXED)
    assert str(e.value).startswith(says.format(tmp=tmp_path)) and "\n" not in str(e.value)


def test_a_source_ranked_the_other_way_or_on_another_metric_is_refused(tmp_path, space):
    source = source_sweep(tmp_path, lrs=(1e-4,), mode="min")
    with pytest.raises(StudyError, match=r"ranked by val_exact_match \(min\), this sweep the other way"):
        carried_trials(source, space[1], OBJECTIVE, FIXED)
    with pytest.raises(StudyError, match="it optimised val_exact_match, this sweep val_cer"):
        carried_trials(source, space[1], [("val_cer", "min")], FIXED)


def test_a_resumed_search_keeps_the_carried_trials_and_never_adds_them_twice(tmp_path, space):
    """What `resume` does with the searcher (Tune saves its state and its study, then restores them into a new
    one): the carried trials are in the restored study once."""
    spec, distributions = space
    carried = carried_trials(source_sweep(tmp_path, lrs=(1e-4, 3e-4, 1e-3)), distributions, OBJECTIVE, FIXED)
    searcher = make_searcher(spec, "val_exact_match", "max", seed=0, expansions=[{}], max_concurrent=None,
                             warm_start=carried.trials)
    searcher.suggest("trial-1")
    state, saved = searcher.get_state(), tmp_path / "searcher.pkl"
    searcher.save(str(saved))
    again = make_searcher(spec, "val_exact_match", "max", seed=0, expansions=[{}], max_concurrent=None,
                          warm_start=carried.trials)  # what a resume builds before restoring
    again.restore(str(saved))
    again.set_state(state)
    again.suggest("trial-2")
    assert [t.user_attrs.get("warm_start") for t in again.study.trials] == [carried.source] * 3 + [None] * 2
