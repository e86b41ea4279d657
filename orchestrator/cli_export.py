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

from orchestrator.trial_checkpoint import job_config_of, local_checkpoint


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
    from orchestrator.sink import read_partition
    from orchestrator.trial_pick import TrialPickError, describe_trial, find_trial

    def fail(message: str) -> int:
        print(f"mdsweep export: error: {message}", file=sys.stderr)
        return 2

    results = Path(args.results)
    if not results.is_dir():
        return fail(f"RESULTS {results}: no such results directory")
    try:
        row = find_trial(read_partition(results, "trials", args.sweep), args.sweep, trial_id=args.trial,
                         best=args.best)
    except TrialPickError as e:
        return fail(str(e))
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        return fail(f"--out {out} already holds files; pass --force to replace them")

    from trainer.export import export_checkpoint
    from trainer.weights import CheckpointError
    from orchestrator.results_schema import METRICS

    sweep_rows = read_partition(results, "sweeps", args.sweep)
    experiment_path = sweep_rows[0].get("experiment_path") if sweep_rows else None
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
