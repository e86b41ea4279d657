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

import contextlib
import dataclasses
import json
import math
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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


JOURNAL_SUFFIXES = (".log", ".jsonl")


SQLITE_URL = "sqlite:///"
SQLITE_HEADER = b"SQLite format 3\x00"
OPTUNA_TABLES = {"studies", "trials", "version_info"}  # in every Optuna RDB schema


def study_storage(text: str) -> tuple[Any, str]:
    """The Optuna storage `--storage` names, and what to give optuna-dashboard to open it.

    A URL is taken as given. A path ending in .log or .jsonl is an Optuna journal file: one append per trial,
    where SQLite runs a query per intermediate value (a 1 000-trial sweep: 3.4 s against 21.5 s,
    bench/RESULTS.md). Any other path is a SQLite file there. An existing file (of a path or a sqlite:/// URL)
    must already be such a storage: see `check_storage_file`."""
    if text.startswith(SQLITE_URL):
        check_storage_file(Path(text[len(SQLITE_URL):]), journal=False)
    if "://" in text:
        return text, text
    path = Path(text).expanduser().resolve()
    journal = path.suffix in JOURNAL_SUFFIXES
    check_storage_file(path, journal)
    if journal:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(path))), str(path)
    url = f"{SQLITE_URL}{path}"
    return url, url


def check_storage_file(path: Path, journal: bool) -> None:
    """Raise ValueError unless `path` is new, empty, or already an Optuna journal (its first line one of Optuna's
    operations) or SQLite database (with Optuna's tables): Optuna appends its log to any file and adds its
    tables to any SQLite database, so a user's notes.jsonl or another program's database would be altered."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    kind = "journal" if journal else "database (SQLite)"
    with path.open("rb") as f:
        head = f.readline(1 << 20)
    if journal:
        try:
            ok = "op_code" in json.loads(head)
        except (ValueError, TypeError):  # not JSON, or not an object
            ok = False
    else:
        ok = head.startswith(SQLITE_HEADER)
        if ok:
            try:
                with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
                    tables = {name for (name,) in db.execute("select name from sqlite_master where type='table'")}
            except sqlite3.Error:
                tables = set()
            ok = OPTUNA_TABLES <= tables
    if not ok:
        raise ValueError(f"{path} exists and is not an Optuna {kind}, which the study would write into; give a "
                         "new file, or one an earlier `mdsweep study` wrote")


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
    ended, running = _proposals(trials, steps, objectives)
    proposals = _in_space(ended, distributions)
    notes += [f"proposal {group_id} left out: {why}" for group_id, why in proposals.outside]
    if running:
        notes.append(f"{running} proposal(s) still running left out")
    frozen = proposals.trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is not None and sweep in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=sweep, storage=storage)
    study = optuna.create_study(study_name=sweep, storage=storage,
                                directions=["maximize" if mode == "max" else "minimize" for _, mode in objectives])
    study.set_user_attr("results", results)
    study.set_user_attr("space", record.get("space"))
    # what a later --warm-start from this storage checks its trials' meaning against (carried_trials)
    study.set_user_attr("fixed_json", record.get("fixed_json") or "{}")
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
class Proposal:
    """One proposal of a sweep as it ran: every setting it searched (a warm start checks their meaning), its state
    for Optuna, its values and its first run's curve."""
    params: dict[str, Any]
    state: str  # an optuna TrialState name
    values: Optional[list[float]]
    intermediate: dict[int, float]
    attrs: dict[str, Any]


@dataclass
class FrozenProposals:
    """Proposals as Optuna trials of one space, and what could not be made one."""
    trials: list[Any] = field(default_factory=list)  # optuna FrozenTrial, one per proposal
    outside: list[tuple[Any, str]] = field(default_factory=list)  # (group id, why): a value the space does not have
    running: int = 0  # proposals still running, left out


def _proposals(trials: list[dict[str, Any]], steps: list[dict[str, Any]],
               objectives: list[tuple[str, str]]) -> tuple[list[Proposal], int]:
    """A sweep's ended proposals from its rows (a proposal run several times is one, valued by
    search.group_state), and how many are still running."""
    metrics = [m for m, _ in objectives]
    by_group: dict[int, list[dict[str, Any]]] = {}
    for row in trials:
        by_group.setdefault(int(row["group_id"] if row.get("group_id") is not None else -1), []).append(row)
    curves: dict[str, dict[int, float]] = {}
    for s in steps:
        value = s.get(metrics[0])
        if value is not None and math.isfinite(value):
            curves.setdefault(s["trial_id"], {})[int(s["step"])] = float(value)
    ended, running = [], 0
    for group_id, members in sorted(by_group.items()):
        members.sort(key=lambda r: (r.get("member") or 0, r["trial_id"]))
        if any(r.get("outcome") in (None, "running") for r in members):
            running += 1
            continue
        state, values = group_state([member_state({"outcome": r["outcome"],
                                                   **{m: r.get(f"final_{m}") for m in metrics}}, metrics)
                                     for r in members])
        ended.append(Proposal(
            params=json.loads(members[0].get("params_json") or "{}"), state=state,
            values=list(values) if values else None,
            intermediate=curves.get(members[0]["trial_id"], {}) if len(metrics) == 1 else {},
            attrs={"group_id": group_id, "trial_ids": [r["trial_id"] for r in members],
                   "outcomes": [r["outcome"] for r in members]}))
    return ended, running


def _in_space(proposals: list[Proposal], distributions: dict[str, Any]) -> FrozenProposals:
    """The proposals as Optuna trials of a space: parameters the space does not search are dropped, and a value
    outside its bounds or choices leaves the proposal out (the space changed since it ran)."""
    import optuna

    out = FrozenProposals()
    for p in proposals:
        params = {k: v for k, v in p.params.items() if k in distributions}
        try:
            out.trials.append(optuna.trial.create_trial(
                state=optuna.trial.TrialState[p.state], values=p.values, params=params,
                distributions={k: distributions[k] for k in params}, intermediate_values=p.intermediate,
                user_attrs=p.attrs))
        except ValueError as e:
            out.outside.append((p.attrs.get("group_id"), str(e)))
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
    """`--warm-start SOURCE`: an earlier sweep's completed proposals, with the new space's distributions, for the
    new sweep's study to learn from before its first proposal. SOURCE is RESULTS:SWEEP, or an Optuna storage that
    `mdsweep study` wrote (`sqlite:///PATH.db`, a .db, .jsonl or .log path), with `:STUDY` where it holds
    several. Raises StudyError (naming the flag) for a source that does not exist or ranks the other way; values
    outside the new space, and proposals run under other settings that change what their objective means, are
    skipped and counted in the notes."""
    storage = split_storage_source(source)
    if storage is None:
        their_fixed, proposals, running = _results_proposals(source, objectives)
    else:
        their_fixed, proposals, running = _storage_proposals(source, *storage, objectives)
    carried = Carried(source)
    # a proposal is told only if what its objective means is this sweep's: the settings it ran with (fixed there,
    # or searched there) equal this sweep's fixed ones; a setting this sweep searches may differ
    ours = {k: v for k, v in _meaning(fixed, {}).items() if k not in distributions}
    kept, differ = [], {}
    for p in proposals:
        theirs_ran = _meaning(their_fixed, p.params)
        wrong = [k for k, v in ours.items() if theirs_ran[k] != v]
        if wrong:
            was, now, n = differ.get(wrong[0], (theirs_ran[wrong[0]], ours[wrong[0]], 0))
            differ[wrong[0]] = (was, now, n + 1)
        else:
            kept.append(p)
    for k, (was, now, n) in differ.items():
        carried.notes.append(f"{n} proposal(s) of {source} skipped: they ran with another {k} ({was!r}, here "
                             f"{now!r})")
    frozen = _in_space(kept, distributions)
    carried.trials = [t for t in frozen.trials if t.state.name == "COMPLETE"]
    for t in carried.trials:
        t.set_user_attr("warm_start", source)
    if frozen.outside:
        carried.notes.append(f"{len(frozen.outside)} proposal(s) of {source} skipped: a value outside this "
                             f"space's bounds or choices (first: {frozen.outside[0][1]})")
    if len(frozen.trials) > len(carried.trials):
        carried.notes.append(f"{len(frozen.trials) - len(carried.trials)} proposal(s) of {source} skipped: they "
                             "did not finish with a value (failed, out of memory or pruned)")
    if running:
        carried.notes.append(f"{running} proposal(s) still running in {source}: skipped")
    return carried


def _check_objectives(source: str, theirs: list[tuple[str, str]], objectives: list[tuple[str, str]]) -> None:
    """A source's values can be told to this search only if it optimised the same metrics the same way."""
    if [m for m, _ in theirs] != [m for m, _ in objectives]:
        raise StudyError(f"--warm-start {source}: it optimised {', '.join(m for m, _ in theirs)}, this sweep "
                         f"{', '.join(m for m, _ in objectives)}; its values cannot be told to this search")
    for (metric, their_mode), (_, mode) in zip(theirs, objectives):
        if their_mode != mode:
            raise StudyError(f"--warm-start {source}: it ranked by {metric} ({their_mode}), this sweep the other way")


def _results_proposals(source: str, objectives: list[tuple[str, str]]
                       ) -> tuple[dict[str, Any], list[Proposal], int]:
    """RESULTS:SWEEP: the sweep's fixed settings, its ended proposals and how many still run, from its Parquet."""
    results, sep, sweep = source.rpartition(":")
    if not sep or not results or not sweep:
        raise StudyError(f"--warm-start {source}: expected RESULTS:SWEEP (e.g. results:demo) or an Optuna storage "
                         "of `mdsweep study` (sqlite:///PATH.db or a .jsonl journal, with :STUDY if it holds several)")
    try:
        record = sweep_record(results, sweep)
        rows = load_table(results, "trials", [sweep]).to_pylist()
    except (QueryError, StudyError, FileNotFoundError) as e:
        raise StudyError(f"--warm-start {source}: {str(e).removeprefix(f'--sweep {sweep}: ')}") from None
    try:  # the curves are extra: a sweep that never evaluated has none
        steps = load_table(results, "steps", [sweep]).to_pylist()
    except (QueryError, FileNotFoundError):
        steps = []
    _check_objectives(source, sweep_objectives(record), objectives)
    proposals, running = _proposals(rows, steps, objectives)
    return json.loads(record.get("fixed_json") or "{}"), proposals, running


STORAGE_SUFFIXES = (".db", ".sqlite", ".sqlite3", *JOURNAL_SUFFIXES)


def split_storage_source(source: str) -> Optional[tuple[str, Optional[str]]]:
    """(storage, study name or None) of a --warm-start that names an Optuna storage: a sqlite:/// URL or a path
    with a storage's suffix, then `:STUDY` or nothing; None for RESULTS:SWEEP."""
    if source.startswith(SQLITE_URL):  # the URL says what it is, whatever the file's name
        path, sep, study = source.removeprefix(SQLITE_URL).rpartition(":")
        return (f"{SQLITE_URL}{path}", study or None) if sep else (source, None)
    head, sep, tail = source.rpartition(":")
    for storage, study in ((source, None), (head, tail) if sep else ("", None)):
        if Path(storage).suffix in STORAGE_SUFFIXES:
            return storage, study
    return None


def absolute_source(source: str) -> str:
    """A --warm-start with its file or folder made absolute: the sweep's record keeps it, read from anywhere."""
    storage = split_storage_source(source)
    if storage is not None:
        text, study = storage
        prefix = SQLITE_URL if text.startswith(SQLITE_URL) else ""
        path = Path(text.removeprefix(SQLITE_URL)).expanduser().resolve()
        return f"{prefix}{path}" + (f":{study}" if study is not None else "")
    results, sep, sweep = source.rpartition(":")
    return f"{Path(results).expanduser().resolve()}:{sweep}" if sep and results else source


def _storage_proposals(source: str, storage_text: str, study_name: Optional[str],
                       objectives: list[tuple[str, str]]) -> tuple[dict[str, Any], list[Proposal], int]:
    """An Optuna storage `mdsweep study` wrote: its study's fixed settings (recorded by build_study) and its
    proposals as they were told to Optuna."""
    import optuna

    path = Path(storage_text.removeprefix(SQLITE_URL)).expanduser()
    if not path.is_file():
        raise StudyError(f"--warm-start {source}: {path} does not exist")
    if path.stat().st_size == 0:  # opening it would make it a new, empty storage: a source is only read
        raise StudyError(f"--warm-start {source}: {path} is empty, not a study `mdsweep study` wrote")
    try:
        storage, _ = study_storage(storage_text if storage_text.startswith(SQLITE_URL) else str(path))
        names = sorted(summary.study_name for summary in optuna.get_all_study_summaries(storage))
    except Exception as e:  # noqa: BLE001 - not a storage, or one Optuna cannot open: its first line says why
        raise StudyError(f"--warm-start {source}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    if study_name is None and len(names) != 1:
        raise StudyError(f"--warm-start {source}: it holds {len(names)} studies ({', '.join(names) or 'none'}); "
                         f"name one: {storage_text}:STUDY")
    if study_name is not None and study_name not in names:
        raise StudyError(f"--warm-start {source}: no study {study_name!r} in {path} (it holds: "
                         f"{', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=study_name or names[0], storage=storage)
    if "fixed_json" not in study.user_attrs:
        raise StudyError(f"--warm-start {source}: the study does not record the settings its trials ran with "
                         "(written by another tool, or before mdsweep study recorded them); write it again with "
                         "`mdsweep study`, or warm-start from RESULTS:SWEEP")
    modes = ["max" if d == optuna.study.StudyDirection.MAXIMIZE else "min" for d in study.directions]
    _check_objectives(source, list(zip(study.metric_names or [], modes)), objectives)
    proposals = [Proposal(params=dict(t.params), state=t.state.name, values=t.values,
                          intermediate=dict(t.intermediate_values), attrs=dict(t.user_attrs))
                 for t in study.get_trials(deepcopy=False)]
    return json.loads(study.user_attrs["fixed_json"]), proposals, 0
