"""Sweep overhead: what Ray Tune + Optuna + the Parquet sink add to each trial.

Runs the real sweep driver (`orchestrator.sweep.driver.run_sweep`: searcher, scheduler,
trainable, checkpoints, sink) on an embedded Ray, with a stand-in job that
sleeps a fixed time per optimizer step, reports every `eval_every` steps and
writes a small checkpoint each time, so that trial length is known exactly.
For short and long trials it prints:

- per-trial overhead: from sequential sweeps of 1 and n trials (wall = fixed +
  n x (job + per-trial)): everything a trial costs beyond its job (creation,
  suggestion, actor start-up, imports, checkpoint copies, reports, Parquet);
- per-sweep overhead: the fixed part (checks, Tuner set-up, state, leaderboard);
- the share of an n-trial sweep's wall time not spent in jobs, sequential and
  with several trials at once.

    python bench/sweep_overhead.py                 # short (2 s) and long (20 s) trials
    python bench/sweep_overhead.py --real          # also real tiny-model jobs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEP_S = 0.1  # the stand-in job's seconds per optimizer step


def sleep_job(config: Any, on_report: Optional[Callable] = None, checkpoint_dir: Optional[Path] = None,
              resume_from: Optional[Path] = None) -> Any:
    """A stand-in for trainer.job.run_job with a known duration: max_steps x STEP_S seconds."""
    from trainer.job_config import JobConfig, JobResult, Prediction

    assert isinstance(config, JobConfig)
    started = time.time()
    start = int((Path(resume_from) / "step").read_text()) if resume_from else 0
    total = config.max_steps or 10
    every = config.eval_every or total
    metrics: dict[str, Any] = {}
    for step in range(start + 1, total + 1):
        time.sleep(STEP_S)
        if step % every == 0 or step == total:
            metrics = {"step": step, "train_loss": 1.0 / step, "val_exact_match": step / total / 2,
                       "val_n": 4, "elapsed_s": time.time() - started}
            if checkpoint_dir is not None:
                Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
                (Path(checkpoint_dir) / "step").write_text(str(step))
                (Path(checkpoint_dir) / "weights.bin").write_bytes(b"\0" * 1_000_000)  # 1 MB to copy
            if on_report:
                on_report(dict(metrics), checkpoint_dir)
    preds = [Prediction(sample_id=str(i), target="1234", prediction="1234", correct=True, cer=0.0) for i in range(4)]
    return JobResult(outcome="ok", step=total, final_metrics=metrics, best_metrics=metrics, peak_memory_bytes=0,
                     predictions=preds, wall_time_s=time.time() - started)


def run_sweep_once(name: str, *, trials: int, concurrency: int, fixed: dict[str, Any], job_fn: str,
                   work: Path) -> tuple[float, list[dict[str, Any]]]:
    from orchestrator.results.store import read_partition
    from orchestrator.sweep.driver import run_sweep
    from orchestrator.sweep.settings import SweepSettings

    settings = SweepSettings(name=name, storage=str(work / "sweeps"), results=str(work / "results"), fixed=fixed,
                             space="smoke", num_samples=trials, max_concurrent=concurrency, cpus_per_trial=1,
                             gpus_per_trial=0, progress_interval=0, job_fn=job_fn)
    t0 = time.time()
    run_sweep(settings, quiet=True)
    wall = time.time() - t0
    rows = read_partition(work / "results", "trials", name)
    assert len(rows) == trials and all(r["outcome"] == "ok" for r in rows), [r["outcome"] for r in rows]
    return wall, rows


def measure(label: str, *, trials: int, concurrency: int, fixed: dict[str, Any], job_fn: str,
            work: Path) -> dict[str, Any]:
    """Sequential sweeps of 1 and `trials` trials give the per-trial and per-sweep costs
    (wall = fixed + n x (job + per_trial)); a third sweep runs `trials` at `concurrency`."""
    stamp = int(time.time())
    tag = label.split()[0]
    wall_1, rows_1 = run_sweep_once(f"b-{tag}-one-{stamp}", trials=1, concurrency=1, fixed=fixed, job_fn=job_fn,
                                    work=work)
    wall_n, rows_n = run_sweep_once(f"b-{tag}-seq-{stamp}", trials=trials, concurrency=1, fixed=fixed,
                                    job_fn=job_fn, work=work)
    job = statistics.mean(r["job_wall_time_s"] for r in rows_1 + rows_n)
    per_trial = (wall_n - wall_1) / (trials - 1) - job
    fixed_s = wall_1 - job - per_trial
    wall_c, rows_c = run_sweep_once(f"b-{tag}-par-{stamp}", trials=trials, concurrency=concurrency, fixed=fixed,
                                    job_fn=job_fn, work=work)
    ideal_c = trials * statistics.mean(r["job_wall_time_s"] for r in rows_c) / concurrency
    return {
        "case": label, "job_s": job, "per_trial_s": per_trial, "per_trial_pct": 100 * per_trial / job,
        "fixed_s": fixed_s, "seq_n": trials, "seq_s": wall_n, "seq_ovh_pct": 100 * (wall_n - trials * job) / wall_n,
        "conc": concurrency, "par_s": wall_c, "par_ideal_s": ideal_c, "par_ovh_pct": 100 * (wall_c - ideal_c) / wall_c,
    }


def print_table(rows: list[dict[str, Any]], ray_start_s: float) -> None:
    cols = [("case", "case", "{}"), ("job_s", "job s", "{:.1f}"), ("per_trial_s", "per-trial ovh s", "{:.2f}"),
            ("per_trial_pct", "% of job", "{:.0f}"), ("fixed_s", "per-sweep ovh s", "{:.1f}"),
            ("seq_n", "n", "{}"), ("seq_s", "n seq s", "{:.1f}"), ("seq_ovh_pct", "seq ovh %", "{:.0f}"),
            ("conc", "conc", "{}"), ("par_s", "n par s", "{:.1f}"), ("par_ideal_s", "ideal s", "{:.1f}"),
            ("par_ovh_pct", "par ovh %", "{:.0f}")]
    cells = [[fmt.format(r[k]) for k, _h, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_k, h, _f) in enumerate(cols)]
    print()
    print("  ".join(h.rjust(w) for (_k, h, _f), w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    print(f"""
job s            the job's own time per trial (inside run_job)
per-trial ovh s  each extra trial's cost beyond its job: trial creation, Optuna suggestion, actor
                 start-up and imports, checkpoint copies to storage, reports, Parquet writes
per-sweep ovh s  once per sweep: space check, Tuner set-up, experiment state, leaderboard
                 (Ray start, {ray_start_s:.1f} s here, comes on top for an embedded Ray)
seq ovh %        share of an n-trial sequential sweep's wall time not spent in jobs
par ovh %        the same with `conc` trials at once, against n x job / conc""")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="trials per sweep, at least 2 (default 4)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once in the parallel sweep (default 2)")
    p.add_argument("--short-steps", type=int, default=20, help="steps of a short trial (x 0.1 s; default 20)")
    p.add_argument("--long-steps", type=int, default=200, help="steps of a long trial (x 0.1 s; default 200)")
    p.add_argument("--real", action="store_true", help="also run real tiny-model jobs (trainer.job.run_job)")
    p.add_argument("--train-data", default=None, help="captcha Parquet for --real (default: synthesize 96)")
    args = p.parse_args(argv)
    if args.trials < 2:
        p.error("--trials must be at least 2")

    import ray

    work = Path(tempfile.mkdtemp(prefix="mdsweep-bench-"))
    t0 = time.time()
    ray.init(address="local", num_cpus=max(2, args.concurrency), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray_start = time.time() - t0
    try:
        data = args.train_data or str(work / "unused.parquet")
        if not args.train_data:
            Path(data).touch()  # the stand-in job never reads it, but the sweep checks that it is there
        rows = []
        for label, steps in (("short", args.short_steps), ("long", args.long_steps)):
            fixed = {"train_data": data, "max_steps": steps, "eval_every": max(1, steps // 4)}
            rows.append(measure(f"{label} ({steps * STEP_S:g} s stand-in)", trials=args.trials,
                                concurrency=args.concurrency, fixed=fixed, job_fn="bench.sweep_overhead:sleep_job",
                                work=work))
            print(f"done: {rows[-1]['case']}", file=sys.stderr)
        if args.real:
            if not args.train_data:
                from trainer.data.synth import synthesize

                data = str(synthesize(96, work / "train.parquet", length=4, seed=0))
            fixed = {"train_data": data, "max_steps": 8, "eval_every": 4, "batch_size": 2, "max_val_samples": 4,
                     "max_new_tokens": 5}
            rows.append(measure("real (tiny, 8 steps)", trials=args.trials, concurrency=args.concurrency, fixed=fixed,
                                job_fn="trainer.job:run_job", work=work))
        print_table(rows, ray_start)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
