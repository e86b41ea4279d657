"""A sweep as an Optuna study, rebuilt from its Parquet results.

Optuna's own tools (optuna-dashboard, `optuna.visualization`, the importance
evaluators) read studies, not Parquet. The study is rebuilt rather than copied
from the searcher because the searcher's study lives pickled inside Ray Tune's
experiment state; the results hold everything Optuna was told:

- one Optuna trial per proposal (`group_id`): a proposal run several times
  (`--replicates`, `--cross`) is one trial whose value is the mean of its
  completed runs, with the same states the searcher told (search.member_state,
  search.group_state); proposals still running are left out;
- each parameter's distribution from the sweep's space, probed again as
  `mdsweep run` probes it; when the space can no longer be imported, from the
  values seen (said in the notes);
- intermediate values (single objective) from the first run's evaluations, so
  the dashboard's learning curves work.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from orchestrator.results.groups import group_state, member_state
from orchestrator.results.query import QueryError, load_table
from orchestrator.results.spaces import SpaceError, validate_space
from trainer.job_config import JobConfig


class StudyError(ValueError):
    """The sweep cannot be made into a study; the message says why."""


@dataclass
class SweepStudy:
    study: Any  # optuna.Study
    objectives: list[tuple[str, str]]  # (metric, mode)
    notes: list[str] = field(default_factory=list)


def sweep_record(results: str, sweep: str) -> dict[str, Any]:
    """The sweep's own row (how it was run)."""
    rows = load_table(results, "sweeps", [sweep]).to_pylist()
    if not rows:
        raise StudyError(f"--sweep {sweep}: no record of how it was run in {results}/sweeps")
    return rows[0]


def sweep_objectives(record: dict[str, Any]) -> list[tuple[str, str]]:
    objectives = json.loads(record.get("objectives_json") or "[]")
    return [(m, mode) for m, mode in objectives] or [(record["metric"], record.get("mode") or "max")]


def build_study(results: str, sweep: str, storage: Any = None) -> SweepStudy:
    """The sweep as a study named after it, in `storage` (an Optuna storage or its URL; None keeps it in memory).
    A study of that name already in the storage is replaced, so a re-run gives the same study."""
    try:
        record = sweep_record(results, sweep)
        trials = load_table(results, "trials", [sweep]).to_pylist()
        steps = load_table(results, "steps", [sweep]).to_pylist() if trials else []
    except QueryError as e:
        raise StudyError(str(e)) from None
    return study_from_rows(str(results), sweep, record, trials, steps, storage)


def study_from_rows(results: str, sweep: str, record: dict[str, Any], trials: list[dict[str, Any]],
                    steps: list[dict[str, Any]], storage: Any = None) -> SweepStudy:
    """`build_study` from the sweep's rows already read (the report has them)."""
    import optuna

    objectives = sweep_objectives(record)
    notes: list[str] = []
    distributions = _space_distributions(record, notes)
    if not distributions:
        distributions = _inferred_distributions(trials)
    proposals = _frozen_trials(trials, steps, objectives, distributions)
    notes += [f"proposal {group_id} left out: {why}" for group_id, why in proposals.outside]
    if proposals.running:
        notes.append(f"{proposals.running} proposal(s) still running left out")
    frozen = proposals.trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is not None and sweep in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=sweep, storage=storage)
    study = optuna.create_study(study_name=sweep, storage=storage,
                                directions=["maximize" if mode == "max" else "minimize" for _, mode in objectives])
    study.set_user_attr("results", results)
    study.set_user_attr("space", record.get("space"))
    with warnings.catch_warnings():  # experimental in Optuna 3-5, and what optuna-dashboard labels axes with
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([m for m, _ in objectives])
    study.add_trials(frozen)
    return SweepStudy(study=study, objectives=objectives, notes=notes)


def _space_distributions(record: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    try:
        fixed = json.loads(record.get("fixed_json") or "{}")
        return validate_space(record["space"], fixed).distributions
    except (SpaceError, ValueError, KeyError, TypeError) as e:
        notes.append(f"the space {record.get('space')!r} could not be probed ({e}); parameter ranges are the "
                     "values the sweep tried")
        return {}


def _inferred_distributions(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Ranges from the values tried: numbers as uniform (log when positive and spanning 10x), the rest as
    categories. Only for a space that can no longer be imported."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    values: dict[str, list[Any]] = {}
    for row in trials:
        params = json.loads(row.get("params_json") or "{}")
        for name in row.get("searched") or []:
            if name in params:
                values.setdefault(name, []).append(params[name])
    out: dict[str, Any] = {}
    for name, seen in values.items():
        numbers = [v for v in seen if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(seen) and len(set(numbers)) > 1:
            low, high = min(numbers), max(numbers)
            if all(isinstance(v, int) for v in numbers):
                out[name] = IntDistribution(low, high)
            else:
                out[name] = FloatDistribution(low, high, log=low > 0 and high / low >= 10)
        else:
            out[name] = CategoricalDistribution(sorted(set(seen), key=str))
    return out


@dataclass
class FrozenProposals:
    """A sweep's ended proposals as Optuna trials, and what could not be made one."""
    trials: list[Any] = field(default_factory=list)  # optuna FrozenTrial, one per proposal
    outside: list[tuple[int, str]] = field(default_factory=list)  # (group id, why): a value the space no longer has
    running: int = 0  # proposals still running, left out


def _frozen_trials(trials: list[dict[str, Any]], steps: list[dict[str, Any]], objectives: list[tuple[str, str]],
                   distributions: dict[str, Any]) -> FrozenProposals:
    import optuna

    metrics = [m for m, _ in objectives]
    by_group: dict[int, list[dict[str, Any]]] = {}
    for row in trials:
        by_group.setdefault(int(row["group_id"] if row.get("group_id") is not None else -1), []).append(row)
    curves: dict[str, dict[int, float]] = {}
    for s in steps:
        value = s.get(metrics[0])
        if value is not None and math.isfinite(value):
            curves.setdefault(s["trial_id"], {})[int(s["step"])] = float(value)

    out = FrozenProposals()
    for group_id, members in sorted(by_group.items()):
        members.sort(key=lambda r: (r.get("member") or 0, r["trial_id"]))
        if any(r.get("outcome") in (None, "running") for r in members):
            out.running += 1
            continue
        state, values = group_state([member_state({"outcome": r["outcome"],
                                                   **{m: r.get(f"final_{m}") for m in metrics}}, metrics)
                                     for r in members])
        params = json.loads(members[0].get("params_json") or "{}")
        params = {k: v for k, v in params.items() if k in distributions}
        try:
            out.trials.append(optuna.trial.create_trial(
                state=optuna.trial.TrialState[state], values=list(values) if values else None, params=params,
                distributions={k: distributions[k] for k in params},
                intermediate_values=curves.get(members[0]["trial_id"], {}) if len(metrics) == 1 else {},
                user_attrs={"group_id": group_id, "trial_ids": [r["trial_id"] for r in members],
                            "outcomes": [r["outcome"] for r in members]}))
        except ValueError as e:  # a value outside the range the space has now: the space changed since
            out.outside.append((group_id, str(e)))
    return out


# settings that change what a trial's objective means: a trial run under other values of these says nothing about
# the new sweep's objective (model, data, validation split, and the sample budget: max_samples, max_steps or epochs,
# times the samples of a step)
MEANING_SETTINGS = ("model", "revision", "train_data", "val_data", "val_fraction", "split_seed", "max_val_samples",
                    "epochs", "max_samples", "max_steps", "batch_size", "grad_accum")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(JobConfig)}


def _meaning(fixed: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The settings in MEANING_SETTINGS a trial ran with: its own suggestion, else the sweep's fixed value, else
    JobConfig's default (an explicit default and an absent setting are the same run)."""
    return {k: params.get(k, fixed.get(k, DEFAULTS[k])) for k in MEANING_SETTINGS}


@dataclass
class Carried:
    """Finished proposals of an earlier sweep, as Optuna trials of the new sweep's space (none rerun)."""
    source: str
    trials: list[Any] = field(default_factory=list)  # optuna FrozenTrial, COMPLETE
    notes: list[str] = field(default_factory=list)  # what was skipped, and why: one line each

    def describe(self) -> str:
        return f"{len(self.trials)} finished trial(s) carried from {self.source}"


def carried_trials(source: str, distributions: dict[str, Any], objectives: list[tuple[str, str]],
                   fixed: dict[str, Any]) -> Carried:
    """`--warm-start RESULTS:SWEEP`: that sweep's completed proposals, with the new space's distributions, for the
    new sweep's study to learn from before its first proposal. Raises StudyError (naming the flag) for a source
    that does not exist or ranks the other way; values outside the new space, and a source run under other
    settings that change what its objective means, are skipped and counted in the notes."""
    results, sep, sweep = source.rpartition(":")
    if not sep or not results or not sweep:
        raise StudyError(f"--warm-start {source}: expected RESULTS:SWEEP, e.g. results:demo")
    try:
        record = sweep_record(results, sweep)
        rows = load_table(results, "trials", [sweep]).to_pylist()
    except (QueryError, StudyError, FileNotFoundError) as e:
        raise StudyError(f"--warm-start {source}: {str(e).removeprefix(f'--sweep {sweep}: ')}") from None
    try:  # the curves are extra: a sweep that never evaluated has none
        steps = load_table(results, "steps", [sweep]).to_pylist()
    except (QueryError, FileNotFoundError):
        steps = []
    theirs = sweep_objectives(record)
    if [m for m, _ in theirs] != [m for m, _ in objectives]:
        raise StudyError(f"--warm-start {source}: it optimised {', '.join(m for m, _ in theirs)}, this sweep "
                         f"{', '.join(m for m, _ in objectives)}; its values cannot be told to this search")
    for (metric, their_mode), (_, mode) in zip(theirs, objectives):
        if their_mode != mode:
            raise StudyError(f"--warm-start {source}: it ranked by {metric} ({their_mode}), this sweep the other way")
    carried = Carried(source)
    their_fixed = json.loads(record.get("fixed_json") or "{}")
    # a proposal is told only if what its objective means is this sweep's: the settings it ran with (fixed there,
    # or searched there) equal this sweep's fixed ones; a setting this sweep searches may differ
    ours = {k: v for k, v in _meaning(fixed, {}).items() if k not in distributions}
    kept, differ = [], {}
    for row in rows:
        theirs_ran = _meaning(their_fixed, json.loads(row.get("params_json") or "{}"))
        wrong = [k for k, v in ours.items() if theirs_ran[k] != v]
        if wrong:
            differ.setdefault(wrong[0], (theirs_ran[wrong[0]], ours[wrong[0]], set()))[2].add(row.get("group_id"))
        else:
            kept.append(row)
    for k, (was, now, groups) in differ.items():
        carried.notes.append(f"{len(groups)} proposal(s) of {source} skipped: they ran with another {k} ({was!r}, "
                             f"here {now!r})")
    proposals = _frozen_trials(kept, steps, objectives, distributions)
    carried.trials = [t for t in proposals.trials if t.state.name == "COMPLETE"]
    for t in carried.trials:
        t.set_user_attr("warm_start", source)
    if proposals.outside:
        carried.notes.append(f"{len(proposals.outside)} proposal(s) of {source} skipped: a value outside this "
                             f"space's bounds or choices (first: {proposals.outside[0][1]})")
    if len(proposals.trials) > len(carried.trials):
        carried.notes.append(f"{len(proposals.trials) - len(carried.trials)} proposal(s) of {source} skipped: they "
                             "did not finish with a value (failed, out of memory or pruned)")
    if proposals.running:
        carried.notes.append(f"{proposals.running} proposal(s) still running in {source}: skipped")
    return carried
