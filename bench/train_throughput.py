"""Training throughput and peak memory of the real job loop, per attention mode and precision.

    python bench/train_throughput.py --config tiny --steps 30

Runs `trainer.job.run_job` on synthetic 4-digit captchas in a fresh process per
row and reports the median samples/s and tokens/s over the steps after the first
few (warm-up), and the job's peak memory (GPU allocator on CUDA, process RSS on CPU).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

from isolated import run_row, serve_row, worker_flag

WARMUP_STEPS = 3


def measure(spec: dict) -> dict:
    import torch

    from trainer.job import run_job
    from trainer.job_config import JobConfig

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    steps: list[dict] = []
    result = run_job(JobConfig(model=spec["config"], train_data=spec["data"], val_fraction=0.05,
                               max_val_samples=8, batch_size=spec["batch_size"], max_steps=spec["steps"],
                               attention=spec["mode"], precision=spec["precision"], train_scope=spec["scope"],
                               device=spec["device"], lr=1e-4), on_step=steps.append)
    timed = steps[WARMUP_STEPS:] or steps
    return {"outcome": result.outcome, "samples_per_s": statistics.median(s["samples_per_s"] for s in timed),
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
            "peak_bytes": result.peak_memory_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="model preset")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per row")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--scope", default="all", help="train scope")
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp16 bf16 fp32 on CUDA, fp32 bf16 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    worker_flag(parser)
    args = parser.parse_args()
    if serve_row(args, measure):
        return

    import torch

    from trainer.data.synth import synthesize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precisions = args.precisions or (["fp16", "bf16", "fp32"] if device == "cuda" else ["fp32", "bf16"])
    with tempfile.TemporaryDirectory() as tmp:
        data = str(synthesize(max(200, args.batch_size * 20), Path(tmp) / "captchas.parquet", length=4, seed=0))
        print(f"config={args.config} device={device} batch={args.batch_size} steps={args.steps} scope={args.scope}")
        header = f"{'mode':>7} {'precision':>9} {'samples/s':>10} {'tokens/s':>10} {'peak MiB':>10} {'outcome':>8}"
        print(header)
        print("-" * len(header))
        for mode, precision in itertools.product(("causal", "prefix"), precisions):
            spec = dict(config=args.config, data=data, batch_size=args.batch_size, steps=args.steps, mode=mode,
                        precision=precision, scope=args.scope, device=device, threads=args.threads)
            r = run_row(__file__, spec)
            if isinstance(r, str):
                print(f"{mode:>7} {precision:>9}  failed: {r}")
                continue
            print(f"{mode:>7} {precision:>9} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} "
                  f"{r['peak_bytes'] / 2**20:>10.1f} {r['outcome']:>8}", flush=True)


if __name__ == "__main__":
    main()
