"""Does a small config learn to read captchas from scratch on 2 CPU cores, and how fast?

    python bench/demo_learning.py                      # the recipe: ~10 min on 2 cores
    python bench/demo_learning.py --steps 300 --eval-every 100   # a quick look

Synthesizes seeded captchas with `trainer.data.synth.synthesize`, trains the `tiny` preset
from random weights with `trainer.job.run_job`, and prints (elapsed s, step, train
loss, val exact match, val CER) at every evaluation, then the final numbers. Elapsed
time counts from the start of data synthesis, so it includes data generation,
preprocessing (cropping, tokenising) and evaluation.

The recipe. Trained on 4-digit captchas only, this model (and larger or
higher-resolution variants) sits at the no-image loss plateau (answer loss 1.54 =
4·ln10/6: uniform digits) for thousands of steps: the randomly initialised vision
tower gives the decoder nothing to read and the decoder gives it no useful gradient.
Mixing in 1-, 2- and 3-digit captchas breaks that: a lone digit is a 10-way
classification the whole image answers, so the vision tower learns digit features
first and the decoder then learns where to look for each position. Validation stays
on 4-digit captchas only.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

# training data: (captcha length, samples); validation: 4-digit captchas
TRAIN_MIX = ((1, 3000), (2, 3000), (3, 3000), (4, 6000))
VAL_SAMPLES = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="processes rendering captchas")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    args = parser.parse_args()

    import torch

    from trainer.job import run_job
    from trainer.job_config import JobConfig
    from trainer.data.synth import synthesize

    torch.set_num_threads(args.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp)
        train_dir = root / "train"
        for length, n in TRAIN_MIX:
            synthesize(n, train_dir / f"len{length}.parquet", length=length, seed=1000 * args.seed + length,
                       workers=args.workers)
        val = synthesize(VAL_SAMPLES, root / "val4.parquet", length=4, seed=1000 * args.seed + 999,
                         workers=args.workers)
        print(f"data: {sum(n for _, n in TRAIN_MIX)} training captchas "
              f"({', '.join(f'{n}×{length} digits' for length, n in TRAIN_MIX)}), "
              f"{VAL_SAMPLES} 4-digit validation; {time.time() - started:.0f} s", flush=True)

        config = JobConfig(
            model="tiny", train_data=str(train_dir), val_data=str(val), max_val_samples=VAL_SAMPLES,
            train_scope="all", attention="prefix", gradient_checkpointing=False,
            batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.1, weight_decay=0.01,
            max_steps=args.steps, eval_every=args.eval_every, seed=args.seed)
        speeds: list[float] = []
        rows: list[tuple[float, int, float, float, float]] = []
        print(f"{'elapsed s':>9} {'step':>6} {'train loss':>10} {'val EM':>7} {'val CER':>7}", flush=True)

        def on_report(metrics: dict, _checkpoint) -> None:
            row = (time.time() - started, metrics["step"], metrics["train_loss"], metrics["val_exact_match"],
                   metrics["val_cer"])
            rows.append(row)
            print(f"{row[0]:9.0f} {row[1]:6d} {row[2]:10.3f} {row[3]:7.3f} {row[4]:7.3f}", flush=True)

        result = run_job(config, on_report=on_report, on_step=lambda m: speeds.append(m["samples_per_s"]))

    speeds.sort()
    final = result.final_metrics
    print(f"final: outcome {result.outcome}, step {result.step}, val exact match "
          f"{final.get('val_exact_match', 0):.3f} [{final.get('val_exact_match_low', 0):.3f}, "
          f"{final.get('val_exact_match_high', 0):.3f}], val CER {final.get('val_cer', 0):.3f}, "
          f"{time.time() - started:.0f} s in all, median {speeds[len(speeds) // 2]:.0f} samples/s")
    reached = next((r for r in rows if r[3] >= 0.5), None)
    print("first ≥ 50 % exact match: " + (f"{reached[0]:.0f} s (step {reached[1]})" if reached else "not reached"))


if __name__ == "__main__":
    main()
