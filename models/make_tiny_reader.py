"""The recipe that made `models/tiny-reader` and `models/tiny-reader-v2`: pretrain a `tiny`-sized model to read
text images.

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

Geometry. By default the model is the `tiny` preset (112-pixel crops of 14-pixel patches: an 8×8 grid, so a
200×50 captcha's six digits get about 1.3 patch columns each). `--crop-size`, `--patch-size`, `--max-crops`,
`--overlap-margin`, `--enc-dim` and `--text-dim` change that within the same architecture (see
`reader_config` and bench/RESULTS.md); any change starts from a random-weight base written in the official
layout under `--data-dir`, or, with `--init-from`, from a trained reader of the same widths carried to the new
geometry (`carry_weights`). tiny-reader-v2 is the 168-pixel, 14-pixel-patch base (a 12×12 grid: 2 patch
columns per digit of a 200×50 six-digit captcha), from tiny-reader's weights (54 min):

    python models/make_tiny_reader.py --out models/tiny-reader-v2 --epochs 4 --crop-size 168 --patch-size 14 \
        --init-from models/tiny-reader

A run that was cut goes on from its last checkpoint (every `--checkpoint-every` steps, 1 000 by default) with
the same flags and `--resume`.

Data mixes (`--data-mix`). `v2` (the default) is the data above, which made tiny-reader and tiny-reader-v2, kept
as it was so that both recipes still reproduce. `general` (issue 34) is for a base that reads the captchas users
bring rather than one renderer's: digits, lower-case and upper-case letters (each file draws from one of four
alphabets: digits, digits+lower, digits+upper, all 62), lengths 3-8, six sizes from 120×50 to 280×80 with
200×50 among them, and two renderers: the `captcha` package (its own font and four font sets) and the project's
own PIL renderer (`trainer.data.synth.generate_drawn`: backgrounds, colours, rotation, curves, strike-throughs,
noise, shear, blur) over all of those fonts. Kept out of it on purpose, for `bench/own_captchas.py` to test on: the Comic Neue,
Carlito and Caladea fonts, GNU FreeFont (multicolorcaptcha bundles it) and the claptcha, multicolorcaptcha and
easy-captcha generators. Its fonts come from Debian's fonts-dejavu-core, fonts-liberation, fonts-urw-base35,
fonts-roboto-unhinted and fonts-open-sans (`apt-get install ...`); a missing font file stops the run before any
data is made. The character tokenizer already covers printable ASCII (vocab 128), so lower-case letters need
no new embedding rows: their rows exist in every base, trained only as answers never given (v2 never saw one).

The tiny-reader-v3 run, from tiny-reader-v2's weights at its geometry:

    python models/make_tiny_reader.py --data-mix general --out models/tiny-reader-v3 --data-dir runs/pretrain-v3 \
        --per-length 12000 --epochs 3 --crop-size 168 --patch-size 14 --init-from models/tiny-reader-v2 \
        --checkpoint-every 500
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.model.config import MoondreamConfig

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LENGTHS = range(1, 9)
# (width, height): none is the target's 200×50
SIZES = ((150, 50), (240, 60), (180, 70), (260, 80))
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
FONT_SETS = (
    None,  # the captcha package's own font
    ("DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf"),
)


DIGITS, LOWER, UPPER = "0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GENERAL_ALPHABETS = (DIGITS, DIGITS + LOWER, DIGITS + UPPER, DIGITS + LOWER + UPPER)
GENERAL_LENGTHS = range(3, 9)
GENERAL_SIZES = ((200, 50), (160, 60), (240, 60), (150, 40), (280, 80), (120, 50))
FONTS = Path("/usr/share/fonts")
GENERAL_FONT_SETS: tuple[tuple[Path, ...], ...] = (
    tuple(DEJAVU / f for f in FONT_SETS[1]),
    tuple(FONTS / "truetype/liberation" / f for f in (
        "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", "LiberationSerif-Regular.ttf",
        "LiberationSerif-Italic.ttf", "LiberationMono-Regular.ttf", "LiberationSansNarrow-Bold.ttf")),
    tuple(FONTS / "opentype/urw-base35" / f for f in (
        "NimbusSans-Regular.otf", "NimbusRoman-Bold.otf", "URWBookman-Light.otf", "URWGothic-Book.otf",
        "C059-Roman.otf", "P052-Italic.otf", "NimbusMonoPS-Regular.otf", "Z003-MediumItalic.otf")),
    (FONTS / "truetype/roboto/unhinted/RobotoTTF/Roboto-Regular.ttf",
     FONTS / "truetype/roboto/unhinted/RobotoTTF/Roboto-Bold.ttf",
     FONTS / "truetype/roboto/unhinted/RobotoCondensed-Regular.ttf",
     FONTS / "truetype/open-sans/OpenSans-Regular.ttf", FONTS / "truetype/open-sans/OpenSans-Bold.ttf",
     FONTS / "truetype/open-sans/OpenSans-CondBold.ttf"),
)
# (renderer, fonts) per file of a length: the captcha package with its own font and each font set, then the
# own renderer twice as often, over every font (a font per image, sometimes a mix)
GENERAL_SOURCES: tuple[tuple[str, "tuple[Path, ...] | None"], ...] = (
    ("captcha", None), *(("captcha", fonts) for fonts in GENERAL_FONT_SETS),
    *(("drawn", tuple(f for fonts in GENERAL_FONT_SETS for f in fonts)),) * 7)


def write_training_data(root: Path, per_length: int, seed: int, workers: int) -> None:
    """The v2 mix: one Parquet file per (length, size, font set); `per_length` samples per length in all."""
    from trainer.data.synth import synthesize

    combos = list(itertools.product(SIZES, FONT_SETS))
    per_file = per_length // len(combos)
    for length in LENGTHS:
        for index, ((width, height), fonts) in enumerate(combos):
            font_paths = [DEJAVU / f for f in fonts] if fonts else None
            synthesize(per_file, root / f"len{length}_{width}x{height}_f{index % len(FONT_SETS)}.parquet",
                       length=length, alphabet=ALPHABET, width=width, height=height, fonts=font_paths,
                       seed=seed * 10_000 + length * 100 + index, workers=workers)


def general_files(per_length: int, seed: int) -> list[dict]:
    """The general mix as one `synthesize` call per file: for each length, one file per source in
    `GENERAL_SOURCES`, its size and alphabet turning with the file's index so that every length meets every
    size, alphabet and renderer. The file name says what is inside; a file that exists is not made again."""
    per_file = per_length // len(GENERAL_SOURCES)
    files = []
    for length in GENERAL_LENGTHS:
        for index, (renderer, fonts) in enumerate(GENERAL_SOURCES):
            width, height = GENERAL_SIZES[(index + length) % len(GENERAL_SIZES)]
            alphabet_index = (index + 2 * length) % len(GENERAL_ALPHABETS)
            files.append(dict(
                name=f"len{length}_{renderer}{index:02d}_{width}x{height}_a{alphabet_index}.parquet",
                n=per_file, length=length, alphabet=GENERAL_ALPHABETS[alphabet_index], width=width, height=height,
                fonts=list(fonts) if fonts else None, renderer=renderer,
                seed=seed * 10_000 + 5_000 + length * 100 + index))
    return files


def write_general_data(root: Path, val_path: Path, per_length: int, seed: int, workers: int) -> None:
    """The general mix's training files under `root`, and its validation: 400 five-character captchas from
    all 62 characters at 200×50, half from each renderer (own seeds), in one directory."""
    from trainer.data.synth import synthesize

    every_font = [f for fonts in GENERAL_FONT_SETS for f in fonts]
    for spec in general_files(per_length, seed):
        out = root / spec.pop("name")
        if not out.is_file():  # a cut data stage goes on where it stopped
            synthesize(spec.pop("n"), out, workers=workers, **spec)
    for index, renderer in enumerate(("captcha", "drawn")):
        synthesize(200, val_path / f"val_{renderer}.parquet", length=5, alphabet=GENERAL_ALPHABETS[-1],
                   width=200, height=50, fonts=every_font, renderer=renderer,
                   seed=seed * 10_000 + 9_990 + index, workers=workers)


def reader_config(*, crop_size: int = 112, patch_size: int = 14, max_crops: int = 4, overlap_margin: int = 1,
                  enc_dim: int = 64, text_dim: int = 96) -> "MoondreamConfig":
    """The `tiny` preset with another crop geometry and/or widths (the defaults give `tiny` itself).

    Depths and head counts stay; feed-forward and projection widths stay twice the width they serve, as in
    `tiny`; the decoder's context grows with the image tokens (grid²) so that prompt and answer still fit.
    """
    from trainer.model.config import PRESETS

    if patch_size < 1 or crop_size % patch_size:
        raise ValueError(f"crop size {crop_size} must be a multiple of the patch size {patch_size}")
    tiny = PRESETS["tiny"]
    vision = dataclasses.replace(
        tiny.vision, crop_size=crop_size, enc_patch_size=patch_size, max_crops=max_crops,
        overlap_margin=overlap_margin, enc_dim=enc_dim, enc_ff_dim=2 * enc_dim, proj_inner_dim=2 * enc_dim,
        proj_out_dim=text_dim)
    if vision.grid - 2 * overlap_margin <= 0:
        raise ValueError(f"overlap margin {overlap_margin} leaves no tile interior in a {vision.grid}-patch crop")
    for name, width, heads in (("enc-dim", enc_dim, vision.enc_n_heads), ("text-dim", text_dim, tiny.text.n_heads)):
        if width % heads or (width // heads) % 4:
            raise ValueError(f"{name} {width} must split into {heads} heads of a multiple of 4")
    text = dataclasses.replace(tiny.text, dim=text_dim, ff_dim=2 * text_dim,
                               max_context=max(tiny.text.max_context, vision.n_image_tokens + 128))
    return dataclasses.replace(tiny, vision=vision, text=text)


def initial_model(config: "MoondreamConfig", directory: Path, seed: int, init_from: "str | None" = None) -> str:
    """The `model` a job starting from `config` is given. From random weights: `tiny` when that is the preset,
    else a directory holding seeded random weights (the ones the preset path would draw) in the official
    layout. `init_from` (a trained reader of the same widths, e.g. models/tiny-reader): its weights carried to
    this geometry (`carry_weights`), written to `directory`."""
    from trainer.job_model import seed_everything
    from trainer.model.config import PRESETS
    from trainer.model.loading import LoadedModel, builtin_choice, load_model, save_model
    from trainer.model.network import MoondreamModel
    from trainer.model.tokenizer import CharTokenizer

    if config == PRESETS["tiny"] and init_from is None:
        return "tiny"
    tokenizer = CharTokenizer()
    seed_everything(seed)
    model = MoondreamModel(config, bos_id=tokenizer.bos_id)
    if init_from is not None:
        carry_weights(load_model(init_from).model, model)
    save_model(LoadedModel(model, tokenizer, None, builtin_choice(tokenizer)), directory)
    return str(directory)


def carry_weights(source, target) -> None:
    """Copy a trained reader's weights into a model of the same widths and another crop geometry.

    Tensors of equal shape are copied; the patch embedding's kernel is resized to the new patch side (area
    resampling, scaled so a patch of the same pixels gives the same response) and the position embedding is
    interpolated (bicubic) from the old patch grid to the new one, as when a ViT changes resolution.
    """
    import torch
    import torch.nn.functional as F

    ours, theirs = target.state_dict(), source.state_dict()
    if set(ours) != set(theirs):
        raise ValueError("source and target models differ in their tensors (depth or layout)")
    with torch.no_grad():
        for key, tensor in ours.items():
            old = theirs[key].to(tensor.dtype)
            if old.shape == tensor.shape:
                tensor.copy_(old)
            elif key.endswith("patch_embedding.weight") and old.shape[:2] == tensor.shape[:2]:
                ratio = old.shape[-1] / tensor.shape[-1]
                tensor.copy_(F.interpolate(old, size=tensor.shape[-2:], mode="bilinear", antialias=True,
                                           align_corners=False) * ratio ** 2)
            elif key.endswith("position_embedding.weight") and old.shape[1] == tensor.shape[1]:
                g_old, g_new = round(old.shape[0] ** 0.5), round(tensor.shape[0] ** 0.5)
                grid = old.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
                grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
                tensor.copy_(grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1))
            else:
                raise ValueError(f"cannot carry {key}: shape {tuple(old.shape)} -> {tuple(tensor.shape)} "
                                 "(only the geometry may differ, not the widths)")


def add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crop-size", type=int, default=112, help="crop side in pixels (tiny: 112)")
    parser.add_argument("--patch-size", type=int, default=14, help="vision patch side in pixels (tiny: 14)")
    parser.add_argument("--max-crops", type=int, default=4, help="most local tiles per image (tiny: 4)")
    parser.add_argument("--overlap-margin", type=int, default=1, help="tile overlap in patches (tiny: 1)")
    parser.add_argument("--enc-dim", type=int, default=64, help="vision tower width (tiny: 64)")
    parser.add_argument("--text-dim", type=int, default=96, help="text decoder width (tiny: 96)")
    parser.add_argument("--init-from", default=None,
                        help="start from this trained reader's weights (same widths), carried to the geometry, "
                             "instead of random weights")


def geometry_of_args(args: argparse.Namespace) -> "MoondreamConfig":
    return reader_config(crop_size=args.crop_size, patch_size=args.patch_size, max_crops=args.max_crops,
                         overlap_margin=args.overlap_margin, enc_dim=args.enc_dim, text_dim=args.text_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/tiny-reader"), help="model directory to write")
    parser.add_argument("--data-dir", type=Path, default=Path("data/pretrain"), help="where the synthetic data goes")
    parser.add_argument("--per-length", type=int, default=6000,
                        help="training images per answer length (v2: 1-8; general: 3-8)")
    parser.add_argument("--epochs", type=float, default=7.0, help="passes over the training data")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="processes rendering images")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument("--data-mix", choices=("v2", "general"), default="v2",
                        help="v2: tiny-reader/tiny-reader-v2's data (digits + upper case, lengths 1-8, captcha "
                             "package); general: many renderers, fonts, sizes and cases, lengths 3-8 (issue 34)")
    parser.add_argument("--checkpoint-every", type=int, default=1000,
                        help="steps between evaluations and checkpoints (--resume goes on from the last)")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the checkpoint a cut run left in DATA_DIR/checkpoint (same flags)")
    add_geometry_arguments(parser)
    args = parser.parse_args()
    model_config = geometry_of_args(args)  # a bad geometry fails before any data is made
    from trainer.checkpoint import TrainState
    checkpoint_dir = args.data_dir / "checkpoint"
    resume_from = checkpoint_dir if args.resume else None
    if args.resume and not TrainState.exists(checkpoint_dir):
        parser.error(f"--resume: no checkpoint in {checkpoint_dir}; run without --resume to start afresh")

    import torch

    from trainer.job import run_job
    from trainer.job_config import JobConfig
    from trainer.data.synth import synthesize

    torch.set_num_threads(args.threads)
    started = time.time()
    train_dir = args.data_dir / "train"
    if args.data_mix == "general":
        val_path = args.data_dir / "val"
        if not (val_path / "val_drawn.parquet").is_file():
            write_general_data(train_dir, val_path, args.per_length, args.seed, args.workers)
    else:
        val_path = args.data_dir / "val.parquet"
        if not train_dir.is_dir():
            write_training_data(train_dir, args.per_length, args.seed, args.workers)
            # validation: mixed lengths like training, one size it trains on
            synthesize(400, val_path, length=5, alphabet=ALPHABET, width=240, height=60,
                       seed=args.seed * 10_000 + 9_999, workers=args.workers)
    print(f"data ready: {time.time() - started:.0f} s", flush=True)
    model = initial_model(model_config, args.data_dir / "initial-model", args.seed, args.init_from)
    print(f"model: {model} {json.dumps(model_config.to_dict())}", flush=True)

    config = JobConfig(
        model=model, train_data=str(train_dir), val_data=str(val_path), max_val_samples=400,
        train_scope="all", attention="prefix", gradient_checkpointing=False, batch_size=args.batch_size,
        lr=args.lr, warmup_ratio=0.03, weight_decay=0.01, epochs=args.epochs, eval_every=args.checkpoint_every,
        seed=args.seed, save_model=str(args.out), cache_dir=str(args.data_dir / "crops"))
    curve: list[dict] = []

    def on_report(metrics: dict, _checkpoint) -> None:
        row = {k: metrics[k] for k in ("step", "train_loss", "val_exact_match", "val_cer")}
        row["elapsed_s"] = round(time.time() - started)
        curve.append(row)
        print(json.dumps(row), flush=True)

    resumed_at: list[int] = []
    result = run_job(config, on_report=on_report, checkpoint_dir=checkpoint_dir, resume_from=resume_from,
                     on_resume=lambda step, _report: resumed_at.append(step))
    (args.out / "pretraining.json").write_text(json.dumps({
        "recipe": "models/make_tiny_reader.py", "args": {k: str(v) for k, v in vars(args).items()},
        "outcome": result.outcome, "steps": result.step, "resumed_from_step": resumed_at[0] if resumed_at else None,
        "wall_time_s": round(time.time() - started),
        "final_metrics": result.final_metrics, "curve": curve}, indent=1))
    print(f"{result.outcome}: {result.step} steps, {time.time() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
