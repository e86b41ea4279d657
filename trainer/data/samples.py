"""One (image, text) sample, and the checks every loader applies to each row: the image decodes, the text is a
non-empty string, ids are unique; bad rows raise or are counted (`on_bad_sample`). The formats are in
trainer.data.formats, the entry points in trainer.data.dataset."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
TEXT_COLUMN_CANDIDATES: tuple[str, ...] = ("solution", "text", "label")
DEFAULT_IMAGE_COLUMN = "image"
MANIFEST_SUFFIXES: dict[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
KNOWN_SPLITS: frozenset[str] = frozenset({"train", "test", "validation", "valid", "val", "dev"})
MAX_REASONS = 10
# every command that reads data can drop bad rows; the message says how in each
SKIP_HINT = ("(to drop and count such rows: --on-bad-sample skip for `mdsweep train`, --set on_bad_sample=skip "
             "for `mdsweep run`, --skip-bad for `mdsweep data check`)")

PathLike = Union[str, Path]


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the file and row."""


# --------------------------------------------------------------------------- images


# Pillow's modes for 16-bit (and 32-bit integer) grayscale, which `convert("RGB")` clips to 255: a 16-bit PNG
# captcha would come out all white
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in WIDE_GRAY_MODES:
        # 16-bit values scaled to 8 bits (65535 → 255), rounded
        wide = np.asarray(im, dtype=np.int64)
        return Image.fromarray(np.clip((wide + 128) // 257, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    if has_alpha:
        # Transparent pixels become white, not whatever colour hides under alpha 0.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully into an RGB image (raises on corrupt data)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return _to_rgb(im)


def decoded(data: bytes) -> tuple[Optional[Image.Image], Optional[str]]:
    """(the decoded image, None), or (None, why it cannot be read, for a message). PIL's own messages name its
    in-memory buffer (`<_io.BytesIO object at 0x...>`), which tells a user nothing; the caller names the row."""
    if not data:
        return None, "empty image (0 bytes)"
    try:
        return decode_image(data), None
    except Image.UnidentifiedImageError:
        return None, "unreadable image (not a recognised image format)"
    except Exception as exc:  # PIL raises many types for corrupt input
        return None, f"unreadable image ({type(exc).__name__}: {exc})"


LABEL_SHOWN = 40  # characters of a label that a message quotes


def label_in_message(text: Any) -> str:
    """A label as a message quotes it: whole when short, else its start and its length, so that a 5 000-character
    label (or a list where a label should be) does not fill the terminal."""
    if isinstance(text, str):
        return repr(text) if len(text) <= LABEL_SHOWN else f"{text[:LABEL_SHOWN]!r}… ({len(text)} characters)"
    shown = repr(text)
    return shown if len(shown) <= LABEL_SHOWN else f"{shown[:LABEL_SHOWN]}… ({len(shown)} characters)"


class _ImageField:
    """Dataclass field descriptor: holds a PIL image or encoded bytes, reads as RGB image.

    Assigning bytes keeps them and decodes on every read (cheap for small images,
    and memory stays near the size of the files). Assigning an image converts it
    to RGB once and returns it as is.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = f"_{name}_value"

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Image.Image:
        if obj is None:
            # Class access: tells @dataclass the field has no default.
            raise AttributeError("image has no default")
        value = obj.__dict__[self._attr]
        if isinstance(value, bytes):
            return decode_image(value)
        return value

    def __set__(self, obj: Any, value: Union[Image.Image, bytes, bytearray, memoryview]) -> None:
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value)
        elif isinstance(value, Image.Image):
            if value.mode != "RGB":
                value = _to_rgb(value)
        else:
            raise TypeError(f"Sample.image must be a PIL image or encoded bytes, got {type(value).__name__}")
        obj.__dict__[self._attr] = value


@dataclass(eq=False)
class Sample:
    """One (image, text) pair. `image` always reads as an RGB PIL image."""

    sample_id: str
    # A descriptor, not a default: Sample(sample_id, image, text) with all three required.
    image: Image.Image = _ImageField()  # type: ignore[assignment]
    text: str  # type: ignore[misc]

    @property
    def image_bytes(self) -> Optional[bytes]:
        """The encoded image as loaded from disk, or None for an in-memory image."""
        value = self.__dict__["_image_value"]
        return value if isinstance(value, bytes) else None


@dataclass
class LoadedDataset:
    samples: list[Sample]
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    source: str = ""
    format: str = ""

    def __len__(self) -> int:
        return len(self.samples)


# --------------------------------------------------------------------------- collection


class RowCollector:
    """Validates rows into Samples; raises or counts bad rows per `on_bad_sample`."""

    def __init__(self, on_bad_sample: str) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.skip = on_bad_sample == "skip"
        self.samples: list[Sample] = []
        self.skipped = 0
        self.reasons: list[str] = []
        self.kept = 0
        self._ids: set[str] = set()

    def bad(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if not self.skip:
            raise DataError(f"{message} {SKIP_HINT}")
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(message)

    def add(self, sample_id: str, where: str, data: Optional[bytes], text: Any) -> None:
        if text is None:
            return self.bad(where, "empty label (missing value)")
        if not isinstance(text, str):
            return self.bad(where, f"label must be a string, got {type(text).__name__} {label_in_message(text)}")
        text = text.strip()
        if not text:
            return self.bad(where, "empty label")
        if data is None:
            return self.bad(where, "no image data")
        image, why = decoded(data)
        if image is None:
            return self.bad(where, str(why))
        if sample_id in self._ids:  # guard: every loader builds unique ids, keep it that way
            raise DataError(f"{where}: duplicate sample id {sample_id!r}")
        self._ids.add(sample_id)
        self.kept += 1
        self.keep(Sample(sample_id, data, text), image)

    def keep(self, sample: Sample, image: Image.Image) -> None:
        """A row that passed the checks, with its decoded image. Kept in memory here; the preprocessing cache
        overrides this to crop each row as it arrives, so a large dataset never sits in memory whole."""
        self.samples.append(sample)

    def finish(self, source: str, fmt: str, rows_seen: int) -> LoadedDataset:
        if not self.kept:
            if self.skipped:
                raise DataError(
                    f"{source}: no usable samples, all {self.skipped} row(s) were bad; first: {self.reasons[0]}"
                )
            raise DataError(f"{source}: empty dataset (0 rows)" if rows_seen == 0 else f"{source}: no samples")
        return LoadedDataset(self.samples, self.skipped, self.reasons, source, fmt)


def read_image_file(path: Path, where: str, collector: RowCollector) -> Optional[bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        collector.bad(where, f"image file not found: {path}")
    except OSError as exc:
        collector.bad(where, f"cannot read image file {path}: {exc.strerror or exc}")
    else:
        if data:
            return data
        collector.bad(where, f"empty image file (0 bytes): {path}")
    return None


def resolve_path(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def files_under(root: Path, suffixes: Iterable[str]) -> list[Path]:
    wanted = {s.lower() for s in suffixes}
    found = [
        p for p in root.rglob("*")
        if p.suffix.lower() in wanted and not _is_hidden(p.relative_to(root)) and p.is_file()
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def missing_column(where: str, kind: str, wanted: Sequence[str], columns: Sequence[str], hint: str) -> DataError:
    want = " or ".join(repr(w) for w in wanted)
    have = ", ".join(columns) if columns else "none"
    return DataError(f"{where}: no {kind} column {want}; columns present: {have}. {hint}".rstrip())
