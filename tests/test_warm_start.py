"""`--warm-start RESULTS:SWEEP` (or an Optuna storage `mdsweep study` wrote): an earlier sweep's finished trials told to the new search before its first
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
from orchestrator.results.store import write_sweep_row, write_trial_rows, write_trials_file
from orchestrator.results.study import StudyError, absolute_source, build_study, carried_trials, study_storage
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
    for row in rows[:1]:  # one evaluation: the curve `mdsweep study` gives its first trial
        write_trial_rows(root, "steps", name, row["trial_id"], [{"trial_id": row["trial_id"], "step": 2,
                                                                 "samples_seen": 4, "val_exact_match": 0.25}])
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
    assert carried.notes == [f"3 proposal(s) of {source} skipped: they ran with another max_steps (100, here 8)"]


def test_what_a_proposal_ran_with_is_compared_resolved(tmp_path, space):
    """A setting the source searched and this sweep fixes keeps the proposals that ran with this sweep's value; a
    default given explicitly is the default."""
    _, distributions = space
    write_sweep_row(tmp_path, "src", {"status": "finished", "space": "x", "metric": "val_exact_match", "mode": "max",
                                      "fixed_json": json.dumps(FIXED)})
    rows = [{"trial_id": f"t{i}", "group_id": i, "member": 0, "outcome": "ok", "searched": ["lr", "grad_accum"],
             "params_json": json.dumps({"lr": lr, "grad_accum": accum}), "objective": 0.5,
             "final_val_exact_match": 0.5} for i, (lr, accum) in enumerate([(1e-4, 1), (2e-4, 2), (3e-4, 2)])]
    write_trials_file(tmp_path, "src", rows_to_table(rows, schema_for("trials")), [])
    here = {**FIXED, "grad_accum": 2, "split_seed": 0, "epochs": 1.0}
    carried = carried_trials(f"{tmp_path}:src", distributions, OBJECTIVE, here)
    assert sorted(t.params["lr"] for t in carried.trials) == [2e-4, 3e-4]
    assert carried.notes == [f"1 proposal(s) of {tmp_path}:src skipped: they ran with another grad_accum (1, here 2)"]


@pytest.mark.parametrize("source, says", [
    ("results", "--warm-start results: expected RESULTS:SWEEP (e.g. results:demo) or an Optuna storage"),
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
    write_sweep_row(tmp_path, "two", {"status": "finished", "space": "x", "metric": "val_exact_match", "mode": "max",
                                      "fixed_json": json.dumps(FIXED),
                                      "objectives_json": '[["val_exact_match", "max"], ["elapsed_s", "min"]]'})
    write_trials_file(tmp_path, "two", rows_to_table([], schema_for("trials")), [])
    with pytest.raises(StudyError, match=r"ranked by elapsed_s \(min\), this sweep the other way"):
        carried_trials(f"{tmp_path}:two", space[1], [("val_exact_match", "max"), ("elapsed_s", "max")], FIXED)


@pytest.mark.parametrize("storage", ["sqlite:///{tmp}/study.db", "{tmp}/study.db", "{tmp}/study.jsonl"])
def test_an_optuna_storage_written_by_mdsweep_study_carries_what_its_results_carry(tmp_path, space, storage):
    """The study `mdsweep study` wrote (SQLite or a journal) is a source of its own: the same proposals carried,
    the same skipped for their meaning, as from the sweep's Parquet results."""
    _, distributions = space
    source = source_sweep(tmp_path, lrs=(1e-4, 3e-4, 0.05))
    source_sweep(tmp_path, name="long", lrs=(1e-4,), fixed={**FIXED, "max_steps": 100})
    storage = storage.format(tmp=tmp_path)
    for sweep in ("src", "long"):
        build_study(str(tmp_path), sweep, storage=study_storage(storage)[0])
    from_results = carried_trials(source, distributions, OBJECTIVE, FIXED)
    from_storage = carried_trials(f"{storage}:src", distributions, OBJECTIVE, FIXED)
    assert sorted((t.params["lr"], t.values) for t in from_storage.trials) == \
        sorted((t.params["lr"], t.values) for t in from_results.trials) and len(from_storage.trials) == 2
    assert [n.replace(f"{storage}:src", "S") for n in from_storage.notes] == \
        [n.replace(source, "S") for n in from_results.notes]
    skipped = carried_trials(f"{storage}:long", distributions, OBJECTIVE, FIXED)
    assert skipped.trials == [] and skipped.notes == [
        f"2 proposal(s) of {storage}:long skipped: they ran with another max_steps (100, here 8)"]


def test_a_storage_source_names_its_study_where_it_holds_several_and_refuses_a_foreign_one(tmp_path, space):
    import optuna

    _, distributions = space
    source_sweep(tmp_path, lrs=(1e-4,))
    source_sweep(tmp_path, name="b", lrs=(1e-4,))
    db = f"sqlite:///{tmp_path}/study.db"
    build_study(str(tmp_path), "src", storage=db)
    assert len(carried_trials(db, distributions, OBJECTIVE, FIXED).trials) == 1  # the only study: no name needed
    build_study(str(tmp_path), "b", storage=db)
    with pytest.raises(StudyError, match=rf"^--warm-start {db}: it holds 2 studies \(b, src\); name one: {db}:STUDY$"):
        carried_trials(db, distributions, OBJECTIVE, FIXED)
    with pytest.raises(StudyError, match=r"no study 'c' in .*study.db \(it holds: b, src\)$"):
        carried_trials(f"{db}:c", distributions, OBJECTIVE, FIXED)
    optuna.create_study(study_name="foreign", storage=db, direction="maximize")
    with pytest.raises(StudyError, match="the study does not record the settings its trials ran with"):
        carried_trials(f"{db}:foreign", distributions, OBJECTIVE, FIXED)
    with pytest.raises(StudyError, match=rf"^--warm-start {tmp_path}/none.db: {tmp_path}/none.db does not exist$"):
        carried_trials(f"{tmp_path}/none.db", distributions, OBJECTIVE, FIXED)
    (tmp_path / "empty.db").touch()
    with pytest.raises(StudyError, match=r"empty.db is empty, not a study `mdsweep study` wrote$"):
        carried_trials(f"{tmp_path}/empty.db", distributions, OBJECTIVE, FIXED)
    assert (tmp_path / "empty.db").stat().st_size == 0  # read, never written
    (tmp_path / "notes.jsonl").write_text("my own notes\n")
    with pytest.raises(StudyError, match="is not an Optuna journal"):
        carried_trials(f"{tmp_path}/notes.jsonl", distributions, OBJECTIVE, FIXED)
    assert (tmp_path / "notes.jsonl").read_text() == "my own notes\n"


@pytest.mark.parametrize("source, expected", [
    ("results:demo", "{cwd}/results:demo"),
    ("sqlite:///s/study.db", "sqlite:///{cwd}/s/study.db"),
    ("sqlite:///s/study.db:demo", "sqlite:///{cwd}/s/study.db:demo"),
    ("study.jsonl:demo", "{cwd}/study.jsonl:demo"),
    ("sqlite:///optuna:demo", "sqlite:///{cwd}/optuna:demo"),  # a SQLite URL is a storage whatever its name
])
def test_a_source_is_made_absolute_so_resume_reads_it_from_anywhere(tmp_path, monkeypatch, source, expected):
    monkeypatch.chdir(tmp_path)
    assert absolute_source(source) == expected.format(cwd=tmp_path.resolve())


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


def test_a_warm_started_search_does_not_redraw_its_sources_proposals(tmp_path, space):
    """Told fewer trials than TPE's random start-up, a search seeded as its source was would draw the source's own
    first points again; the warm-started sweep's seed mixes in its sources."""
    from orchestrator.sweep.driver import search_seed
    from orchestrator.sweep.settings import SweepSettings

    spec, distributions = space
    source_lrs = [first_proposal_of(spec, seed=0, n=3)]
    source = source_sweep(tmp_path, lrs=tuple(source_lrs[0]))
    settings = SweepSettings(name="new", storage=str(tmp_path / "s"), results=str(tmp_path / "r"),
                             fixed=FIXED, search_seed=0, warm_start=[source])
    carried = carried_trials(source, distributions, OBJECTIVE, FIXED)
    warm = make_searcher(spec, "val_exact_match", "max", seed=search_seed(settings), expansions=[{}],
                         max_concurrent=None, warm_start=carried.trials)
    drawn = [warm.suggest(f"t{i}")["lr"] for i in range(3)]
    assert not set(drawn) & set(source_lrs[0])
    assert search_seed(SweepSettings(name="cold", storage="s", results="r", fixed=FIXED, search_seed=7)) == 7


def first_proposal_of(spec: str, seed: int, n: int) -> list[float]:
    """The first `n` learning rates a cold search of `seed` proposes."""
    searcher = make_searcher(spec, "val_exact_match", "max", seed=seed, expansions=[{}], max_concurrent=None)
    return [searcher.suggest(f"t{i}")["lr"] for i in range(n)]
