"""`mdsweep run` and `mdsweep resume`."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from orchestrator.job_flags import add_job_arguments, job_overrides

# JobConfig fields with their own flag on `mdsweep run` (help texts come from JobConfig);
# every other field is reachable through --set
JOB_FLAG_FIELDS = ("model", "train_data", "val_data", "max_val_samples", "max_samples", "max_steps", "epochs",
                   "batch_size", "eval_every_samples", "eval_every", "seed", "device")
PATH_FIELDS = ("train_data", "val_data", "model")


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--address", default=None,
                   help="Ray cluster to attach to: auto (a `ray start --head` on this machine), host:port (the "
                        "head's GCS port) or ray://host:port (Ray Client). Default: $RAY_ADDRESS if set, else an "
                        "embedded Ray on this machine")
    g.add_argument("--storage", default="./sweeps",
                   help="where Ray Tune keeps experiment state and checkpoints (default ./sweeps). Multi-node "
                        "clusters need shared storage: an NFS path mounted identically on every node, or "
                        "s3://..., gs://...")
    g.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="logical CPUs of the embedded Ray (default: all); not with --address")
    g.add_argument("--num-gpus", type=int, default=None,
                   help="logical GPUs of the embedded Ray (default: detected); not with --address")
    g.add_argument("--quiet", action="store_true", help="no progress table or leaderboard")


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run", help="run a hyperparameter sweep (Ray Tune + Optuna); results land in Parquet",
        description="Run a sweep: Optuna TPE proposes JobConfig settings from a search space, Ray Tune runs one "
                    "fine-tuning job per trial where its resources fit, results are written to Parquet as the "
                    "sweep goes. Fixed settings (flags, --set) are the same for every trial.")
    run.add_argument("--name", default=None,
                     help="sweep name: the experiment folder in --storage and the sweep=NAME partition in "
                          "--results (default: sweep-YYYYmmdd-HHMMSS)")
    run.add_argument("--results", default="./results", help="Parquet results dataset directory (default ./results)")
    add_cluster_flags(run)
    g = run.add_argument_group("search")
    g.add_argument("--space", default="captcha",
                   help="search space: a module of search_spaces/ (captcha, captcha:paired, captcha_wide), "
                        "package.module:function, or path/to/file.py:function; an Optuna define-by-run "
                        "function returning a dict of JobConfig fields (default captcha)")
    g.add_argument("--num-samples", type=_positive_int, default=8,
                   help="how many configurations Optuna proposes (each runs --replicates x --cross times; default 8)")
    g.add_argument("--max-concurrent", type=_positive_int, default=None,
                   help="at most this many trials at once (default: as many as the resources allow)")
    g.add_argument("--search-seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    g.add_argument("--metric", default="val_exact_match",
                   help="metric to optimise, as reported at each evaluation (default val_exact_match)")
    g.add_argument("--mode", choices=("max", "min"), default=None,
                   help="max or min (default: max, min for losses and error rates such as val_cer)")
    g.add_argument("--objective", action="append", default=[], metavar="METRIC[:max|min]",
                   help="an objective; give two or more (e.g. --objective val_exact_match:max --objective "
                        "peak_memory_bytes:min) for a multi-objective search of their Pareto front, printed at "
                        "the end and by `mdsweep query --pareto`; the first one acts as --metric")
    g.add_argument("--replicates", type=_positive_int, default=1,
                   help="run every proposal with K seeds (seed, seed+1, ...): the seed as a replicate factor; "
                        "Optuna learns from the mean (default 1)")
    g.add_argument("--cross", action="append", default=[], metavar="FIELD[=V1,V2]",
                   help="run every proposal once per value of FIELD (default values: all choices of a Literal "
                        "field, e.g. --cross attention), so the values are compared paired on identical "
                        "settings; the space must not search FIELD; repeatable")
    g.add_argument("--early-stop", choices=("none", "asha"), default="none",
                   help="early stopping on --metric: asha (asynchronous successive halving) or none (default)")
    g.add_argument("--asha-grace", type=_positive_int, default=None,
                   help="ASHA: samples (with --max-samples) or steps (with --max-steps) a trial runs before it "
                        "can be stopped (default: the trial length / 8)")
    g.add_argument("--asha-reduction-factor", type=float, default=3.0,
                   help="ASHA: keep the best 1/F at each rung (default 3)")
    g = run.add_argument_group("job settings (fixed: the same for every trial)")
    add_job_arguments(g, include=JOB_FLAG_FIELDS)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                   help="any other JobConfig field, parsed by its type (e.g. --set attention=causal "
                        "--set train_scope=text --set max_gpu_memory=none); repeatable")
    g = run.add_argument_group("resources per trial")
    g.add_argument("--cpus-per-trial", type=_nonneg_float, default=None, help="CPUs per trial (default 1)")
    g.add_argument("--gpus-per-trial", type=_nonneg_float, default=None,
                   help="GPUs per trial; a fraction packs trials on one GPU (0.25: four per GPU) and caps each "
                        "trial's allocator at that fraction (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--gpu-memory-per-trial", default=None, metavar="SIZE",
                   help="GPU memory per trial, e.g. 16GiB: sets the GPU fraction Ray schedules by (from the GPU "
                        "memory of the cluster's nodes) and the job's allocator cap (max_gpu_memory)")
    g.add_argument("--node-gpu-memory", default=None, metavar="SIZE",
                   help="memory of one GPU in the cluster, e.g. 80GiB, for --gpu-memory-per-trial (default: "
                        "measured with nvidia-smi on each GPU node); needed for logical GPUs")
    g.add_argument("--memory-per-trial", default=None, metavar="SIZE",
                   help="host RAM per trial (Ray's memory resource, admission control), e.g. 24GiB")
    g.add_argument("--skip-fit-check", action="store_true",
                   help="do not fail when no current node can hold a trial (autoscaling clusters)")
    g = run.add_argument_group("failures and output")
    g.add_argument("--max-failures", type=int, default=2,
                   help="retries of a trial lost to a worker or node failure, from its last checkpoint "
                        "(default 2); oom, diverged and error outcomes are never retried")
    g.add_argument("--progress-interval", type=_nonneg_float, default=15.0,
                   help="seconds between progress tables (0: none; default 15)")
    g.add_argument("--worker-logs", action="store_true", help="forward the trials' stdout/stderr to this terminal")
    g.add_argument("--dry-run", action="store_true",
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
    from orchestrator.job_values import parse_assignments

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
    from orchestrator.cluster import ClusterError
    from orchestrator.objectives import parse_objective
    from orchestrator.groups import parse_cross
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_settings import SweepError, SweepSettings, utc_stamp

    try:
        fixed = fixed_settings(args)
        cross = parse_cross(args.cross)
        objectives = [parse_objective(text) for text in args.objective]
        metric, mode = objectives[0] if objectives else (args.metric, args.mode)
        if objectives and (args.metric != "val_exact_match" or args.mode):
            raise ValueError("--objective sets the metric; drop --metric/--mode")
        settings = SweepSettings(
            name=args.name or f"sweep-{utc_stamp()}", storage=args.storage, results=args.results, fixed=fixed,
            space=args.space, metric=metric, mode=mode, objectives=objectives, num_samples=args.num_samples,
            replicates=args.replicates, cross=cross, search_seed=args.search_seed,
            max_concurrent=args.max_concurrent, early_stop=args.early_stop, asha_grace=args.asha_grace,
            asha_reduction_factor=args.asha_reduction_factor, max_failures=args.max_failures,
            cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
            gpu_memory_per_trial=args.gpu_memory_per_trial, memory_per_trial=args.memory_per_trial,
            node_gpu_memory=args.node_gpu_memory, skip_fit_check=args.skip_fit_check, address=args.address,
            num_cpus=args.num_cpus, num_gpus=args.num_gpus, progress_interval=args.progress_interval,
            worker_logs=args.worker_logs,
            argv=" ".join(shlex.quote(a) for a in sys.argv))
        outcome = run_sweep(settings, quiet=args.quiet, dry_run=args.dry_run)
    except (ValueError, SweepError, ClusterError) as e:
        print(f"mdsweep run: error: {e}", file=sys.stderr)
        return 2
    return exit_code(outcome)


def exit_code(outcome: Any) -> int:
    """0 for a sweep that finished with at least one usable trial; 3 when it was interrupted or when no
    trial ended ok (settings that cannot work must not look like success to a script)."""
    if outcome.status == "dry-run":
        return 0
    if outcome.status != "finished" or (outcome.counts and "ok" not in outcome.counts):
        return 3
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.cluster import ClusterError
    from orchestrator.sweep import resume_sweep
    from orchestrator.sweep_settings import SweepError

    try:
        outcome = resume_sweep(args.name, args.storage, address=args.address, num_cpus=args.num_cpus,
                               num_gpus=args.num_gpus, resume_errored=args.resume_errored,
                               restart_errored=args.restart_errored, quiet=args.quiet)
    except (ValueError, SweepError, ClusterError) as e:
        print(f"mdsweep resume: error: {e}", file=sys.stderr)
        return 2
    return exit_code(outcome)
