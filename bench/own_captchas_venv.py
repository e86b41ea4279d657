"""The half of `bench/own_captchas.py` that runs in its own virtual environment, never in the project's.

    python3 -m venv /work/ddddocr-venv
    /work/ddddocr-venv/bin/pip install ddddocr claptcha multicolorcaptcha easy-captcha

Why a separate environment: these are other people's captcha generators and an off-the-shelf OCR, the things
a user brings, not dependencies of the project; and easy-captcha installs a top-level module named `captcha`
that would shadow the `captcha` package the project synthesizes with. This file imports only the standard
library, Pillow and those packages (no project module), and `bench/own_captchas.py` calls it as a subprocess:

    generate STYLE OUT_DIR --counts 6000 500 500 --seed 0   # OUT_DIR/{train,val,test}/<label>.png
    ocr DIR                                                 # one JSON line: {file name: ddddocr's reading}

The styles are ones the shipped bases never saw in pretraining (see models/make_tiny_reader.py: their
generators and fonts are kept out of it). Every generator draws from Python's module-level `random`, so
seeding it per sample makes a style reproducible: sample i of a seed is always the same image.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path
from typing import Callable

from PIL import Image, ImageFont

# claptcha 0.3.3 and easy-captcha 1.3.3 call what Pillow 10 removed; the two names, as Pillow 9 defined them
if not hasattr(ImageFont.FreeTypeFont, "getsize"):
    ImageFont.FreeTypeFont.getsize = lambda font, text: tuple(font.getbbox(text)[2:])
if not hasattr(Image, "ANTIALIAS"):
    Image.ANTIALIAS = Image.Resampling.LANCZOS
COMIC_NEUE = "/usr/share/fonts/opentype/comic-neue/ComicNeue-Bold.otf"  # Debian: fonts-comic-neue
KAGGLE_ALPHABET = "2345678bcdefgmnpwxy"  # the 19 characters of the most-used public captcha set
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def claptcha19(label_rng: random.Random) -> tuple[str, Image.Image]:
    """claptcha in Comic Neue: 5 of the public set's 19 digits and lower-case letters, 200×50, a line
    through the text, its white noise and per-letter warps (the issue's user set, by description)."""
    from claptcha import Claptcha

    label = "".join(label_rng.choice(KAGGLE_ALPHABET) for _ in range(5))
    _, image = Claptcha(label, COMIC_NEUE, size=(200, 50), margin=(12, 6), noise=0.3).image
    return label, image


def multicolor_hex(label_rng: random.Random) -> tuple[str, Image.Image]:
    """multicolorcaptcha at its smallest size without its black margins (256×64), difficulty 1: 4 hex
    characters (A-F, 0-9), each rotated on its own coloured square in one of its ~50 bundled fonts
    (decorative ones among them), lines and dots over them."""
    from multicolorcaptcha import CaptchaGenerator

    del label_rng  # the generator draws its own characters from the seeded module-level `random`
    captcha = CaptchaGenerator(0).gen_captcha_image(difficult_level=1, chars_mode="hex", multicolor=True,
                                                    margin=False)
    return captcha.characters, captcha.image


def easy_letters(label_rng: random.Random) -> tuple[str, Image.Image]:
    """easy-captcha's SimpleGenerator (its Auxin font, random colours on white, no rotation): 7 upper- and
    lower-case letters, squeezed to 180×60."""
    from captcha.generator import SimpleGenerator  # easy-captcha's module, not the project's `captcha`

    label = "".join(label_rng.choice(LETTERS) for _ in range(7))
    return label, SimpleGenerator().make_captcha(string=label, font_size=64, image_size=(180, 60))


STYLES: dict[str, Callable[[random.Random], tuple[str, Image.Image]]] = {
    "claptcha19": claptcha19, "multicolor-hex": multicolor_hex, "easy-letters": easy_letters}


def generate(style: str, out: Path, counts: list[int], seed: int) -> None:
    """Write train/val/test folders of PNGs named by label, from one seeded stream. A label drawn again is
    skipped, so the three splits share no label and no file name collides (the folder layout needs unique
    names, as in the public set)."""
    draw = STYLES[style]
    seen: set[str] = set()
    index = 0
    for split, count in zip(("train", "val", "test"), counts):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        while written < count:
            random.seed(f"own-captchas:{style}:{seed}:{index}")
            label, image = draw(random.Random(f"own-captchas-label:{style}:{seed}:{index}"))
            index += 1
            if label in seen:
                continue
            seen.add(label)
            image.convert("RGB").save(folder / f"{label}.png")
            written += 1


def ocr(folder: Path) -> None:
    """ddddocr's zero-shot reading of every PNG in `folder`, as one JSON object on stdout."""
    import ddddocr

    reader = ddddocr.DdddOcr(show_ad=False)
    readings = {f.name: reader.classification(f.read_bytes()) for f in sorted(folder.glob("*.png"))}
    json.dump(readings, sys.stdout)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write a style's train/val/test image folders")
    gen.add_argument("style", choices=sorted(STYLES))
    gen.add_argument("out", type=Path)
    gen.add_argument("--counts", type=int, nargs=3, default=[6000, 500, 500], metavar=("TRAIN", "VAL", "TEST"))
    gen.add_argument("--seed", type=int, default=0)
    read = commands.add_parser("ocr", help="ddddocr on every PNG of a folder")
    read.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.style, args.out, args.counts, args.seed)
    else:
        ocr(args.folder)


if __name__ == "__main__":
    main()
