"""Run and resume a sweep: the driver behind `mdsweep run` and `mdsweep resume`.

Order of work in `run_sweep`: everything that can be checked without a cluster
(sweep name, metric/mode, fixed settings, search space, groups) is checked first;
then Ray is attached or started, the per-trial resources are resolved and checked
against the nodes; only then is anything scheduled. The settings are saved next
to Ray Tune's experiment state (orchestrator.sweep.settings) so that `resume`
rebuilds the same trainable.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.cluster import connect as cluster_mod
from orchestrator.cluster.resources import (NodeInfo, ResourceError, TrialResources, check_fit, concurrency_capacity,
                                            format_size, plan_resources, probe_gpu_memory)
from orchestrator.cluster.signals import sigterm_as_interrupt
from orchestrator.cluster.tune_internals import replace_restored_callbacks, set_tune_environment, trial_dirname
from orchestrator.cluster.tune_state import (StateBackup, StateLost, drop_repair_copies, repair_checkpoints,
                                             restore_incomplete)
from orchestrator.results.groups import build_expansions
from orchestrator.results.ranking import best_trial
from orchestrator.results.schema import validate_sweep_name
from orchestrator.results.study import Carried, StudyError, carried_trials
from orchestrator.tracking.trackers import parse_trackers
from orchestrator.tracking.tune_callback import MirrorCallback
from orchestrator.sweep.baselines import plan_baselines
from orchestrator.sweep.checks import check_data, check_mfu_objective, check_settings, searched_columns
from orchestrator.sweep.held_out import test_best_trials
from orchestrator.sweep.lock import describe_stale, refusal, running_driver, sweep_lock
from orchestrator.sweep.settings import (AUTO_WORKERS, MANIFEST, SweepError, SweepSettings, manifest_exists,
                                         normalize_storage, read_manifest, write_manifest)

@dataclass
class SweepOutcome:
    """How a run or resume ended and what it left: the CLI prints the leaderboard and summary from it
    (orchestrator.cli.run) and picks the exit code, so the driver decides what happened and never how it reads."""
    name: str
    experiment_path: str
    results: str
    status: str  # finished, interrupted, dry-run
    counts: dict[str, int]
    settings: SweepSettings
    resources: Optional[TrialResources] = None
    wall_time_s: float = 0.0
    terminated: bool = False  # ended by SIGTERM (orchestrator.cluster.signals)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the trials table's rows of this sweep at its end
    report: str = ""  # where the HTML report is and how to remake it, or why it was not written


def resolve_resources(s: SweepSettings, nodes: list[NodeInfo], cluster_notes: list[str],
                      samples: Optional[list[dict[str, Any]]] = None) -> tuple[TrialResources, list[str]]:
    """Per-trial resources against the cluster's `nodes`; `samples` (probed suggestions) size `auto` GPU shares and
    choose the count of `--workers-per-trial auto`, which then replaces `auto` in `s`: the saved settings resume at
    that count. `cluster_notes`: what attaching to the cluster had to say, shown with the resources' notes."""
    if s.gpu_memory_per_trial and not s.node_gpu_memory:
        probe_gpu_memory(nodes)
    if s.workers_per_trial == AUTO_WORKERS and not any(n.gpus > 0 for n in nodes):
        raise SweepError("--workers-per-trial auto: the cluster has no GPUs, and auto sizes the workers to a GPU's "
                         "memory; give --workers-per-trial N")
    plan = functools.partial(plan_resources, nodes, cpus_per_trial=s.cpus_per_trial, gpus_per_trial=s.gpus_per_trial,
                             memory_per_trial=s.memory_per_trial, node_gpu_memory=s.node_gpu_memory)
    notes: list[str] = []
    samples = samples or [{}]
    try:
        req = plan(gpu_memory_per_trial=s.gpu_memory_per_trial,
                   workers=1 if s.workers_per_trial == AUTO_WORKERS else s.workers_per_trial)
        if req.auto_gpu_bytes and s.workers_per_trial == AUTO_WORKERS:
            s.workers_per_trial, note = auto_workers(s, req.auto_gpu_bytes, samples)
            notes.append(note)
        if req.auto_gpu_bytes and s.workers_per_trial > 1:
            req, note = worker_shares(s, plan, req.auto_gpu_bytes, samples)
            notes.append(note)
        elif req.auto_gpu_bytes:
            notes.append(auto_shares(s, req, samples))
        if not s.skip_fit_check:
            check_fit(req, nodes)
    except ResourceError as e:
        raise SweepError(str(e)) from None
    if req.gpus == 0:
        check_mfu_objective(s, "the cluster has no GPUs")
    notes = list(req.notes) + notes + cluster_mod.storage_notes(s.storage, nodes) + list(cluster_notes)
    cap = concurrency_capacity(req, nodes)
    if cap == 0 and not s.skip_fit_check:
        raise SweepError(f"no trial of {req.describe()} fits the cluster")
    notes.append(f"{len(nodes)} node(s); each trial gets {req.describe()}; up to {cap} trial(s) at once")
    req.capacity = cap
    return req, notes


def auto_workers(s: SweepSettings, gpu_bytes: int, samples: list[dict[str, Any]]) -> tuple[int, str]:
    """`--workers-per-trial auto`: the fewest workers at which every probed configuration's per-rank prediction plus
    margin (MemoryBook.need, as `--gpu-memory-per-trial auto` sizes one worker) fits a GPU of `gpu_bytes`; with a
    line for the user."""
    from orchestrator.sweep.gpu_memory import MemoryBook
    from orchestrator.sweep.memory_plan import WORKER_CHOICES, workers_to_fit
    from orchestrator.sweep.trainable import job_config_from

    configs = [job_config_from(s.fixed, sample) for sample in samples]
    workers = workers_to_fit(configs, gpu_bytes, MemoryBook().need)  # predictions only: nothing is measured yet
    size = format_size(gpu_bytes)
    if workers is None:
        raise ResourceError(f"--workers-per-trial auto: at none of {', '.join(map(str, WORKER_CHOICES))} workers "
                            f"does every probed configuration of --space {s.space} fit a {size} GPU per rank (or "
                            "split its batch evenly); see `mdsweep plan`, or give --workers-per-trial N to run "
                            "the configurations that fit at N")
    return workers, (f"--workers-per-trial auto: {workers} worker(s) per trial, the fewest at which every probed "
                     f"configuration's per-rank prediction plus margin fits a {size} GPU")


def _probed_needs(s: SweepSettings, gpu_bytes: int, workers: int, samples: list[dict[str, Any]]) -> list[int]:
    """With `auto` GPU memory: a fresh book for the sweep (an earlier sweep of this name in this process must not
    size this one; a resumed sweep's searcher puts back the book it saved), and one rank's need of every probed
    configuration; fails when none fits a GPU."""
    from orchestrator.sweep.gpu_memory import MemoryBook, register_book
    from orchestrator.sweep.trainable import job_config_from

    book = MemoryBook(gpu_bytes=gpu_bytes, workers=workers)
    register_book(s.name, book)
    needs = [book.need(job_config_from(s.fixed, sample)) for sample in samples]
    if min(needs) > gpu_bytes:
        on = f" on {workers} workers" if workers > 1 else ""
        raise ResourceError(f"--gpu-memory-per-trial auto: no configuration of --space {s.space} is predicted to "
                            f"fit a {format_size(gpu_bytes)} GPU{on} (smallest need {format_size(min(needs))}); "
                            "see `mdsweep plan`")
    return needs


def _left_out(needs: list[int], fitting: list[int]) -> str:
    return (f"; {len(needs) - len(fitting)} of {len(needs)} probed configurations fit no GPU and will not run"
            if len(fitting) < len(needs) else "")


def auto_shares(s: SweepSettings, req: TrialResources, samples: list[dict[str, Any]]) -> str:
    """With `auto` on one worker: the GPU shares the space's probed configurations would get, for the capacity
    estimate and the user; fails when none fits a GPU."""
    from orchestrator.sweep.gpu_memory import AutoGpuResources

    resources = AutoGpuResources(s.name, s.fixed, req.cpus, int(req.auto_gpu_bytes))
    needs = _probed_needs(s, int(req.auto_gpu_bytes), 1, samples)
    fitting = [n for n in needs if n <= req.auto_gpu_bytes]
    req.gpus = resources.fraction_of(min(fitting))
    return (f"--gpu-memory-per-trial auto: each trial gets its predicted memory plus a margin, "
            f"{format_size(min(fitting))} to {format_size(max(fitting))} of a {format_size(req.auto_gpu_bytes)} GPU "
            f"({req.gpus:g} to {resources.fraction_of(max(fitting)):g} of it)" + _left_out(needs, fitting))


def worker_shares(s: SweepSettings, plan: Callable[..., TrialResources], gpu_bytes: int,
                  samples: list[dict[str, Any]]) -> tuple[TrialResources, str]:
    """With `auto` GPU memory on N > 1 workers: one fixed share for every worker of every trial, the largest
    per-rank need among the probed configurations that fit, planned as if given as a size. A trial's workers ask
    Ray Train for their resources when the trial starts, not Tune's per-trial resource function (which sizes only
    the trial itself, here a driver without a GPU), so their share cannot follow each trial's own prediction."""
    needs = _probed_needs(s, gpu_bytes, s.workers_per_trial, samples)
    fitting = [n for n in needs if n <= gpu_bytes]
    req = plan(gpu_memory_per_trial=str(max(fitting)), workers=s.workers_per_trial)
    return req, (f"--gpu-memory-per-trial auto on {s.workers_per_trial} workers per trial: each worker gets "
                 f"{format_size(max(fitting))} of a {format_size(gpu_bytes)} GPU ({req.gpus:g} of it), the largest "
                 f"per-rank prediction plus margin of the probed configurations" + _left_out(needs, fitting))


# ---------------------------------------------------------------- building the Tuner pieces


def _trial_spec(s: SweepSettings, req: TrialResources):
    from orchestrator.sweep.trainable import TrialSpec

    return TrialSpec(fixed=dict(s.fixed), metric=s.metric, max_gpu_memory=req.max_gpu_memory, cpus=req.cpus,
                     job_fn=s.job_fn, workers=req.workers, worker_resources=req.worker_resources())


def _trainable(s: SweepSettings, req: TrialResources):
    from ray import tune

    from orchestrator.sweep.trainable import make_trainable

    if req.auto_gpu_bytes:
        from orchestrator.sweep.gpu_memory import AutoGpuResources

        resources = AutoGpuResources(s.name, s.fixed, req.cpus, req.auto_gpu_bytes, req.memory_bytes)
        return tune.with_resources(make_trainable(_trial_spec(s, req)), resources)
    return tune.with_resources(make_trainable(_trial_spec(s, req)), req.ray_resources())


def _expansions(s: SweepSettings) -> list[dict[str, Any]]:
    """The runs of each suggestion (--replicates, --cross)."""
    return build_expansions(s.replicates, int(s.fixed.get("seed", 0) or 0), s.cross)


def total_trials(s: SweepSettings) -> int:
    """How many trials the sweep runs in all: each suggestion once per expansion."""
    return s.num_samples * len(_expansions(s))


def _sink(s: SweepSettings, req: TrialResources, searched: list[str]) -> Any:
    """The Tune callback that writes this sweep's rows (and, on resume, the rows the results had missed)."""
    from orchestrator.sweep.sink import ParquetSink

    return ParquetSink(s.results, s.name, s.fixed, searched, s.metric, s.mode, req.max_gpu_memory, req.workers)


@dataclass
class TunerParts:
    """What a run's Tuner and a resumed one take from this process: one builder makes both, so a callback or
    setting added here reaches `run` and `resume` alike."""
    trainable: Any  # the trainable with its per-trial resources
    callbacks: list[Any]  # the Parquet sink, progress table, state backup, Tune's JSON logger, --log-to trackers
    trackers: Optional[MirrorCallback] = None  # the --log-to trackers, closed by _finish once the results are in


def tuner_parts(s: SweepSettings, req: TrialResources, searched: list[str], quiet: bool) -> TunerParts:
    """The trainable and callbacks of a sweep's Tuner, for `run` (tune.Tuner) and `resume` (tune.Tuner.restore,
    whose saved callbacks these replace, so that the resuming command's --quiet decides the progress table)."""
    from ray.tune.logger import JsonLoggerCallback

    from orchestrator.sweep.progress import ProgressTable

    progress = ProgressTable(s.metric, searched, interval_s=0 if quiet else s.progress_interval,
                             total=total_trials(s), mode=s.mode,
                             redraw=not s.worker_logs)  # trials' own lines would be drawn over
    # Tune's JSON logger stays although the Parquet sink holds every result: the rows lost to a full disk are
    # rebuilt from its result.json (orchestrator.sweep.repair)
    trackers = [t.runs(s.name, s.metric) for t in parse_trackers(s.log_to)]
    mirror = MirrorCallback(trackers, s.fixed) if trackers else None
    return TunerParts(trainable=_trainable(s, req),
                      callbacks=[_sink(s, req, searched), progress, StateBackup(s.experiment_path()),
                                 JsonLoggerCallback(), *([mirror] if mirror else [])], trackers=mirror)


def _restore_tuner(path: str, parts: TunerParts, resume_errored: bool, restart_errored: bool) -> Any:
    """The Tuner of a saved experiment, with this process's trainable and callbacks (under Ray Client, the
    callbacks saved with the first run: `replace_restored_callbacks`)."""
    from ray import tune

    tuner = tune.Tuner.restore(path, trainable=parts.trainable, resume_unfinished=True,
                               resume_errored=resume_errored, restart_errored=restart_errored)
    replace_restored_callbacks(tuner, parts.callbacks)
    return tuner


def max_concurrent(s: SweepSettings, req: TrialResources) -> Optional[int]:
    """At most this many trials at once: --max-concurrent, and with several workers a trial also no more than the
    cluster holds whole (capacity). Tune reserves only a trial's driver, so it would start drivers whose workers
    wait for each other's resources, none training (Ray issue #38505); with one worker, Tune's reservation is the
    trial's and limits it."""
    limits = [s.max_concurrent, req.capacity if req.workers > 1 else None]
    return min((x for x in limits if x), default=None)


def _prepare_env(s: SweepSettings, req: TrialResources) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    # as many trials may be pending as can run at once, so that they start together
    pending = min(x for x in (s.max_concurrent, getattr(req, "capacity", None), 64) if x)
    set_tune_environment(os.environ.get("MDSWEEP_MAX_PENDING_TRIALS", str(max(1, pending))))


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"mdsweep: {msg}", file=sys.stderr, flush=True)


def _finish(s: SweepSettings, started: float, req: TrialResources, quiet: bool,
            trackers: Optional[MirrorCallback] = None) -> SweepOutcome:
    """Test the best trials on held-out data, record whether the sweep finished, write its report, mark the best
    trial in the --log-to trackers with the report, and say what it left; the leaderboard and summary are the
    CLI's to print."""
    from orchestrator.results.store import ENDED, read_partition, write_sweep_row

    if s.test_data:
        test_best_trials(s, req, lambda message: _say(message, quiet))
    rows = read_partition(s.results, "trials", s.name)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("outcome") or "?"] = counts.get(r.get("outcome") or "?", 0) + 1
    unfinished = [r for r in rows if r.get("status") not in ENDED]
    status = "finished" if not unfinished and len(rows) >= total_trials(s) else "interrupted"
    try:
        write_sweep_row(s.results, s.name, {"status": status})
    except OSError as e:  # a full or read-only results disk: the sweep's state is safe with Tune
        _say(f"could not record the sweep's status in {s.results} ({e.strerror}); once the disk is fixed, "
             f"`mdsweep resume {s.name} --storage {s.storage}` puts back what is missing")
        status = "interrupted"
    report, written = _write_report(s)
    if trackers is not None:  # the best is marked once, when the sweep is complete (not at an interruption)
        trackers.close(best_trial(rows) if status == "finished" else None, written)
    return SweepOutcome(name=s.name, experiment_path=s.experiment_path(), results=s.results, status=status,
                        counts=counts, settings=s, resources=req, wall_time_s=time.time() - started, rows=rows,
                        report=report)


def _write_report(s: SweepSettings) -> tuple[str, Optional[Path]]:
    """The sweep's HTML report beside its results: where it is and how to remake it (or why it was not written),
    and its path when written. A failure here must not fail a sweep whose results landed."""
    from orchestrator.results.report_html import default_report_path, write_report

    out = default_report_path(s.results, s.name)
    try:
        warnings = write_report(s.results, s.name, out)
        return f"{out}  (open it in a browser; remake: mdsweep report {s.results} --sweep {s.name})" + \
            "".join(f"\n  warning: {w}" for w in warnings), Path(out)
    except Exception as e:
        return f"not written ({type(e).__name__}: {e}); try: mdsweep report {s.results} --sweep {s.name}", None


def run_sweep(s: SweepSettings, quiet: bool = False, dry_run: bool = False) -> SweepOutcome:
    started = time.time()
    s.storage = normalize_storage(s.storage)
    cluster_mod.check_output_outlives_job("--results", s.results)
    s.results = str(Path(s.results).expanduser().resolve())
    info = check_settings(s)
    data_note = check_data(s.fixed, s.test_data)
    searched = searched_columns(s, info)
    baselines = plan_baselines(s.enqueue, s.fixed.get("revision"), distributions=info.distributions,
                               searched=info.searched, fixed=s.fixed, crossed=[name for name, _ in s.cross],
                               num_samples=s.num_samples)
    s.baselines = [{"label": b.label, "params": b.params, "extra": b.extra} for b in baselines]
    carried = warm_start(s, info.distributions)
    check_name_is_free(s)  # early, before Ray starts; again under the lock, where it counts
    expansions = _expansions(s)
    handle = cluster_mod.connect(s.address, num_cpus=s.num_cpus, num_gpus=s.num_gpus, log_to_driver=s.worker_logs,
                                 ray_log_file=s.ray_log_file())
    try:
        req, notes = resolve_resources(s, handle.nodes(), handle.notes, info.samples)
        for n in [data_note, *notes] if data_note else notes:
            _say(n, quiet)
        _say(f"space {s.space}: searches {', '.join(searched)}; {s.num_samples} suggestion(s) x "
             f"{len(expansions)} run(s) each = {s.num_samples * len(expansions)} trial(s)", quiet)
        for b in baselines:
            _say(f"runs first, {b.describe()}", quiet)
        for c in carried:
            _say(f"warm start: {c.describe()}", quiet)
            for line in c.notes:  # a skip is said even under --quiet: the search knows less than was asked
                print(f"mdsweep: warm start: {line}", file=sys.stderr, flush=True)
        if dry_run:
            return SweepOutcome(name=s.name, experiment_path=s.experiment_path(), results=s.results,
                                status="dry-run", counts={}, settings=s, resources=req)
        # one driver per sweep, from here to its end (orchestrator.sweep.lock)
        with sweep_lock(s.name, s.experiment_path(), s.results, "run"):
            check_name_is_free(s)
            _prepare_env(s, req)
            write_manifest(s)
            with sigterm_as_interrupt() as signalled:
                try:
                    parts = _start_tuner(s, req, searched, expansions, quiet, carried)
                except BaseException:
                    _forget_unstarted(s)
                    raise
                outcome = _finish(s, started, req, quiet, parts.trackers)
        outcome.terminated = signalled.received
        return outcome
    finally:
        handle.shutdown()


def check_name_is_free(s: SweepSettings) -> None:
    """A new sweep's name must be new to its storage and to its results (another storage's sweep of that name
    there would merge with it)."""
    from orchestrator.results.store import read_partition

    if manifest_exists(s.storage, s.name):
        running = None if cluster_mod.is_remote_storage(s.storage) else running_driver(Path(s.experiment_path()))
        if running:
            raise SweepError(refusal(s.name, running))
        raise SweepError(f"--name {s.name}: a sweep of that name exists in {s.storage}; continue it with "
                         f"`mdsweep resume {s.name}` or choose another --name")
    recorded = read_partition(s.results, "sweeps", s.name)
    elsewhere = recorded[0].get("experiment_path") if recorded else None
    if elsewhere and elsewhere != s.experiment_path():
        raise SweepError(f"--name {s.name}: --results {s.results} already hold a sweep {s.name} (its state is in "
                         f"{elsewhere}); choose another --name or --results")


def _forget_unstarted(s: SweepSettings) -> None:
    """A sweep that failed before Ray Tune saved any state cannot be resumed: drop its settings file so the
    name can be used again (otherwise `run` says "resume it" and `resume` says "no state")."""
    from ray import tune

    if not tune.Tuner.can_restore(s.experiment_path()):
        fs, path = cluster_mod.storage_filesystem(s.experiment_path())
        fs.delete_file(f"{path}/{MANIFEST}")


def warm_start(s: SweepSettings, distributions: dict[str, Any]) -> list[Carried]:
    """The --warm-start sources read before Ray starts, so a missing one, one given twice or one ranked the other
    way is refused at once."""
    twice = sorted({source for source in s.warm_start if s.warm_start.count(source) > 1})
    if twice:
        raise SweepError(f"--warm-start {twice[0]}: given twice; its trials would be told twice")
    objectives = s.objectives if len(s.objectives) > 1 else [(s.metric, s.mode)]
    try:
        return [carried_trials(source, distributions, objectives, s.fixed) for source in s.warm_start]
    except StudyError as e:
        raise SweepError(str(e)) from None


def search_seed(s: SweepSettings) -> int:
    """The TPE sampler's seed: --search-seed, mixed with the --warm-start sources when there are any. With the seed
    alone, a warm-started search told fewer trials than TPE's random start-up would draw the very points its source
    drew with that seed, and run them again."""
    if not s.warm_start:
        return s.search_seed
    return zlib.crc32("\n".join([str(s.search_seed), *s.warm_start]).encode())


def _start_tuner(s: SweepSettings, req: TrialResources, searched: list[str], expansions: list[dict[str, Any]],
                 quiet: bool, carried: list[Carried]) -> TunerParts:
    """Write the sweep's row, build the searcher, scheduler and Tuner, and run it (results land through the
    sink); the parts it ran with, whose trackers `_finish` closes."""
    from ray import tune

    from orchestrator.results.store import write_sweep_row
    from orchestrator.sweep.early_stopping import make_scheduler
    from orchestrator.sweep.search import make_searcher

    write_sweep_row(s.results, s.name, {
        "status": "running", "experiment_path": s.experiment_path(), "space": s.space, "metric": s.metric,
        "mode": s.mode, "num_samples": s.num_samples, "replicates": s.replicates,
        "cross_json": json.dumps(s.cross, default=str), "fixed_json": json.dumps(s.fixed, default=str),
        "objectives_json": json.dumps(s.objectives or [[s.metric, s.mode]]),
        "resources_json": json.dumps(req.to_dict(), default=str), "argv": s.argv,
        "warm_start_json": json.dumps([{"source": c.source, "carried": len(c.trials), "notes": c.notes}
                                       for c in carried]) if carried else None})
    searcher = make_searcher(s.space, s.metric, s.mode, search_seed(s), expansions, max_concurrent(s, req),
                             sweep=s.name, fixed=s.fixed, objectives=s.objectives, baselines=s.baselines,
                             warm_start=[t for c in carried for t in c.trials])
    scheduler = make_scheduler(s.early_stop, s.metric, s.mode, s.fixed, s.asha_grace,
                               s.asha_reduction_factor)
    parts = tuner_parts(s, req, searched, quiet)
    tuner = tune.Tuner(
        parts.trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=total_trials(s),
                                    reuse_actors=False, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=s.name, storage_path=s.storage, callbacks=parts.callbacks, verbose=0,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    _say(f"sweep {s.name}: experiment {s.experiment_path()}, results {s.results}", quiet)
    tuner.fit()
    return parts


def resume_sweep(name: str, storage: str, address: Optional[str] = None, num_cpus: Optional[int] = None,
                 num_gpus: Optional[int] = None, resume_errored: bool = False, restart_errored: bool = False,
                 quiet: bool = False) -> SweepOutcome:
    """Continue an interrupted sweep from Ray Tune's experiment state; finished trials stay finished."""
    started = time.time()
    try:
        validate_sweep_name(name, "NAME")
    except ValueError as e:
        raise SweepError(str(e)) from None
    storage = normalize_storage(storage)
    s = read_manifest(storage, name)
    s.storage = storage
    s.address, s.num_cpus, s.num_gpus = address, num_cpus, num_gpus
    info = check_settings(s)
    with sweep_lock(name, s.experiment_path(), s.results, "resume") as lock:
        taken = describe_stale(lock)
        if taken:
            _say(taken, quiet)
        handle = cluster_mod.connect(address, num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=s.worker_logs,
                                     ray_log_file=s.ray_log_file())
        try:
            req, notes = resolve_resources(s, handle.nodes(), handle.notes, info.samples)
            for n in notes:
                _say(n, quiet)
            _prepare_env(s, req)
            from ray import tune

            from orchestrator.results.store import write_sweep_row
            from orchestrator.sweep.repair import repair_interrupted_steps, repair_missing_rows

            path = s.experiment_path()
            try:
                restored = restore_incomplete(path)
            except StateLost as lost:
                raise SweepError(f"NAME: the driver was killed while writing {lost} in {path}, and no complete copy "
                                 "of it was kept, so the search cannot be resumed where it stopped; the results so "
                                 f"far stay in {s.results}; start a new sweep under another name") from None
            if restored:
                _say(f"the driver was killed while writing {', '.join(restored)}: put back its last complete copy",
                     quiet)
            if not tune.Tuner.can_restore(path):
                raise SweepError(f"NAME: {path} holds no Ray Tune experiment state to resume")
            write_sweep_row(s.results, s.name, {"status": "running"})
            searched = searched_columns(s, info)
            rebuilt = repair_missing_rows(_sink(s, req, searched), path)
            if rebuilt:
                _say(f"put back the rows of {len(rebuilt)} finished trial(s) the results had missed, from Ray Tune's "
                     f"records: {', '.join(rebuilt)}", quiet)
            interrupted = repair_interrupted_steps(_sink(s, req, searched), path)
            if interrupted:
                _say(f"put back {sum(interrupted.values())} evaluation row(s) of the interrupted trial(s) "
                     f"{', '.join(interrupted)} the results had missed, from Ray Tune's records", quiet)
            repaired = repair_checkpoints(path)
            if repaired:
                _say(f"recreated the checkpoint the saved state points at for {', '.join(repaired)}", quiet)
            _say(f"resuming sweep {name} from {path}", quiet)
            with sigterm_as_interrupt() as signalled:
                parts = tuner_parts(s, req, searched, quiet)
                tuner = _restore_tuner(path, parts, resume_errored, restart_errored)
                tuner.fit()
                if repaired:
                    drop_repair_copies(path, repaired)
                outcome = _finish(s, started, req, quiet, parts.trackers)
            outcome.terminated = signalled.received
            return outcome
        finally:
            handle.shutdown()
