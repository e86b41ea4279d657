"""Space loading and validation, --set parsing, groups, and the Optuna searcher (no cluster needed)."""
from __future__ import annotations

import pickle
import textwrap

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.sweep.early_stopping import make_scheduler
from orchestrator.results.job_values import parse_assignments, parse_value
from orchestrator.results.groups import build_expansions, parse_cross
from orchestrator.sweep.search import make_searcher
from orchestrator.results.spaces import (
    DROP_KEY,
    GROUP_KEY,
    MEMBER_KEY,
    SpaceError,
    SpaceFunction,
    load_space_function,
    resolve_space_spec,
    split_suggestion,
    validate_space,
)

FIXED = {"train_data": "/data/train.parquet"}


def _space_file(tmp_path, body: str, name: str = "space.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# ---------------------------------------------------------------- loading


def test_space_specs_resolve():
    assert resolve_space_spec("captcha") == ("search_spaces.captcha", "space")
    assert resolve_space_spec("captcha:paired") == ("search_spaces.captcha", "paired")
    assert resolve_space_spec("search_spaces.captcha:space") == ("search_spaces.captcha", "space")
    assert resolve_space_spec("json:dumps") == ("json", "dumps")  # any importable module


def test_space_from_a_file(tmp_path):
    path = _space_file(tmp_path, """
        def mine(trial):
            return {"lr": trial.suggest_float("lr", 1e-5, 1e-3, log=True)}
    """)
    info = validate_space(f"{path}:mine", FIXED)
    assert info.searched == ["lr"]


@pytest.mark.parametrize("spec,match", [
    ("no_such_space_module", "cannot import"),
    ("captcha:nope", "has no function 'nope'.*paired"),
    ("/nonexistent/dir/space.py:space", "no such file"),
])
def test_bad_space_specs_fail_with_the_flag(spec, match):
    with pytest.raises(SpaceError, match=f"--space.*{match}"):
        load_space_function(spec)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("body,match", [
    ('return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3)}', "not a JobConfig field"),
    ('return {"grad_accum": trial.suggest_float("grad_accum", 1, 4)}', "grad_accum=.*should be int"),
    ('return {"attention": trial.suggest_categorical("attention", ["causal", "sliding"])}', "is not one of"),
    ('return {"lr": "3e-5"}', "lr='3e-5'.*should be float"),
    ('return {"lr": None}', "lr cannot be None"),
    ('return {"gradient_checkpointing": 1}', "should be bool"),
    ('return [trial.suggest_float("lr", 1e-5, 1e-3)]', "returned list, not a dict"),
    ('raise RuntimeError("boom")', "raised on a probe trial.*boom"),
    ('return {"_secret": 1, "lr": 1e-4}', "reserved"),
    ('return {"train_data": "/other.parquet"}', "also fixed by a flag"),
    ('trial.suggest_float("lrr", 1e-5, 1e-3)', "not a JobConfig field"),  # returns None: all suggestions pass
    ('return {}', "chose no JobConfig parameter"),
])
def test_invalid_spaces_fail_before_anything_runs(tmp_path, body, match):
    path = _space_file(tmp_path, f"def space(trial):\n    {body}\n")
    with pytest.raises(SpaceError, match=match):
        validate_space(str(path), FIXED)


def test_conditional_branches_are_probed(tmp_path):
    # the bad branch is taken on only some trials; random probes must find it
    path = _space_file(tmp_path, """
        def space(trial):
            scope = trial.suggest_categorical("train_scope", ["text", "all"])
            if scope == "all":
                return {"train_scope": scope, "lr": "oops"}
            return {"train_scope": scope, "lr": 1e-4}
    """)
    with pytest.raises(SpaceError, match="should be float"):
        validate_space(str(path), FIXED)


def test_none_returning_space_passes_its_suggestions(tmp_path):
    path = _space_file(tmp_path, """
        def space(trial):
            trial.suggest_float("lr", 1e-5, 1e-3, log=True)
            trial.suggest_categorical("attention", ["causal", "prefix"])
    """)
    assert validate_space(str(path), FIXED).searched == ["attention", "lr"]


def test_auxiliary_suggestions_are_dropped_from_the_job_config(tmp_path):
    path = _space_file(tmp_path, """
        def space(trial):
            exponent = trial.suggest_int("lr_exponent", -6, -3)
            return {"lr": 10.0 ** exponent}
    """)
    info = validate_space(str(path), FIXED)
    assert info.searched == ["lr"] and info.auxiliary == ["lr_exponent"]
    fn = SpaceFunction(str(path))
    study = optuna.create_study()
    trial = study.ask()
    out = fn(trial)
    assert out[DROP_KEY] == ["lr_exponent"]
    # OptunaSearch merges every suggestion into the config; split_suggestion undoes that
    merged = {"lr_exponent": trial.params["lr_exponent"], **out, GROUP_KEY: 0}
    params, meta = split_suggestion(merged)
    assert params == {"lr": out["lr"]} and meta[GROUP_KEY] == 0


def test_space_function_pickles_by_reference():
    fn = SpaceFunction("captcha")
    fn.fn  # loaded
    clone = pickle.loads(pickle.dumps(fn))
    assert clone.spec == "captcha" and clone._fn is None
    assert set(clone(optuna.create_study().ask())) == {"lr", "grad_accum", "attention", DROP_KEY}


# ---------------------------------------------------------------- --set and --cross


def test_parse_value_follows_jobconfig_types():
    assert parse_value("lr", "3e-5") == 3e-5
    assert parse_value("grad_accum", "4") == 4
    assert parse_value("gradient_checkpointing", "false") is False
    assert parse_value("gradient_checkpointing", "Yes") is True
    assert parse_value("attention", "causal") == "causal"
    assert parse_value("max_steps", "none") is None
    assert parse_value("val_data", "null") is None
    assert parse_value("fault", "oom@3") == "oom@3"


@pytest.mark.parametrize("item,match", [
    ("grad_accum=2.5", "grad_accum='2.5' should be int"),
    ("attention=sliding", "one of 'causal', 'prefix'"),
    ("lr=none", "should be float"),
    ("lr", "expected key=value"),
    ("learning_rate=1", "not a JobConfig field"),
    ("gradient_checkpointing=maybe", "should be bool"),
])
def test_parse_assignments_errors_name_the_flag(item, match):
    with pytest.raises(ValueError, match=f"--set.*{match}"):
        parse_assignments([item])


def test_parse_assignments_rejects_repeats():
    with pytest.raises(ValueError, match="given twice"):
        parse_assignments(["lr=1e-4", "lr=1e-5"])


def test_cross_and_expansions():
    assert parse_cross(["attention"]) == [("attention", ["causal", "prefix"])]
    assert parse_cross(["lr=1e-4,1e-5"]) == [("lr", [1e-4, 1e-5])]
    with pytest.raises(ValueError, match="--cross lr: give its values"):
        parse_cross(["lr"])
    with pytest.raises(ValueError, match="at least two"):
        parse_cross(["attention=causal"])
    assert build_expansions(1, 0, []) == [{}]
    assert build_expansions(3, 10, []) == [{"seed": 10}, {"seed": 11}, {"seed": 12}]
    both = build_expansions(2, 0, [("attention", ["causal", "prefix"])])
    assert both == [{"attention": "causal", "seed": 0}, {"attention": "causal", "seed": 1},
                    {"attention": "prefix", "seed": 0}, {"attention": "prefix", "seed": 1}]


# ---------------------------------------------------------------- the searcher


def _searcher(expansions=None, max_concurrent=None, space="captcha"):
    return make_searcher(space, "val_exact_match", "max", seed=0, expansions=expansions or [{}],
                         max_concurrent=max_concurrent)


def test_searcher_is_seeded_tpe_with_constant_liar():
    s = _searcher()
    sampler = s.searcher._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._constant_liar is True
    a = [_searcher().suggest(f"t{i}") for i in range(1)]
    b = [_searcher().suggest(f"t{i}") for i in range(1)]
    assert a == b  # same seed, same proposals


def test_outcomes_reach_optuna_as_complete_fail_or_pruned():
    s = _searcher()
    configs = {f"t{i}": s.suggest(f"t{i}") for i in range(5)}
    assert all(c[MEMBER_KEY] == 0 for c in configs.values())
    assert [c[GROUP_KEY] for c in configs.values()] == [0, 1, 2, 3, 4]
    s.on_trial_result("t0", {"val_exact_match": 0.1, "step": 2, "outcome": "running"})
    s.on_trial_complete("t0", {"val_exact_match": 0.4, "outcome": "ok"})
    s.on_trial_complete("t1", {"val_exact_match": float("nan"), "outcome": "oom"})
    s.on_trial_complete("t2", {"val_exact_match": 0.0, "outcome": "diverged"})
    s.on_trial_complete("t3", None, error=True)  # errored after all retries
    s.on_trial_complete("t4", {"val_exact_match": 0.2, "outcome": "running"})  # stopped by ASHA
    states = [t.state for t in s.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.FAIL, TrialState.PRUNED]
    assert s.study.trials[0].value == 0.4
    assert s.study.trials[0].intermediate_values == {2: 0.1}


def test_groups_run_every_proposal_per_replicate_and_tell_the_mean():
    exp = build_expansions(2, 0, [("attention", ["causal", "prefix"])])
    s = _searcher(exp, space="captcha:paired")
    configs = {f"t{i}": s.suggest(f"t{i}") for i in range(4)}
    params = [{k: v for k, v in c.items() if k in ("lr", "grad_accum")} for c in configs.values()]
    assert all(p == params[0] for p in params)  # one proposal ...
    assert sorted((c["attention"], c["seed"]) for c in configs.values()) == [
        ("causal", 0), ("causal", 1), ("prefix", 0), ("prefix", 1)]  # ... four runs
    assert {c[GROUP_KEY] for c in configs.values()} == {0}
    for i, v in enumerate([0.2, 0.4, 0.6, 0.8]):
        assert s.study.trials[0].state == TrialState.RUNNING
        s.on_trial_complete(f"t{i}", {"val_exact_match": v, "outcome": "ok"})
    assert s.study.trials[0].state == TrialState.COMPLETE
    assert s.study.trials[0].value == pytest.approx(0.5)
    assert s.suggest("t4")[GROUP_KEY] == 1  # the next proposal


def test_a_group_with_some_failures_is_told_the_mean_of_the_rest():
    s = _searcher(build_expansions(2, 0, []))
    s.suggest("a"), s.suggest("b")
    s.on_trial_complete("a", {"val_exact_match": 0.3, "outcome": "ok"})
    s.on_trial_complete("b", {"outcome": "oom"})
    assert s.study.trials[0].value == pytest.approx(0.3)


def test_max_concurrent_holds_back_suggestions():
    s = _searcher(max_concurrent=2)
    assert s.suggest("a") and s.suggest("b")
    assert s.suggest("c") is None
    s.on_trial_complete("a", {"val_exact_match": 0.1, "outcome": "ok"})
    assert s.suggest("c") is not None


def test_searcher_state_survives_save_and_restore(tmp_path):
    s = _searcher(build_expansions(2, 0, []), max_concurrent=3)
    s.suggest("a"), s.suggest("b"), s.suggest("c")
    s.on_trial_complete("a", {"val_exact_match": 0.3, "outcome": "ok"})
    state = s.get_state()
    s.save(str(tmp_path / "searcher.pkl"))

    fresh = _searcher(build_expansions(2, 0, []), max_concurrent=3)
    fresh.set_state(state)
    fresh.restore(str(tmp_path / "searcher.pkl"))
    assert fresh.live == {"b", "c"}
    assert fresh.suggest("d")[GROUP_KEY] == 1  # second member of group 1, not a new proposal
    fresh.on_trial_complete("b", {"val_exact_match": 0.5, "outcome": "ok"})
    assert fresh.study.trials[0].state == TrialState.COMPLETE
    assert fresh.study.trials[0].value == pytest.approx(0.4)


def test_scheduler():
    assert make_scheduler("none", "val_exact_match", "max", {"max_steps": 100}, None, 3) is None
    asha = make_scheduler("asha", "val_exact_match", "max", {"max_steps": 100}, 10, 3)
    assert asha._time_attr == "step" and asha._max_t == 100
    by_samples = make_scheduler("asha", "val_exact_match", "max", {"max_samples": 6400}, None, 3)
    assert by_samples._time_attr == "samples_seen" and by_samples._max_t == 6400
    assert [rung for rung, _ in by_samples._brackets[0]._rungs] == [2400, 800]  # grace: the length / 8, then ×3
    with pytest.raises(ValueError, match="--asha-grace"):
        make_scheduler("asha", "val_exact_match", "max", {"max_steps": 10}, 20, 3)
    with pytest.raises(ValueError, match="--max-samples"):
        make_scheduler("asha", "val_exact_match", "max", {}, 2, 3)


def test_asha_never_stops_a_trial_at_its_last_step():
    from ray.tune.schedulers import TrialScheduler

    from orchestrator.cluster.tune_internals import TrialView

    asha = make_scheduler("asha", "val_exact_match", "max", {"max_steps": 6}, 2, 3)
    trials = [TrialView(f"t{i}") for i in range(4)]
    for t in trials:
        asha.on_trial_add(None, t)
    # at the first rung, the worse trials are stopped ...
    decisions = [asha.on_trial_result(None, t, {"step": 2, "val_exact_match": v})
                 for t, v in zip(trials, [0.9, 0.8, 0.1, 0.05])]
    assert TrialScheduler.STOP in decisions
    # ... but a trial that reached the end, however bad, runs on to report its outcome
    assert asha.on_trial_result(None, trials[1], {"step": 6, "val_exact_match": 0.0}) == TrialScheduler.CONTINUE
