"""`mdsweep train`: one fine-tuning job, with a progress bar and files you can query; no Ray unless it runs on
several workers (--workers-per-trial N: Ray Train on an embedded Ray of its own, ended with the command).

Output directory:
  result.json          outcome, config, final and best metrics, the tokenizer used
  steps.parquet        one row per optimizer step
  reports.parquet      one row per evaluation
(both written as the job goes; --resume keeps the rows up to the checkpoint and adds the rest once)
  predictions.parquet  the last evaluation, one row per validation sample
  checkpoint/          the latest checkpoint (`--resume` continues from it)
  ray.log              Ray's own log lines, with --workers-per-trial N > 1

With --test-data, the final model is tested once on that held-out set; its test_*
numbers are printed and written to result.json (test_metrics).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.cli.job_flags import add_job_arguments, job_overrides
from orchestrator.cluster.signals import EXIT_INTERRUPTED
from orchestrator.cluster.train_workers import WorkersFailed, run_job_on_workers
from orchestrator.results.ranking import describe_test
from orchestrator.sweep.settings import SweepError, positive_int
from orchestrator.tracking.trackers import LOG_TO_HELP, TRAIN_GROUP, TrackerError, parse_trackers, train_run_id
from trainer.budget import worker_split_problem
from trainer.files import atomic_path
from trainer.job_config import JobConfig
from trainer.model.layouts import CheckpointError

EXIT_FAILED_OUTCOME = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="run one fine-tuning job (no Ray on one worker)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: runs/train-YYYYmmdd-HHMMSS)")
    parser.add_argument("--log-to", action="append", default=[], metavar="TRACKER[=WHERE]",
                        help=LOG_TO_HELP.replace("each trial as one run, named SWEEP/TRIAL,", f"the job as one "
                                                 f"run, named {TRAIN_GROUP}/OUT-CHECKSUM,").replace(
                                                 "a resumed trial", "--resume").replace("DIR/SWEEP/TRIAL",
                                                                                        f"DIR/{TRAIN_GROUP}/OUT-CHECKSUM"))
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint if it exists (same flags as the interrupted run)")
    parser.add_argument("--test-data", default=None, metavar="PATH",
                        help="held-out test set (same formats as --train-data): the final model is tested on it "
                             "once, when the job ends ok; it never steers training")
    parser.add_argument("--workers-per-trial", type=positive_int, default=1, metavar="N",
                        help="train on N data-parallel workers (--set parallel=...), started by Ray Train "
                             "on an embedded Ray of this command's own; --batch-size stays the samples of one "
                             "micro-step summed over the workers, so the job trains on the samples of one worker "
                             "and gives its losses. Each worker takes one of this machine's GPUs (NCCL) where it "
                             "has CUDA GPUs, else a CPU (gloo). 1 (default): in this process, without Ray")
    add_job_arguments(parser.add_argument_group("job settings"))
    parser.set_defaults(func=run_train)


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Atomic: readers see the previous file or the new one, never a torn one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def write_rows(rows: dict[int, dict[str, Any]], path: Path) -> None:
    write_parquet([rows[step] for step in sorted(rows)], path)


def read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """A steps or reports file of an earlier run of this --out, by step; none when it is missing."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return {}
    return {row["step"]: row for row in pq.read_table(path).to_pylist()}


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from orchestrator.sweep.checks import check_writable_directory
    from trainer.checkpoint import TrainState
    from trainer.data.dataset import DataError
    from trainer.job import run_job

    overrides = job_overrides(args)
    if not overrides.get("train_data"):
        print("mdsweep train: error: --train-data is required", file=sys.stderr)
        return 2
    try:
        config = JobConfig.from_dict(overrides)
    except ValueError as exc:
        print(f"mdsweep train: error: {exc}", file=sys.stderr)
        return 2
    split_problem = worker_split_problem(config.batch_size, args.workers_per_trial,
                                         names=("--batch-size", "--workers-per-trial"))
    if split_problem:
        print(f"mdsweep train: error: {split_problem}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    try:
        for flag, value in (("--out", str(out)), ("--cache-dir", config.cache_dir),
                            ("--save-model", config.save_model)):
            if value:
                check_writable_directory(flag, value)
        trackers = parse_trackers(args.log_to)
        for tracker in trackers:
            if (folder := tracker.local_folder()) is not None:
                check_writable_directory("--log-to", folder)
    except (SweepError, TrackerError) as exc:
        print(f"mdsweep train: error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    resume_from = checkpoint if args.resume and TrainState.exists(checkpoint) else None
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    # rows by step, on disk as the job goes: a step's row is written before the checkpoint that follows it, so a
    # crash keeps every row up to the checkpoint, and a resumed run (which starts after it) adds the rest once
    steps = read_rows(out / "steps.parquet") if resume_from else {}
    reports = read_rows(out / "reports.parquet") if resume_from else {}
    bar = tqdm(total=config.max_steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    run_id, settings = train_run_id(out), config.to_dict()
    mirrors = [t.runs(TRAIN_GROUP, "val_exact_match") for t in trackers]
    for mirror in mirrors:
        mirror.prepare()
        mirror.start(run_id, settings)

    def on_resume(step: int, report: dict[str, Any]) -> None:
        for rows in (steps, reports):
            for later in [s for s in rows if s > step]:  # run again from the checkpoint
                del rows[later]
        if report and step not in reports:  # made, but the crash came before it was written
            reports[step] = report
        write_rows(steps, out / "steps.parquet")
        write_rows(reports, out / "reports.parquet")
        bar.update(step - bar.n)

    def on_step(metrics: dict[str, Any]) -> None:
        steps[metrics["step"]] = metrics
        write_rows(steps, out / "steps.parquet")
        bar.total = metrics["total_steps"]
        bar.update(metrics["step"] - bar.n)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", sps=f"{metrics['samples_per_s']:.0f}")

    def on_report(metrics: dict[str, Any], _checkpoint: Path | None) -> None:
        reports[metrics["step"]] = metrics
        write_rows(reports, out / "reports.parquet")
        for mirror in mirrors:  # written before training goes on: a crash after it loses no evaluation there
            mirror.log(run_id, settings, metrics)
            mirror.flush()
        bar.write(f"step {metrics['step']}: val exact match {metrics['val_exact_match']:.3f} "
                  f"[{metrics['val_exact_match_low']:.3f}, {metrics['val_exact_match_high']:.3f}] "
                  f"CER {metrics['val_cer']:.3f} (n={metrics['val_n']})")

    job = run_job if args.workers_per_trial == 1 else functools.partial(
        run_job_on_workers, args.workers_per_trial, ray_log_file=out / "ray.log")
    try:
        result = job(config, on_report=on_report, checkpoint_dir=checkpoint, resume_from=resume_from,
                     on_step=on_step, test_data=args.test_data, on_resume=on_resume)
    except (DataError, CheckpointError, ValueError, FileNotFoundError, WorkersFailed) as exc:
        bar.close()
        for mirror in mirrors:
            mirror.end(run_id, settings, "error")
            mirror.shutdown()
        print(f"mdsweep train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bar.close()
        for mirror in mirrors:  # the runs stay open: --resume goes on in them
            mirror.shutdown()
        saved = (f"the last checkpoint is at step {max(reports)} ({checkpoint}): add --resume to the same command "
                 "to continue from it" if reports else "no checkpoint was written yet (the first comes with the "
                 "first evaluation)")
        print(f"mdsweep train: interrupted at step {max(steps, default=0)}; {saved}", file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()
    for mirror in mirrors:
        mirror.end(run_id, settings, result.outcome)
        mirror.shutdown()
    if result.predictions:
        write_parquet([dataclasses.asdict(p) for p in result.predictions], out / "predictions.parquet")
    summary = {"outcome": result.outcome, "step": result.step, "error": result.error,
               "wall_time_s": result.wall_time_s, "peak_memory_bytes": result.peak_memory_bytes,
               "final_metrics": result.final_metrics, "best_metrics": result.best_metrics,
               "test_metrics": result.test_metrics, "test_data": args.test_data, "tokenizer": result.tokenizer,
               "config": config.to_dict()}
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    print(f"{result.outcome}: {result.step} steps in {result.wall_time_s:.0f}s; "
          f"val exact match {result.final_metrics.get('val_exact_match', float('nan')):.3f}; results in {out}")
    if result.test_metrics:
        print(f"held-out test ({args.test_data}): {describe_test(result.test_metrics)}")
    if result.error:
        print(result.error, file=sys.stderr)
    return 0 if result.outcome == "ok" else EXIT_FAILED_OUTCOME
