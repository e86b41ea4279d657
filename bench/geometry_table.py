"""Which crop geometry lets a tiny reader read 200×50 captchas? One fixed budget per geometry, from scratch.

    python bench/geometry_table.py --tiling                          # what each geometry does to 200×50
    python bench/geometry_table.py --row 112,14,4,1,64,96 --samples 16000 --out data/geom/rows.jsonl

    python bench/geometry_table.py --init-from models/tiny-reader --row 84,7,4,1,64,96 --samples 16000

A row is `crop,patch,max_crops,margin,enc_dim,text_dim` (models/make_tiny_reader.py `reader_config`). Every row
trains (train_scope=all, prefix attention, AdamW lr 3e-3, 3 % warmup, cosine, the same seed) for the same
number of samples and is evaluated on 6-digit 200×50 captchas of another seed (599). Two starts:

- from seeded random weights, on 200×50 digit captchas of lengths 1-6 (the mix is meant to break the no-image
  plateau that 6-digit-only training sits on, bench/demo_learning.py);
- `--init-from DIR`: from a trained reader's weights carried to the row's geometry (make_tiny_reader.py
  `carry_weights`: same widths only), fine-tuned on the demo's target, 2 000 six-digit 200×50 captchas (seed 0).

Seconds per step are the median of the training steps (evaluation excluded).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_LENGTHS = range(1, 7)
WIDTH, HEIGHT, DIGITS_PER_CAPTCHA = 200, 50, 6


def recipe():
    spec = importlib.util.spec_from_file_location("make_tiny_reader", ROOT / "models" / "make_tiny_reader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_row(text: str) -> dict[str, int]:
    names = ("crop_size", "patch_size", "max_crops", "overlap_margin", "enc_dim", "text_dim")
    values = [int(v) for v in text.split(",")]
    if len(values) != len(names):
        raise SystemExit(f"--row wants {len(names)} comma-separated integers ({','.join(names)}), got {text!r}")
    return dict(zip(names, values))


def tiling_facts(config) -> dict[str, object]:
    """What make_crops does to a 200×50 image under `config`: tiles, encoder and decoder tokens, columns/digit."""
    from PIL import Image

    from trainer.model.image_crops import make_crops

    v = config.vision
    crops = make_crops(Image.new("RGB", (WIDTH, HEIGHT)), v)
    rows, cols = crops.tiling
    stitched_cols = (v.grid - 2 * v.overlap_margin) * cols + 2 * v.overlap_margin
    return {"tiles": f"{rows}x{cols}", "crops": len(crops.pixels), "encoder_tokens": len(crops.pixels) * v.grid ** 2,
            "image_tokens": v.n_image_tokens, "decoder_cols_per_digit": round(v.grid / DIGITS_PER_CAPTCHA, 2),
            "encoder_cols_per_digit": round(stitched_cols / DIGITS_PER_CAPTCHA, 2)}


def make_data(root: Path, per_length: int, n_val: int, target: bool) -> tuple[Path, Path]:
    from trainer.data.synth import synthesize

    train, val = root / "train", root / "val6.parquet"
    if target:  # the demo's training file: mdsweep data synth --n 2000 --length 6
        train = root / "target6.parquet"
        if not train.is_file():
            synthesize(2000, train, length=DIGITS_PER_CAPTCHA, seed=0, workers=1)
    for length in ([] if target else TRAIN_LENGTHS):
        path = train / f"len{length}.parquet"
        if not path.is_file():
            synthesize(per_length, path, length=length, seed=500 + length, workers=1)
    if not val.is_file():
        synthesize(n_val, val, length=DIGITS_PER_CAPTCHA, seed=599, workers=1)
    return train, val


def run_row(row: dict[str, int], args: argparse.Namespace, train: Path, val: Path) -> dict[str, object]:
    from trainer.job import run_job
    from trainer.job_config import JobConfig
    from trainer.model.network import MoondreamModel

    make = recipe()
    config = make.reader_config(**row)
    name = "g" + "-".join(str(v) for v in row.values()) + ("-carried" if args.init_from else "")
    model = make.initial_model(config, args.data_dir / "init" / name, args.seed, args.init_from)
    params = sum(p.numel() for p in MoondreamModel(config, bos_id=0).parameters())
    step_seconds: list[float] = []

    def on_step(metrics: dict) -> None:
        step_seconds.append(args.batch_size / metrics["samples_per_s"])

    job = JobConfig(model=model, train_data=str(train), val_data=str(val), max_val_samples=args.val_samples,
                    train_scope="all", attention="prefix", gradient_checkpointing=False, batch_size=args.batch_size,
                    lr=args.lr, warmup_ratio=0.03, weight_decay=0.01, max_samples=args.samples,
                    eval_every_samples=args.samples, seed=args.seed, cache_dir=str(args.data_dir / "cache"))
    started = time.time()
    result = run_job(job, on_step=on_step)
    wall = time.time() - started
    final = result.final_metrics
    return {**row, **tiling_facts(config), "start": args.init_from or "random", "train": train.name,
            "batch_size": args.batch_size, "lr": args.lr, "params": params, "steps": result.step,
            "samples": args.samples,
            "s_per_step": round(statistics.median(step_seconds), 3), "train_s": round(sum(step_seconds), 1),
            "wall_s": round(wall, 1), "outcome": result.outcome, "train_loss": round(final.get("train_loss", -1), 4),
            "per_char_acc": round(1 - final["val_cer"], 4), "exact_match": final["val_exact_match"],
            "exact_low": round(final["val_exact_match_low"], 3), "exact_high": round(final["val_exact_match_high"], 3),
            "val_n": final["val_n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", action="append", default=[], help="crop,patch,max_crops,margin,enc_dim,text_dim")
    parser.add_argument("--tiling", action="store_true", help="print what each --row does to a 200×50 image")
    parser.add_argument("--samples", type=int, default=16000, help="training samples per row")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--per-length", type=int, default=2000, help="training captchas per length 1-6")
    parser.add_argument("--val-samples", type=int, default=400, help="6-digit evaluation captchas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", default=None, help="start from this reader's weights, carried to each "
                                                          "geometry, and fine-tune on the demo's target")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "geom")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per row here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = [parse_row(r) for r in args.row] or [parse_row("112,14,4,1,64,96")]
    if args.tiling:
        make = recipe()
        for row in rows:
            print(json.dumps({**row, **tiling_facts(make.reader_config(**row))}), flush=True)
        return
    train, val = make_data(args.data_dir, args.per_length, args.val_samples, target=args.init_from is not None)
    for row in rows:
        line = json.dumps(run_row(row, args, train, val))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
