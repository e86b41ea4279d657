"""`mdsweep export`: a trial's fine-tuned model out of a sweep, ready for `mdsweep predict`.

The sweep keeps each trial's last checkpoint on --storage (the path is in the
trials table); the export lays its trained tensors over the trial's base model
and writes the official Moondream2 layout plus a JSON model card.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from orchestrator.cluster.trial_checkpoint import job_config_of, local_checkpoint
from orchestrator.results.ranking import TrialPickError, describe_trial, find_trial
from orchestrator.sweep.settings import SweepError
from trainer.model.layouts import CheckpointError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a trial's fine-tuned model (official layout + model card)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", metavar="RESULTS", help="the sweep's Parquet results directory (run --results)")
    parser.add_argument("--sweep", required=True, help="sweep name (run --name)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--best", action="store_true", help="the ok trial with the best objective")
    which.add_argument("--trial", metavar="ID", help="a trial id (the trial_id column)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model to")
    parser.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from orchestrator.results.store import ResultsError, read_partition

    def fail(message: str) -> int:
        print(f"mdsweep export: error: {message}", file=sys.stderr)
        return 2

    results = Path(args.results)
    if not results.is_dir():
        return fail(f"RESULTS {results}: no such results directory")
    try:
        row = find_trial(read_partition(results, "trials", args.sweep), args.sweep, trial_id=args.trial,
                         best=args.best)
        sweep_rows = read_partition(results, "sweeps", args.sweep)
    except (TrialPickError, ResultsError) as e:
        return fail(str(e))
    from trainer.export import export_checkpoint
    from orchestrator.results.schema import METRICS

    experiment_path = sweep_rows[0].get("experiment_path") if sweep_rows else None
    out: Path = args.out
    problem = out_problem(out, args.force, results, experiment_path)
    if problem:
        return fail(problem)
    config = job_config_of(row)
    card = {
        "sweep": args.sweep, "trial_id": row["trial_id"], "group_id": row.get("group_id"),
        "objective_metric": row.get("objective_metric"), "objective": row.get("objective"),
        "searched": row.get("searched"), "final_metrics": {m: row.get(f"final_{m}") for m in METRICS},
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": row.get("checkpoint_path"),
    }
    try:
        with local_checkpoint(row, experiment_path) as checkpoint:
            export_checkpoint(checkpoint, config, out, card, final_step=row.get("steps_completed"),
                              replace=args.force)
    except (FileNotFoundError, CheckpointError) as e:
        return fail(str(e))
    print(f"exported trial {row['trial_id']} of sweep {args.sweep}: {describe_trial(row, row.get('searched') or [])}")
    print(f"model: {out}  (mdsweep predict --model {out} --data PATH)")
    return 0


def out_problem(out: Path, force: bool, results: Path, experiment_path: str | None) -> str | None:
    """Why `out` cannot take an export, or None. An export never writes into the results or the sweep's storage,
    never replaces a directory that is or holds them, the working directory or the home directory, and with
    --force replaces only a previous export (recognised by its model card), file by file. (One that is or holds
    the trial's base model is refused once the model is known: trainer.export.refuse_overwriting_sources.)"""
    from orchestrator.sweep.checks import check_writable_directory
    from trainer.export import MODEL_CARD

    target = out.expanduser().resolve()
    if target.exists() and not target.is_dir():
        return f"--out {out} is a file; give a directory (new, empty, or a previous export with --force)"
    guarded = {"the results (RESULTS)": results.resolve(), "the working directory": Path.cwd().resolve(),
               "the home directory": Path.home().resolve()}
    if experiment_path and "://" not in experiment_path:
        guarded["the sweep's storage"] = Path(experiment_path).expanduser().resolve().parent
    for what, path in guarded.items():
        if target == path or path.is_relative_to(target):
            return f"--out {out} is or holds {what} ({path}); choose a directory of its own"
        if what in ("the results (RESULTS)", "the sweep's storage") and target.is_relative_to(path):
            return f"--out {out} lies inside {what} ({path}); choose a directory outside it"
    try:  # a file in the path, a read-only or full disk: one line before the checkpoint is read
        check_writable_directory("--out", str(out))
    except SweepError as e:
        return str(e)
    if target.is_dir() and any(target.iterdir()):
        if not force:
            return f"--out {out} already holds files; pass --force to replace a previous export there"
        if not (target / MODEL_CARD).is_file():
            return (f"--out {out} holds files but no previous export ({MODEL_CARD}); --force replaces only an "
                    "export: choose a new or empty directory")
    return None
