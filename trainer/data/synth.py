"""Seeded, reproducible captcha generation with the `captcha` package, and with the project's own PIL renderer
(`generate_drawn`, below: many styles, for pretraining a base that reads more than one renderer).

`captcha.image.ImageCaptcha` draws all of its randomness from a module-level
source: the `secrets` module in captcha >= 0.7 (not seedable at all), the `random`
module in older releases. `_seeded_captcha_rng` swaps that module-level name for a
seeded `random.Random` for the duration of one image, under a lock, and puts the
original back afterwards. Every sample gets its own generator, seeded from
`(seed, index)`, so sample `i` is the same whatever `n` is: `n=100` is a prefix of
`n=1000` with the same seed.

Output is a single Parquet file in the Hugging Face layout: an `image` column of
`{bytes: PNG, path: str}` structs and a `solution` column of strings, with the
`huggingface` schema metadata that lets `datasets` decode the column as images.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import random
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

from trainer.files import atomic_path

if TYPE_CHECKING:
    from PIL import Image

DIGITS = "0123456789"
DEFAULT_LENGTH = 6
DEFAULT_WIDTH = 200
DEFAULT_HEIGHT = 50

PathLike = Union[str, "os.PathLike[str]"]
ProgressFn = Callable[[int, int], None]

_PATCH_LOCK = threading.Lock()
_ROWS_PER_BATCH = 256
_CHUNK = 64  # samples per task when rendering in worker processes


class _SeededSource(random.Random):
    """A seeded `random.Random` that also offers the `secrets` functions captcha uses."""

    def randbelow(self, exclusive_upper_bound: int) -> int:  # secrets.randbelow
        if exclusive_upper_bound <= 0:
            raise ValueError("Upper bound must be positive.")
        return self.randrange(exclusive_upper_bound)

    def randbits(self, k: int) -> int:  # secrets.randbits
        return self.getrandbits(k)

    # `choice` is inherited: random.Random.choice matches secrets.choice.


def _captcha_module():
    import captcha.image as captcha_image

    return captcha_image


@contextlib.contextmanager
def _seeded_captcha_rng(source: random.Random) -> Iterator[None]:
    """Make `captcha.image` draw from `source` while the block runs, then restore it."""
    module = _captcha_module()
    names = [name for name in ("secrets", "random") if hasattr(module, name)]
    if not names:
        raise RuntimeError(
            "cannot seed this version of the `captcha` package: captcha.image has neither a "
            "module-level `secrets` nor `random`; pin a version whose randomness can be controlled"
        )
    with _PATCH_LOCK:
        saved = {name: getattr(module, name) for name in names}
        try:
            for name in names:
                setattr(module, name, source)
            yield
        finally:
            for name, value in saved.items():
                setattr(module, name, value)


def _check_options(n: int, length: int, alphabet: str, width: int, height: int,
                   fonts: Optional[Sequence[PathLike]]) -> Optional[list[str]]:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    if not alphabet:
        raise ValueError("alphabet must not be empty")
    if any(ch.isspace() for ch in alphabet):
        raise ValueError(f"alphabet must not contain whitespace (labels are stripped on load): {alphabet!r}")
    if width < 8 or height < 8:
        raise ValueError(f"image size must be at least 8x8, got {width}x{height}")
    if not fonts:
        return None
    paths = [str(Path(f).expanduser()) for f in fonts]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"font file(s) not found: {', '.join(missing)}")
    from PIL import ImageFont

    for p in paths:
        try:
            ImageFont.truetype(p, 20)
        except OSError as exc:
            raise ValueError(f"cannot load font {p}: {exc}") from exc
    return paths


def _sample_rng(seed: int, index: int) -> _SeededSource:
    # String seeds are hashed with SHA-512 by random.Random: stable across runs and
    # processes (unlike hash()), and unrelated streams for neighbouring indices.
    return _SeededSource(f"mdsweep-synth:{seed}:{index}")


def generate_samples(n: int, *, length: int = DEFAULT_LENGTH, alphabet: str = DIGITS,
                     width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT,
                     fonts: Optional[Sequence[PathLike]] = None, seed: int = 0,
                     start: int = 0) -> Iterator[tuple[str, bytes]]:
    """Yield `(label, png_bytes)` for samples `start .. start+n-1` of the seeded stream."""
    font_paths = _check_options(n, length, alphabet, width, height, fonts)
    from captcha.image import ImageCaptcha

    generator = ImageCaptcha(width=width, height=height, fonts=font_paths)
    for index in range(start, start + n):
        rng = _sample_rng(seed, index)
        label_rng = random.Random(rng.random())
        label = "".join(label_rng.choice(alphabet) for _ in range(length))
        with _seeded_captcha_rng(rng):
            image = generator.generate_image(label)
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG", optimize=False)
        yield label, buf.getvalue()


# --------------------------------------------------------------------------- the own renderer
#
# Why: a base pretrained on one renderer's text learns that renderer, not how to read (issue 34: 7 % after
# fine-tuning on another generator's captchas). `draw_captcha` varies what the `captcha` package keeps fixed:
# backgrounds (plain, gradient, speckled, dark), text colour per image or per character, one font or a mix of
# fonts, character size, rotation, spacing and overlap, shear, then clutter: sine curves across the text, a
# strike-through line, short strokes, dots and blur. Every draw comes from a `random.Random` seeded by
# `(seed, index)`, so sample `i` is the same whatever `n` is, in any process, as for `generate_samples`.

Colour = tuple[int, int, int]


def _light(rng: random.Random) -> Colour:
    return tuple(rng.randint(190, 255) for _ in range(3))  # type: ignore[return-value]


def _dark(rng: random.Random) -> Colour:
    return tuple(rng.randint(0, 110) for _ in range(3))  # type: ignore[return-value]


def _background(rng: random.Random, width: int, height: int) -> tuple["Image.Image", bool]:
    """A background and whether it is dark (then the text is light)."""
    from PIL import Image

    kind = rng.choice(("plain", "plain", "gradient", "speckle", "dark"))
    if kind == "dark":
        return Image.new("RGB", (width, height), _dark(rng)), True
    image = Image.new("RGB", (width, height), _light(rng))
    if kind == "gradient":
        mask = Image.linear_gradient("L").rotate(rng.uniform(0, 360)).resize((width, height))
        image = Image.composite(Image.new("RGB", (width, height), _light(rng)), image, mask)
    elif kind == "speckle":
        noise = Image.effect_noise((width, height), rng.uniform(20, 60)).convert("RGB")
        image = Image.blend(image, noise, rng.uniform(0.15, 0.4))
    return image, False


def _glyph(ch: str, font_path: Optional[str], size: int, angle: float) -> "Image.Image":
    """One character as an 'L' mask on the font's full line height, rotated, cropped to its ink sideways
    only: keeping the line box keeps 'c' smaller than 'C' and 'p' below the baseline, which are the only
    cues that tell such pairs apart."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default(size)
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(ch)
    mask = Image.new("L", (right - left + 4, ascent + descent + 4), 0)
    ImageDraw.Draw(mask).text((2 - left, 2), ch, font=font, fill=255)
    mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    ink = mask.getbbox() or (0, 0, 1, mask.height)
    return mask.crop((ink[0], 0, ink[2], mask.height))


def draw_captcha(label: str, width: int, height: int, fonts: Optional[Sequence[str]],
                 rng: random.Random) -> "Image.Image":
    """Draw `label` as a captcha of `width`×`height`; every choice comes from `rng`."""
    from PIL import Image, ImageDraw, ImageFilter

    image, dark = _background(rng, width, height)
    ink = (lambda: _light(rng)) if dark else (lambda: _dark(rng))
    text_colour = ink()
    per_char_colour = rng.random() < 0.3
    font_choices = list(fonts) if fonts else [None]
    image_font = rng.choice(font_choices)
    mixed_fonts = rng.random() < 0.25
    size = max(8, round(height * rng.uniform(0.55, 0.9)))
    max_angle = rng.choice((0, 10, 20, 35))
    glyphs = [(_glyph(ch, rng.choice(font_choices) if mixed_fonts else image_font, size,
                      rng.uniform(-max_angle, max_angle)), ink() if per_char_colour else text_colour)
              for ch in label]

    # Lay the glyphs out left to right with random gaps (negative: overlap), then shrink all of them
    # together if the row is wider than the image allows.
    mean_w = sum(g.width for g, _ in glyphs) / len(glyphs)
    gaps = [rng.uniform(-0.15, 0.35) * mean_w for _ in glyphs[1:]]
    row = sum(g.width for g, _ in glyphs) + sum(gaps)
    tallest = max(g.height for g, _ in glyphs)
    scale = min(1.0, 0.94 * width / max(row, 1), 0.95 * height / max(tallest, 1))
    if scale < 1.0:
        glyphs = [(g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))),
                            Image.Resampling.BILINEAR), c) for g, c in glyphs]
        gaps = [gap * scale for gap in gaps]
        row *= scale
    x = rng.uniform(0.02 * width, max(0.02 * width, width - row - 0.02 * width))
    jitter = rng.choice((0.1, 0.3, 0.6))  # of the vertical room each glyph has
    for i, (glyph, colour) in enumerate(glyphs):
        room = max(0, height - glyph.height)
        y = room / 2 + rng.uniform(-jitter, jitter) * room / 2
        image.paste(colour, (round(x), round(y)), glyph)
        x += glyph.width + (gaps[i] if i < len(gaps) else 0)

    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):  # sine curves across the text
        amplitude, cycles, phase = rng.uniform(1, height / 4), rng.uniform(0.3, 2.0), rng.uniform(0, 2 * math.pi)
        middle = rng.uniform(0.25, 0.75) * height
        x0, x1 = rng.uniform(0, 0.3) * width, rng.uniform(0.7, 1.0) * width
        points = [(x, middle + amplitude * math.sin(2 * math.pi * cycles * x / width + phase))
                  for x in range(round(x0), round(x1) + 1, 3)]
        draw.line(points, fill=text_colour if rng.random() < 0.6 else ink(), width=rng.randint(1, 4))
    if rng.random() < 0.35:  # a strike-through through the middle of the text
        y0, y1 = (rng.uniform(0.35, 0.65) * height for _ in range(2))
        draw.line([(rng.uniform(0, 0.15) * width, y0), (rng.uniform(0.85, 1.0) * width, y1)],
                  fill=text_colour, width=rng.randint(2, 4))
    for _ in range(rng.choice((0, 0, 3, 8))):  # short strokes
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        draw.line([(x, y), (x + rng.uniform(-20, 20), y + rng.uniform(-10, 10))], fill=ink(), width=1)
    if rng.random() < 0.6:  # dots
        for _ in range(rng.randint(width * height // 400, width * height // 60)):
            x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.choice((0, 0, 1))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=ink())
    if rng.random() < 0.3:  # a horizontal shear, as a slanted hand or a warped font
        shear = rng.uniform(-0.3, 0.3)
        fill = image.getpixel((0, 0))
        image = image.transform(image.size, Image.Transform.AFFINE, (1, shear, -shear * height / 2, 0, 1, 0),
                                resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image


def generate_drawn(n: int, *, length: int = DEFAULT_LENGTH, alphabet: str = DIGITS,
                   width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT,
                   fonts: Optional[Sequence[PathLike]] = None, seed: int = 0,
                   start: int = 0) -> Iterator[tuple[str, bytes]]:
    """Yield `(label, png_bytes)` for samples `start .. start+n-1`; the arguments mean what they mean in
    `generate_samples` (no `fonts`: PIL's built-in scalable font)."""
    font_paths = _check_options(n, length, alphabet, width, height, fonts)
    for index in range(start, start + n):
        rng = random.Random(f"mdsweep-drawn:{seed}:{index}")
        label = "".join(rng.choice(alphabet) for _ in range(length))
        buf = io.BytesIO()
        draw_captcha(label, width, height, font_paths, rng).save(buf, format="PNG", optimize=False)
        yield label, buf.getvalue()


RENDERERS = ("captcha", "drawn")


def _generator(renderer: str) -> Callable[..., Iterator[tuple[str, bytes]]]:
    """`captcha`: the `captcha` package; `drawn`: the project's own PIL renderer (`generate_drawn`)."""
    if renderer == "captcha":
        return generate_samples
    if renderer == "drawn":
        return generate_drawn
    raise ValueError(f"unknown renderer {renderer!r}; choose one of {', '.join(RENDERERS)}")


def _render_chunk(job: tuple[int, int, str, dict]) -> list[tuple[str, bytes]]:
    start, count, renderer, options = job
    return list(_generator(renderer)(count, start=start, **options))


def _iter_samples(n: int, workers: int, renderer: str, options: dict) -> Iterator[tuple[str, bytes]]:
    if workers <= 1 or n <= _CHUNK:
        yield from _generator(renderer)(n, **options)
        return
    # Every sample has its own seeded generator, so chunks rendered in other
    # processes are the same bytes as a serial run; imap keeps them in order.
    jobs = [(start, min(_CHUNK, n - start), renderer, options) for start in range(0, n, _CHUNK)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for chunk in pool.imap(_render_chunk, jobs):
            yield from chunk


def _hf_schema():
    import pyarrow as pa

    features = {
        "image": {"_type": "Image"},
        "solution": {"dtype": "string", "_type": "Value"},
    }
    schema = pa.schema([
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("solution", pa.string()),
    ])
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def synthesize(n: int, out_path: PathLike, *, length: int = DEFAULT_LENGTH, alphabet: str = DIGITS,
               width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT,
               fonts: Optional[Sequence[PathLike]] = None, seed: int = 0,
               workers: int = 1, progress: Optional[ProgressFn] = None, renderer: str = "captcha") -> Path:
    """Write `n` seeded captchas to `out_path` (Parquet, Hugging Face layout) and return it.

    `renderer` picks who draws them: `captcha` (the `captcha` package, the default and the demo's) or
    `drawn` (`generate_drawn`: varied backgrounds, colours, rotation, curves, strike-throughs, noise).

    The file is written to a temporary name beside `out_path` and renamed into place,
    so a reader never sees a half-written file. `progress(done, n)` is called after
    every batch of rows, if given. `workers > 1` renders in that many processes;
    the output is byte-for-byte the same as with one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_path).expanduser()
    _check_options(n, length, alphabet, width, height, fonts)  # fail before creating anything
    _generator(renderer)
    schema = _hf_schema()
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            images: list[dict] = []
            labels: list[str] = []
            done = 0

            def flush() -> None:
                nonlocal images, labels, done
                if not labels:
                    return
                writer.write_table(pa.Table.from_pydict({"image": images, "solution": labels}, schema=schema))
                done += len(labels)
                images, labels = [], []
                if progress is not None:
                    progress(done, n)

            options = dict(length=length, alphabet=alphabet, width=width, height=height,
                           fonts=[str(f) for f in fonts] if fonts else None, seed=seed)
            samples = _iter_samples(n, workers, renderer, options)
            for index, (label, png) in enumerate(samples):
                images.append({"bytes": png, "path": f"{index:07d}.png"})
                labels.append(label)
                if len(labels) >= _ROWS_PER_BATCH:
                    flush()
            flush()
    return out
