"""The GPU check: real-size Moondream2 (fresh weights) training steps, measured peak memory against the memory
model's prediction, per batch size, attention mode, backend, optimizer, scope and precision; then four capped
jobs sharing one GPU; then, where the machine has 2 GPUs, the full fine-tune on 1 and 2 workers (DDP, FSDP).

Each case runs in its own process (clean CUDA context and peak statistics) through the trainer's own
`run_job`: three optimizer steps and an evaluation on a few synthetic captchas. Each row also says how well the
step used the GPU (achieved TFLOP/s and MFU, the trainer's own columns) and which attention kernel ran.

    python bench/gpu_check.py              # on a CUDA machine: about 5 minutes on one H100
    python bench/gpu_check.py --official DIR   # then bench/versus_official.py's real-size rows on the GPU
    python bench/gpu_check.py --dry-run    # anywhere: the tiny model on CPU, checks the script itself

It exits non-zero when a case fails or a measured peak is off its prediction by more than 1.3x either way.

Copy the printed table into bench/RESULTS.md with the device and the date.
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.job_config import JobConfig  # noqa: E402
from trainer.memory.estimate import GIB, estimate_memory  # noqa: E402

LEAN = dict(train_scope="text", optimizer="adamw8bit")
CASES: list[tuple[str, dict[str, Any]]] = [
    ("lean b1 causal", dict(LEAN, batch_size=1, attention="causal")),
    ("lean b1 prefix", dict(LEAN, batch_size=1, attention="prefix")),
    ("lean b8 causal", dict(LEAN, batch_size=8, attention="causal")),
    ("lean b8 prefix", dict(LEAN, batch_size=8, attention="prefix")),
    ("lean b8 prefix eager-4d", dict(LEAN, batch_size=8, attention="prefix", attention_backend="eager-4d")),
    ("lean b8 prefix flex", dict(LEAN, batch_size=8, attention="prefix", attention_backend="flex")),
    ("lean b8 no checkpointing", dict(LEAN, batch_size=8, gradient_checkpointing=False)),
    ("adamw b8", dict(train_scope="text", optimizer="adamw", batch_size=8)),
    ("adamw-fused b8", dict(train_scope="text", optimizer="adamw-fused", batch_size=8)),
    ("fp16 weights + 8-bit b8", dict(LEAN, batch_size=8, trained_dtype="fp16")),
    ("lora b8", dict(train_scope="lora", optimizer="adamw", batch_size=8)),
    ("lean b8 bf16", dict(LEAN, batch_size=8, precision="bf16")),
]
# the dry run checks the script, not memory: one case per code path, no flex (no backward on CPU)
DRY_RUN_CASES = ("lean b8 prefix", "lean b8 prefix eager-4d", "fp16 weights + 8-bit b8", "lora b8")
MULTI_GPU_ROWS = ((1, "ddp"), (2, "ddp"), (2, "fsdp"))  # (workers, parallel)
# likewise one 2-worker row: DDP against FSDP on gloo is tests/test_parallel_training.py's
DRY_RUN_MULTI_GPU_ROWS = ((1, "ddp"), (2, "fsdp"))
SHARED = 4  # jobs sharing one GPU in the check after the cases
# the multi-GPU section's job: the full fine-tune no 24 GiB card holds alone (docs/memory.md), on 1 and 2 workers
MULTI_GPU_CASE = dict(train_scope="all", optimizer="adamw", batch_size=8)
TOLERANCE = 1.3  # measured / predicted peak beyond this (either way) fails the check
MARGIN = 1.15  # cap = prediction x this, for the shared jobs


def job_config(case: dict[str, Any], data: Path, dry_run: bool, **extra: Any) -> JobConfig:
    base = dict(model="tiny" if dry_run else "moondream2", train_data=str(data), val_fraction=0.25,
                max_steps=3, eval_every=3, max_val_samples=8, max_new_tokens=8, lr=1e-5)
    if dry_run:
        base["device"] = "cpu"
    return JobConfig(**{**base, **case, **extra})


def run_one(config: dict[str, Any], workers: int = 1) -> None:
    """Child process: one job, on `workers` Ray Train workers when more than one (mdsweep train's path), one JSON
    line. The peak is rank 0's."""
    from orchestrator.cluster.train_workers import run_job_on_workers
    from trainer.job import run_job

    steps: list[dict[str, Any]] = []
    started = time.time()
    job = run_job if workers == 1 else functools.partial(run_job_on_workers, workers)
    result = job(JobConfig(**config), on_step=steps.append)
    last = steps[-1] if steps else {}
    print(json.dumps({"outcome": result.outcome, "error": result.error, "peak": result.peak_memory_bytes,
                      **{k: last.get(k) for k in ("samples_per_s", "achieved_tflops", "mfu")},
                      "scaler_skipped": last.get("scaler_skipped_steps"), "kernel": result.hardware.get(
                          "attention_kernel"), "seconds": time.time() - started}))


def launch(config: JobConfig, workers: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--one", json.dumps(config.to_dict()), "--workers",
                             str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return {"outcome": "timeout"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        return {"outcome": "crash", "error": (err.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def gib(value: Any) -> str:
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) and value else "-"


def multi_gpu_section(data: Path, dry_run: bool, timeout_s: float) -> int:
    """The full fine-tune of MULTI_GPU_CASE on 1 worker, then on 2 with each strategy: throughput, and rank 0's
    peak against the per-rank prediction (FSDP's is the one that must fall). Needs 2 GPUs; the dry run uses 2 CPU
    workers over gloo, FSDP only. Returns the failures: a job not ok, or a peak off its prediction beyond TOLERANCE."""
    import torch

    if not dry_run and torch.cuda.device_count() < 2:
        print(f"\nmulti-GPU section skipped: it needs 2 GPUs, this machine has {torch.cuda.device_count()}",
              flush=True)
        return 0
    print(f"\n{'workers (full fine-tune, fp32 AdamW)':<40} {'predicted GiB':>13} {'rank 0 GiB':>10} "
          f"{'samples/s':>9} {'speed-up':>8} {'outcome':>8}", flush=True)
    failures, alone = 0, None
    for workers, parallel in DRY_RUN_MULTI_GPU_ROWS if dry_run else MULTI_GPU_ROWS:
        config = job_config(dict(MULTI_GPU_CASE, parallel=parallel), data, dry_run)
        predicted = estimate_memory(config, workers=workers).allocator_peak  # one rank's
        row = collect(launch(config, workers), timeout_s * 2)
        speed, peak = row.get("samples_per_s"), row.get("peak")
        alone = speed if workers == 1 else alone
        off = bool(peak) and not dry_run and not 1 / TOLERANCE <= peak / predicted <= TOLERANCE
        failures += row["outcome"] != "ok" or off
        label = "1 worker" if workers == 1 else f"{workers} workers, {parallel}"
        print(f"{label:<40} {gib(predicted):>13} {gib(peak) + ('!' if off else ''):>10} {number(speed, 1):>9} "
              f"{number(speed / alone if speed and alone else None, 2):>8} {row['outcome']:>8}"
              + (f"   {row.get('error')}" if row["outcome"] != "ok" else ""), flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU: check the script, not a GPU")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per case (default 150)")
    parser.add_argument("--official", metavar="DIR", help="also run bench/versus_official.py at real size on the "
                        "GPU against this checkout of the official repository (see that script)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(json.loads(args.one), args.workers)
        return 0

    from trainer.data.synth import synthesize

    data = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "captchas.parquet"
    synthesize(64, data, length=6, seed=0)
    what = "measured: CPU peak RSS (dry run: not comparable)" if args.dry_run else "measured: max_memory_allocated"
    print(f"{'case':<28} {'predicted GiB':>13} {'measured GiB':>12} {'ratio':>6} {'samples/s':>9} {'TFLOP/s':>8} "
          f"{'MFU %':>6} {'kernel':>9} {'outcome':>8}   ({what})")
    failures = 0
    for label, case in CASES:
        if args.dry_run and label not in DRY_RUN_CASES:
            continue
        config = job_config(case, data, args.dry_run)
        predicted = estimate_memory(config).allocator_peak
        row = collect(launch(config), args.timeout)
        peak = row.get("peak")
        off = bool(peak) and not args.dry_run and not 1 / TOLERANCE <= peak / predicted <= TOLERANCE
        ratio = f"{peak / predicted:.2f}{'!' if off else ''}" if peak and not args.dry_run else "-"
        failures += row["outcome"] != "ok" or off
        print(f"{label:<28} {gib(predicted):>13} {gib(peak):>12} {ratio:>6} {number(row.get('samples_per_s'), 1):>9} "
              f"{number(row.get('achieved_tflops'), 3):>8} {number(100 * row['mfu'] if row.get('mfu') else None, 1):>6} "
              f"{row.get('kernel') or '-':>9} {row['outcome']:>8}"
              + (f"   {row.get('error')}" if row["outcome"] != "ok" else ""), flush=True)

    # four jobs on one GPU, each capped at its prediction plus a margin: all must end ok
    config = job_config(dict(LEAN, batch_size=8), data, args.dry_run)
    cap = int(estimate_memory(config).allocator_peak * MARGIN)
    shared = [launch(job_config(dict(LEAN, batch_size=8), data, args.dry_run, seed=i,
                                max_gpu_memory=None if args.dry_run else str(cap)))
              for i in range(2 if args.dry_run else SHARED)]
    rows = [collect(p, args.timeout * 2) for p in shared]
    outcomes = [r["outcome"] for r in rows]
    failures += sum(o != "ok" for o in outcomes)
    print(f"\n{len(shared)} lean b8 jobs sharing the GPU, each capped at {gib(cap)} GiB: outcomes {outcomes}, "
          f"peaks {[gib(r.get('peak')) for r in rows]} GiB", flush=True)
    failures += multi_gpu_section(data, args.dry_run, args.timeout)
    if args.official:
        print("\nAgainst the official fine-tune (bench/versus_official.py):", flush=True)
        failures += subprocess.run([sys.executable, str(Path(__file__).with_name("versus_official.py")),
                                    "--official", args.official, "--repeats", "2",
                                    "--preset", "small" if args.dry_run else "moondream2",
                                    "--device", "cpu" if args.dry_run else "cuda"]).returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
