"""Seeded, reproducible captcha generation with the `captcha` package.

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
import os
import random
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from trainer.files import atomic_path

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


def _render_chunk(job: tuple[int, int, dict]) -> list[tuple[str, bytes]]:
    start, count, options = job
    return list(generate_samples(count, start=start, **options))


def _iter_samples(n: int, workers: int, options: dict) -> Iterator[tuple[str, bytes]]:
    if workers <= 1 or n <= _CHUNK:
        yield from generate_samples(n, **options)
        return
    import multiprocessing

    # Every sample has its own seeded generator, so chunks rendered in other
    # processes are the same bytes as a serial run; imap keeps them in order.
    jobs = [(start, min(_CHUNK, n - start), options) for start in range(0, n, _CHUNK)]
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
               workers: int = 1, progress: Optional[ProgressFn] = None) -> Path:
    """Write `n` seeded captchas to `out_path` (Parquet, Hugging Face layout) and return it.

    The file is written to a temporary name beside `out_path` and renamed into place,
    so a reader never sees a half-written file. `progress(done, n)` is called after
    every batch of rows, if given. `workers > 1` renders in that many processes;
    the output is byte-for-byte the same as with one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_path).expanduser()
    _check_options(n, length, alphabet, width, height, fonts)  # fail before creating anything
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
            samples = _iter_samples(n, workers, options)
            for index, (label, png) in enumerate(samples):
                images.append({"bytes": png, "path": f"{index:07d}.png"})
                labels.append(label)
                if len(labels) >= _ROWS_PER_BATCH:
                    flush()
            flush()
    return out
