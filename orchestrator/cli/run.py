"""`mdsweep run` and `mdsweep resume`."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Optional

from orchestrator.cli.job_flags import add_job_arguments, job_overrides
from orchestrator.cluster.connect import ClusterError
from orchestrator.cluster.signals import EXIT_INTERRUPTED, EXIT_TERMINATED
from orchestrator.results.objectives import parse_objective, pareto_front
from orchestrator.results.ranking import best_trial, describe_test, describe_trial
from orchestrator.sweep.settings import SweepError, SweepSettings, utc_stamp
from orchestrator.tracking.trackers import LOG_TO_HELP, absolute_tracker

if TYPE_CHECKING:
    from orchestrator.sweep.driver import SweepOutcome

# JobConfig fields with their own flag on `mdsweep run` (help texts come from JobConfig);
# every other field is reachable through --set
JOB_FLAG_FIELDS = ("model", "train_data", "val_data", "max_val_samples", "max_samples", "max_steps", "epochs",
                   "batch_size", "eval_every_samples", "eval_every", "seed", "device", "cache_dir")
PATH_FIELDS = ("train_data", "val_data", "test_data", "model", "cache_dir")


GROUP_TITLES = {"cluster": "cluster", "search": "search",
                "job": "job settings (fixed: the same for every trial)", "resources": "resources per trial",
                "output": "failures and output"}


def settings_flags() -> list[dataclasses.Field]:
    """The SweepSettings fields that are `mdsweep run` flags (their metadata says how)."""
    return [f for f in dataclasses.fields(SweepSettings) if "argparse" in f.metadata]


def add_settings_flags(groups: dict[str, Any], only: Optional[Collection[str]] = None) -> None:
    """One flag per SweepSettings field that declares one, in its group, with its help text."""
    for f in settings_flags():
        if only is not None and f.name not in only:
            continue
        kwargs = dict(f.metadata["argparse"])
        if f.type in (bool, "bool"):
            kwargs["action"] = "store_true"
        groups[f.metadata["group"]].add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                                                 help=f.metadata["help"], **kwargs)


# the settings `run` and `resume` share: where the cluster and the experiment state are
CLUSTER_SETTINGS = frozenset({"address", "storage", "num_cpus", "num_gpus"})


def add_cluster_flags(p: argparse.ArgumentParser) -> dict[str, Any]:
    groups = {"cluster": p.add_argument_group("cluster")}
    add_settings_flags(groups, only=CLUSTER_SETTINGS)
    groups["cluster"].add_argument("--quiet", action="store_true", help="no progress table or leaderboard")
    return groups


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run", help="run a hyperparameter sweep (Ray Tune + Optuna); results land in Parquet",
        description="Run a sweep: Optuna TPE proposes JobConfig settings from a search space, Ray Tune runs one "
                    "fine-tuning job per trial where its resources fit, results are written to Parquet as the "
                    "sweep goes. Fixed settings (flags, --set) are the same for every trial.")
    run.add_argument("--name", default=None,
                     help="sweep name: the experiment folder in --storage and the sweep=NAME partition in "
                          "--results (default: sweep-YYYYmmdd-HHMMSS)")
    groups = add_cluster_flags(run)
    for key in ("search", "job", "resources", "output"):
        groups[key] = run.add_argument_group(GROUP_TITLES[key])
    add_settings_flags(groups, only={f.name for f in settings_flags()} - CLUSTER_SETTINGS)
    search = groups["search"]
    search.add_argument("--objective", action="append", default=[], metavar="METRIC[:max|min]",
                        help="an objective; give two or more (e.g. --objective val_exact_match:max --objective "
                             "peak_memory_bytes:min) for a multi-objective search of their Pareto front, printed "
                             "at the end and by `mdsweep query --pareto`; the first one acts as --metric")
    search.add_argument("--cross", action="append", default=[], metavar="FIELD[=V1,V2]",
                        help="run every proposal once per value of FIELD (default values: all choices of a "
                             "Literal field, e.g. --cross attention), so the values are compared paired on "
                             "identical settings; the space must not search FIELD; repeatable")
    search.add_argument("--warm-start", action="append", default=[], metavar="SOURCE",
                        help="before its first proposal, tell the search the finished trials of an earlier sweep "
                             "that fit this space: RESULTS:SWEEP (its --results directory and name, e.g. "
                             "results:demo), or an Optuna storage `mdsweep study` wrote (sqlite:///PATH.db or a "
                             ".jsonl journal; :STUDY where it holds several); nothing is rerun, and they never count "
                             "as this sweep's results; repeatable")
    groups["output"].add_argument("--log-to", action="append", default=[], metavar="TRACKER[=WHERE]", help=LOG_TO_HELP)
    add_job_arguments(groups["job"], include=JOB_FLAG_FIELDS)
    groups["job"].add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                               help="any other JobConfig field, parsed by its type (e.g. --set attention=causal "
                                    "--set train_scope=text --set max_gpu_memory=none); repeatable")
    groups["output"].add_argument("--dry-run", action="store_true",
                                  help="check the space, settings and resources against the cluster, then stop")
    run.set_defaults(func=cmd_run)

    res = subparsers.add_parser(
        "resume", help="continue an interrupted sweep (finished trials are not rerun)",
        description="Continue a sweep whose driver stopped (killed, Ctrl-C, lost machine) from Ray Tune's "
                    "experiment state: unfinished trials continue from their last checkpoints, finished trials "
                    "stay as they are, and the Parquet results are completed without duplicates.")
    res.add_argument("name", metavar="NAME", help="the sweep's --name")
    add_cluster_flags(res)
    res.add_argument("--resume-errored", action="store_true",
                     help="also continue trials that ended in Tune's ERROR state, from their last checkpoint")
    res.add_argument("--restart-errored", action="store_true",
                     help="rerun trials that ended in Tune's ERROR state from scratch")
    res.set_defaults(func=cmd_resume)


def _absolutize(field: str, value: Any) -> Any:
    """Trials run in their own working directory: make local paths absolute."""
    if field in PATH_FIELDS and isinstance(value, str) and value:
        p = Path(value).expanduser()
        if p.exists() or field != "model":
            return str(p.resolve())
    return value


def fixed_settings(args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.results.job_values import parse_assignments

    fixed: dict[str, Any] = job_overrides(args)
    sets = parse_assignments(args.set_values, "--set")
    for key, value in sets.items():
        if key in fixed:
            raise ValueError(f"--set {key}: already given by --{key.replace('_', '-')}")
        fixed[key] = value
    if args.gpu_memory_per_trial and fixed.get("max_gpu_memory") is not None:
        raise ValueError("--set max_gpu_memory conflicts with --gpu-memory-per-trial (which sets it)")
    return {k: _absolutize(k, v) for k, v in fixed.items()}


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.results.groups import parse_cross
    from orchestrator.results.study import absolute_source
    from orchestrator.sweep.driver import run_sweep

    try:
        fixed = fixed_settings(args)
        cross = parse_cross(args.cross)
        objectives = [parse_objective(text) for text in args.objective]
        metric, mode = objectives[0] if objectives else (args.metric, args.mode)
        if objectives and (args.metric != "val_exact_match" or args.mode):
            raise ValueError("--objective sets the metric; drop --metric/--mode")
        flags = {f.name: getattr(args, f.name) for f in settings_flags()}
        flags.update(metric=metric, mode=mode, test_data=_absolutize("test_data", args.test_data))
        settings = SweepSettings(name=args.name or f"sweep-{utc_stamp()}", fixed=fixed, objectives=objectives,
                                 cross=cross, warm_start=[absolute_source(w) for w in args.warm_start],
                                 log_to=[absolute_tracker(t) for t in args.log_to],
                                 argv=" ".join(["mdsweep", *map(shlex.quote, sys.argv[1:])]), **flags)
        outcome = run_sweep(settings, quiet=args.quiet, dry_run=args.dry_run)
        print_outcome(outcome, args.quiet)
    except (ValueError, SweepError, ClusterError) as e:
        print(f"mdsweep run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mdsweep run: interrupted before the sweep started; nothing ran", file=sys.stderr)
        return EXIT_INTERRUPTED
    return exit_code(outcome)


def exit_code(outcome: Any) -> int:
    """0 for a sweep that finished with at least one usable trial; 3 when it was interrupted or when no
    trial ended ok (settings that cannot work must not look like success to a script); 143 when SIGTERM
    ended it (saved, resumable)."""
    if outcome.status == "dry-run":
        return 0
    if outcome.terminated:
        return EXIT_TERMINATED
    if outcome.status != "finished" or (outcome.counts and "ok" not in outcome.counts):
        return 3
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.sweep.driver import resume_sweep

    try:
        outcome = resume_sweep(args.name, args.storage, address=args.address, num_cpus=args.num_cpus,
                               num_gpus=args.num_gpus, resume_errored=args.resume_errored,
                               restart_errored=args.restart_errored, quiet=args.quiet)
        print_outcome(outcome, args.quiet)
    except (ValueError, SweepError, ClusterError) as e:
        print(f"mdsweep resume: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mdsweep resume: interrupted before the sweep restarted; run it again to continue {args.name}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return exit_code(outcome)


def print_outcome(outcome: SweepOutcome, quiet: bool) -> None:
    """The end of `run` and `resume`: the leaderboard, what the sweep found, where its results and report are,
    and how to go on when it did not finish. --quiet keeps a total failure and how to go on, on stderr."""
    from orchestrator.results.query import leaderboard

    if outcome.status == "dry-run":
        return
    s, counts = outcome.settings, outcome.counts
    if quiet and "ok" not in counts:  # a failure must be seen even when asked for quiet
        print(found_summary(outcome.rows, s).strip(), file=sys.stderr)
    if not quiet:
        print(f"\nLeaderboard of sweep {s.name} ({s.metric}, {s.mode}; outcomes: "
              + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")")
        print(leaderboard(s.results, s.name))
        print(found_summary(outcome.rows, s))
        print(f"\nresults: {s.results}  (mdsweep query {s.results} --sweep {s.name})")
        print(f"report:  {outcome.report}")
    if outcome.status != "finished":  # how to go on must be seen even when asked for quiet
        print(f"sweep {s.name} is {outcome.status}: continue it with `mdsweep resume {s.name} --storage {s.storage}`",
              file=sys.stderr if quiet else sys.stdout)


def found_summary(rows: list[dict[str, Any]], s: SweepSettings) -> str:
    """What the sweep found: the best trial with its interval, the spread, and how to take the model out."""
    from orchestrator.results.query import describe_versus_baseline, versus_baseline
    from orchestrator.results.schema import FAILED_OUTCOMES
    from orchestrator.results.store import read_partition

    best = best_trial(rows)
    if best is None:
        failed = [r for r in rows if r.get("outcome") in FAILED_OUTCOMES and r.get("error")]
        first = f"\nFirst failure, trial {failed[0]['trial_id']} ({failed[0]['outcome']}): " \
                f"{failed[0]['error'].strip().splitlines()[0]}" if failed else ""
        return "\nNo trial ended ok with a value of the objective: nothing to recommend." + first
    searched = list(best.get("searched") or [])
    scores = [r["objective"] for r in rows if r.get("outcome") == "ok" and r.get("objective") is not None]
    lines = [f"\nBest: trial {best['trial_id']}: {describe_trial(best, searched)}"]
    if best.get("test_n"):
        lines.append(f"  on held-out --test-data: {describe_test(best)}: the estimate to quote; "
                     f"the validation number chose it")
    if len(scores) > 1:
        lines.append(f"Spread over {len(scores)} ok trials: {min(scores):.3f} to {max(scores):.3f} "
                     f"({s.metric}); `mdsweep query {s.results} --sweep {s.name} --group-by ...` breaks it down")
    compared = versus_baseline(rows, read_partition(s.results, "predictions", s.name)) \
        if any(r.get("baseline") for r in rows) else None
    if compared is not None:
        lines.append(describe_versus_baseline(compared))
    lines.append(f"Its model: mdsweep export {s.results} --sweep {s.name} --best --out models/{s.name}-best")
    if len(s.objectives) > 1:
        lines.append(pareto_summary(rows, s))
    return "\n".join(lines)


def pareto_summary(rows: list[dict[str, Any]], s: SweepSettings) -> str:
    """A multi-objective sweep's answer: the trials no other trial beats on every objective."""
    front = pareto_front(rows, s.objectives)
    names = ", ".join(f"{m} ({mode})" for m, mode in s.objectives)
    lines = [f"Pareto front over {names}: {len(front)} of {sum(r.get('outcome') == 'ok' for r in rows)} ok trials"]
    for row in front:
        values = "  ".join(f"{m}={row[f'final_{m}']:.4g}" for m, _ in s.objectives)
        lines.append(f"  {row['trial_id']}: {values}  ({describe_trial(row, list(row.get('searched') or []))})")
    lines.append(f"The front as a table: mdsweep query {s.results} --sweep {s.name} --pareto")
    return "\n".join(lines)
