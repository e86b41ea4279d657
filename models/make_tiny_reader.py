"""The recipe that made `models/tiny-reader`: pretrain the `tiny` preset to read text images.

    python models/make_tiny_reader.py --out models/tiny-reader      # 47 min on 2 CPU cores

Why it exists: users fine-tune a model that already reads (Moondream2). At CPU size
the project has to make that model itself, so the demo sweep fine-tunes a reader
rather than teaching a random network to see. The pretraining task is deliberately
*not* the demo's target (6-digit, 200×50 captchas in the `captcha` package's own
font): it reads upper-case letters *and* digits, 1-8 characters long, at other
image sizes, in the DejaVu fonts as well as the default one. Fine-tuning then has
real work to do: learn the target's size, length, font and that only digits occur.

Lengths 1-8 are mixed on purpose: a lone character is a classification the whole
image answers, which pulls the random vision tower off the "no image" plateau
where a from-scratch model reading long strings sits for thousands of steps.

The weights are written in the official Moondream2 layout (`model.safetensors`
plus `mdsweep_config.json`), so they load through the same path as real
Moondream2 checkpoints. Not run by tests or CI: the product is committed.
Needs the DejaVu fonts (Debian: fonts-dejavu-core) for the font mix.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LENGTHS = range(1, 9)
# (width, height): none is the target's 200×50
SIZES = ((150, 50), (240, 60), (180, 70), (260, 80))
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
FONT_SETS = (
    None,  # the captcha package's own font
    ("DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf"),
)


def write_training_data(root: Path, per_length: int, seed: int, workers: int) -> None:
    """One Parquet file per (length, size, font set); `per_length` samples per length in all."""
    from trainer.data.synth import synthesize

    combos = list(itertools.product(SIZES, FONT_SETS))
    per_file = per_length // len(combos)
    for length in LENGTHS:
        for index, ((width, height), fonts) in enumerate(combos):
            font_paths = [DEJAVU / f for f in fonts] if fonts else None
            synthesize(per_file, root / f"len{length}_{width}x{height}_f{index % len(FONT_SETS)}.parquet",
                       length=length, alphabet=ALPHABET, width=width, height=height, fonts=font_paths,
                       seed=seed * 10_000 + length * 100 + index, workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/tiny-reader"), help="model directory to write")
    parser.add_argument("--data-dir", type=Path, default=Path("data/pretrain"), help="where the synthetic data goes")
    parser.add_argument("--per-length", type=int, default=6000, help="training images per answer length (1-8)")
    parser.add_argument("--epochs", type=float, default=7.0, help="passes over the training data")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="processes rendering images")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    args = parser.parse_args()

    import torch

    from trainer.job import run_job
    from trainer.job_config import JobConfig
    from trainer.data.synth import synthesize

    torch.set_num_threads(args.threads)
    started = time.time()
    train_dir, val_path = args.data_dir / "train", args.data_dir / "val.parquet"
    if not train_dir.is_dir():
        write_training_data(train_dir, args.per_length, args.seed, args.workers)
        # validation: mixed lengths like training, one size it trains on
        synthesize(400, val_path, length=5, alphabet=ALPHABET, width=240, height=60,
                   seed=args.seed * 10_000 + 9_999, workers=args.workers)
    print(f"data ready: {time.time() - started:.0f} s", flush=True)

    config = JobConfig(
        model="tiny", train_data=str(train_dir), val_data=str(val_path), max_val_samples=400,
        train_scope="all", attention="prefix", gradient_checkpointing=False, batch_size=args.batch_size,
        lr=args.lr, warmup_ratio=0.03, weight_decay=0.01, epochs=args.epochs, eval_every=1000,
        seed=args.seed, save_model=str(args.out))
    curve: list[dict] = []

    def on_report(metrics: dict, _checkpoint) -> None:
        row = {k: metrics[k] for k in ("step", "train_loss", "val_exact_match", "val_cer")}
        row["elapsed_s"] = round(time.time() - started)
        curve.append(row)
        print(json.dumps(row), flush=True)

    result = run_job(config, on_report=on_report, checkpoint_dir=args.data_dir / "checkpoint")
    (args.out / "pretraining.json").write_text(json.dumps({
        "recipe": "models/make_tiny_reader.py", "args": {k: str(v) for k, v in vars(args).items()},
        "outcome": result.outcome, "steps": result.step, "wall_time_s": round(time.time() - started),
        "final_metrics": result.final_metrics, "curve": curve}, indent=1))
    print(f"{result.outcome}: {result.step} steps, {time.time() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
