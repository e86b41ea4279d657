"""Raw (image, text) samples from three on-disk formats, validated when loaded.

Formats, chosen from the path:

1. Parquet, Hugging Face layout: a `.parquet` file, or a directory holding them.
   The image column holds `{bytes, path}` structs, raw binary, or path strings
   (default column `image`, else the first struct/binary column); the text column is
   `solution`, `text` or `label`, whichever comes first, unless named.
2. An image folder whose file names are the labels: `2b827.png` -> "2b827".
   Searched recursively, in sorted order; the sample id is the relative path, so
   a label may repeat in different sub-folders.
3. A manifest, `.jsonl` or `.csv`, with an `image` column (a path relative to the
   manifest's directory, or absolute) and a `text` column. A directory that holds
   exactly one manifest at its top level (and no Parquet files) loads that manifest.

Every image is decoded with PIL when the dataset is loaded, so a corrupt file or
an empty label is reported then, naming the file and row, rather than crashing a
training step hours later. Samples keep the encoded bytes and decode on access,
which keeps memory near the size of the files.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from PIL import Image

from trainer.job_config import OnBadSample

__all__ = [
    "DataError",
    "Sample",
    "LoadedDataset",
    "load_samples",
    "split_samples",
    "decode_image",
    "detect_format",
    "IMAGE_EXTENSIONS",
    "TEXT_COLUMN_CANDIDATES",
]

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


def _to_rgb(im: Image.Image) -> Image.Image:
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


class _Collector:
    """Validates rows into Samples; raises or counts bad rows per `on_bad_sample`."""

    def __init__(self, on_bad_sample: str) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.skip = on_bad_sample == "skip"
        self.samples: list[Sample] = []
        self.skipped = 0
        self.reasons: list[str] = []
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
            return self.bad(where, f"label must be a string, got {type(text).__name__} {text!r}")
        text = text.strip()
        if not text:
            return self.bad(where, "empty label")
        if data is None:
            return self.bad(where, "no image data")
        try:
            decode_image(data)
        except Image.UnidentifiedImageError:
            return self.bad(where, "unreadable image (not a recognised image format)")
        except Exception as exc:  # PIL raises many types for corrupt input
            return self.bad(where, f"unreadable image ({type(exc).__name__}: {exc})")
        if sample_id in self._ids:  # guard: every loader builds unique ids, keep it that way
            raise DataError(f"{where}: duplicate sample id {sample_id!r}")
        self._ids.add(sample_id)
        self.samples.append(Sample(sample_id, data, text))

    def finish(self, source: str, fmt: str, rows_seen: int) -> LoadedDataset:
        if not self.samples:
            if self.skipped:
                raise DataError(
                    f"{source}: no usable samples, all {self.skipped} row(s) were bad; first: {self.reasons[0]}"
                )
            raise DataError(f"{source}: empty dataset (0 rows)" if rows_seen == 0 else f"{source}: no samples")
        return LoadedDataset(self.samples, self.skipped, self.reasons, source, fmt)


def _read_image_file(path: Path, where: str, collector: _Collector) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        collector.bad(where, f"image file not found: {path}")
    except OSError as exc:
        collector.bad(where, f"cannot read image file {path}: {exc.strerror or exc}")
    return None


def _resolve(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _files_under(root: Path, suffixes: Iterable[str]) -> list[Path]:
    wanted = {s.lower() for s in suffixes}
    found = [
        p for p in root.rglob("*")
        if p.suffix.lower() in wanted and not _is_hidden(p.relative_to(root)) and p.is_file()
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _missing_column(where: str, kind: str, wanted: Sequence[str], columns: Sequence[str], hint: str) -> DataError:
    want = " or ".join(repr(w) for w in wanted)
    have = ", ".join(columns) if columns else "none"
    return DataError(f"{where}: no {kind} column {want}; columns present: {have}. {hint}".rstrip())


# --------------------------------------------------------------------------- Parquet


_SHARD_STEM = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


def _split_of(rel: Path) -> Optional[str]:
    m = _SHARD_STEM.match(rel.stem)
    if m:
        return m.group("split")
    if rel.stem.lower() in KNOWN_SPLITS:
        return rel.stem
    for part in reversed(rel.parts[:-1]):
        if part.lower() in KNOWN_SPLITS:
            return part
    return None


def _parquet_files(root: Path, split: Optional[str]) -> list[Path]:
    files = _files_under(root, [".parquet"])
    by_split: dict[Optional[str], list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f.relative_to(root)), []).append(f)
    named = sorted(s for s in by_split if s is not None)
    if split is not None:
        if split not in by_split:
            raise DataError(
                f"{root}: no Parquet files for split {split!r}; splits found: {', '.join(named) or 'none'}"
            )
        return by_split[split]
    if len(named) > 1:
        raise DataError(
            f"{root} holds several splits ({', '.join(named)}); point at one split's file or folder, "
            f"or pass split=, so that evaluation data never leaks into training"
        )
    return files


def _arrow_kind(t: Any) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        return "struct" if "bytes" in names or "path" in names else "other"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or getattr(pa.types, "is_binary_view", lambda _: False)(t):
        return "binary"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return "string"
    return "other"


def _parquet_columns(schema: Any, file: Path, image_column: Optional[str], text_column: Optional[str]) -> tuple[str, str]:
    names = list(schema.names)
    described = [f"{n!r} ({schema.field(n).type})" for n in names]
    if image_column is not None:
        if image_column not in names:
            raise _missing_column(str(file), "image", [image_column], described, "")
        if _arrow_kind(schema.field(image_column).type) == "other":
            raise DataError(
                f"{file}: image column {image_column!r} has type {schema.field(image_column).type}; "
                "expected {bytes, path} structs, binary, or path strings"
            )
        image_col = image_column
    elif DEFAULT_IMAGE_COLUMN in names and _arrow_kind(schema.field(DEFAULT_IMAGE_COLUMN).type) != "other":
        image_col = DEFAULT_IMAGE_COLUMN
    else:
        candidates = [n for n in names if _arrow_kind(schema.field(n).type) in ("struct", "binary")]
        if not candidates:
            raise _missing_column(str(file), "image", [DEFAULT_IMAGE_COLUMN], described,
                                  "Expected {bytes, path} structs or binary; name one with image_column.")
        image_col = candidates[0]
    wanted = [text_column] if text_column is not None else list(TEXT_COLUMN_CANDIDATES)
    found = [n for n in wanted if n in names]
    if not found:
        raise _missing_column(str(file), "text", wanted, described,
                              "" if text_column is not None else "Name one with text_column.")
    text_col = found[0]
    if text_col == image_col:
        raise DataError(f"{file}: column {text_col!r} cannot be both the image and the text column")
    if _arrow_kind(schema.field(text_col).type) != "string":
        raise DataError(
            f"{file}: text column {text_col!r} has type {schema.field(text_col).type}; expected strings "
            "(numbers would lose leading zeros). Name another column with text_column, or store labels as strings."
        )
    return image_col, text_col


def _load_parquet(path: Path, collector: _Collector, image_column: Optional[str],
                  text_column: Optional[str], split: Optional[str]) -> tuple[int, int]:
    import pyarrow.parquet as pq

    if path.is_dir():
        files = _parquet_files(path, split)
        if not files:
            raise DataError(f"{path}: no Parquet files found")
        root: Optional[Path] = path
    else:
        if split is not None:
            raise DataError(f"{path}: split={split!r} applies only to a directory of Parquet files")
        files, root = [path], None
    rows_seen = 0
    for file in files:
        try:
            pf = pq.ParquetFile(file)
            schema = pf.schema_arrow
        except Exception as exc:
            raise DataError(f"{file}: cannot read Parquet file ({type(exc).__name__}: {exc})") from exc
        image_col, text_col = _parquet_columns(schema, file, image_column, text_column)
        prefix = "" if root is None else file.relative_to(root).with_suffix("").as_posix() + ":"
        row = 0
        try:
            batches = pf.iter_batches(batch_size=512, columns=[image_col, text_col])
            for batch in batches:
                images = batch.column(0).to_pylist()
                texts = batch.column(1).to_pylist()
                for cell, text in zip(images, texts):
                    where = f"{file} row {row}"
                    data = _parquet_image_bytes(cell, file, where, collector)
                    if data is not None:
                        collector.add(f"{prefix}{row}", where, data, text)
                    row += 1
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{file}: cannot read Parquet data near row {row} ({type(exc).__name__}: {exc})") from exc
        rows_seen += row
    return rows_seen, len(files)


def _parquet_image_bytes(cell: Any, file: Path, where: str, collector: _Collector) -> Optional[bytes]:
    if isinstance(cell, dict):
        data, ref = cell.get("bytes"), cell.get("path")
        if data:
            return bytes(data)
        if ref:
            return _read_image_file(_resolve(file.parent, ref), where, collector)
        collector.bad(where, "image struct has neither bytes nor path")
        return None
    if isinstance(cell, (bytes, bytearray)):
        if not cell:
            collector.bad(where, "empty image bytes")
            return None
        return bytes(cell)
    if isinstance(cell, str) and cell:
        return _read_image_file(_resolve(file.parent, cell), where, collector)
    collector.bad(where, "missing image")
    return None


# --------------------------------------------------------------------------- image folder


def _load_image_folder(root: Path, collector: _Collector) -> int:
    files = _files_under(root, IMAGE_EXTENSIONS)
    for f in files:
        rel = f.relative_to(root).as_posix()
        data = _read_image_file(f, str(f), collector)
        if data is not None:
            collector.add(rel, str(f), data, f.stem)
    return len(files)


# --------------------------------------------------------------------------- manifests


def _manifest_columns(file: Path, columns: Sequence[str], image_column: Optional[str],
                      text_column: Optional[str]) -> tuple[str, str]:
    image_col = image_column or DEFAULT_IMAGE_COLUMN
    described = [repr(c) for c in columns]
    if image_col not in columns:
        raise _missing_column(str(file), "image", [image_col], described,
                              "The image column holds paths relative to the manifest's directory, or absolute.")
    wanted = [text_column] if text_column is not None else list(TEXT_COLUMN_CANDIDATES)
    found = [c for c in wanted if c in columns]
    if not found:
        raise _missing_column(str(file), "text", wanted, described, "")
    return image_col, found[0]


class _Ids:
    """Sample ids for manifest rows: the image path as written, made unique with the row."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def make(self, value: str, row: int) -> str:
        sid = value if value not in self.used else f"{value}#{row}"
        self.used.add(sid)
        return sid


def _manifest_row(file: Path, row: int, where: str, record: dict, image_col: str, text_col: str,
                  collector: _Collector, ids: _Ids) -> None:
    if image_col not in record:
        return collector.bad(where, f"missing {image_col!r}")
    if text_col not in record:
        return collector.bad(where, f"missing {text_col!r}")
    ref = record[image_col]
    if not isinstance(ref, str) or not ref.strip():
        return collector.bad(where, f"{image_col!r} must be a non-empty path string, got {ref!r}")
    ref = ref.strip()
    data = _read_image_file(_resolve(file.parent, ref), where, collector)
    if data is not None:
        collector.add(ids.make(ref, row), where, data, record[text_col])


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from exc


def _load_jsonl(file: Path, collector: _Collector, image_column: Optional[str], text_column: Optional[str]) -> int:
    records: list[tuple[int, int, Any]] = []  # (row, line, record or error text)
    columns: list[str] = []
    seen: set[str] = set()
    row = 0
    for line_no, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            record = f"invalid JSON ({exc.msg} at column {exc.colno})"
        else:
            if isinstance(record, dict):
                for key in record:
                    if key not in seen:
                        seen.add(key)
                        columns.append(key)
            else:
                record = f"expected a JSON object, got {type(record).__name__}"
        records.append((row, line_no, record))
        row += 1
    if not records:
        raise DataError(f"{file}: empty dataset (0 rows)")
    image_col = text_col = ""
    if any(isinstance(r, dict) for _, _, r in records):
        image_col, text_col = _manifest_columns(file, columns, image_column, text_column)
    ids = _Ids()
    for row, line_no, record in records:
        where = f"{file} row {row} (line {line_no})"
        if isinstance(record, str):
            collector.bad(where, record)
        else:
            _manifest_row(file, row, where, record, image_col, text_col, collector, ids)
    return len(records)


def _load_csv(file: Path, collector: _Collector, image_column: Optional[str], text_column: Optional[str]) -> int:
    reader = csv.DictReader(io.StringIO(_read_text(file), newline=""))
    try:
        columns = [c for c in (reader.fieldnames or []) if c is not None]
        if not columns:
            raise DataError(f"{file}: empty dataset (no header, 0 rows)")
        image_col, text_col = _manifest_columns(file, columns, image_column, text_column)
        ids = _Ids()
        row = 0
        for record in reader:
            where = f"{file} row {row} (line {reader.line_num})"
            record = {k: v for k, v in record.items() if k is not None and v is not None}
            _manifest_row(file, row, where, record, image_col, text_col, collector, ids)
            row += 1
    except csv.Error as exc:
        raise DataError(f"{file} line {reader.line_num}: malformed CSV ({exc})") from exc
    if row == 0:
        raise DataError(f"{file}: empty dataset (header only, 0 rows)")
    return row


# --------------------------------------------------------------------------- entry points


def detect_format(path: PathLike) -> tuple[str, Path]:
    """`(format, path_to_read)`; format is one of parquet, image-folder, jsonl, csv."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: path does not exist")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            return "parquet", p
        if suffix in MANIFEST_SUFFIXES:
            return MANIFEST_SUFFIXES[suffix], p
        raise DataError(
            f"{p}: unknown dataset format {suffix or '(no suffix)'!r}; expected a .parquet file, a "
            ".jsonl/.csv manifest, or a directory (Parquet files, or images named by their labels)"
        )
    if not p.is_dir():
        raise DataError(f"{p}: neither a file nor a directory")
    if _files_under(p, [".parquet"]):
        return "parquet", p
    manifests = sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in MANIFEST_SUFFIXES
                       and not c.name.startswith("."))
    if len(manifests) > 1:
        raise DataError(f"{p} holds several manifests ({', '.join(m.name for m in manifests)}); point at one")
    if manifests:
        return MANIFEST_SUFFIXES[manifests[0].suffix.lower()], manifests[0]
    if _files_under(p, IMAGE_EXTENSIONS):
        return "image-folder", p
    raise DataError(
        f"{p}: no dataset found: expected Parquet files, a .jsonl/.csv manifest, "
        f"or images ({', '.join(sorted(IMAGE_EXTENSIONS))}) named by their labels"
    )


def load_samples(path: PathLike, *, text_column: Optional[str] = None, image_column: Optional[str] = None,
                 on_bad_sample: OnBadSample = "error", split: Optional[str] = None) -> LoadedDataset:
    """Load and validate every sample under `path` (see the module docstring for formats).

    Raises DataError for anything unusable. With `on_bad_sample="skip"`, bad rows
    (corrupt or missing image, empty label) are counted in `.skipped` instead; a
    missing column, an unknown format or an empty dataset is still an error.
    `split` picks one split from a Parquet directory that holds several.
    """
    collector = _Collector(on_bad_sample)
    fmt, target = detect_format(path)
    if split is not None and fmt != "parquet":
        raise DataError(f"{target}: split={split!r} applies only to a Parquet directory, this is {fmt}")
    if fmt == "parquet":
        rows, n_files = _load_parquet(target, collector, image_column, text_column, split)
        source = f"parquet {target}" + (f" ({n_files} files)" if n_files > 1 else "")
    elif fmt == "image-folder":
        rows = _load_image_folder(target, collector)
        source = f"image folder {target}"
    elif fmt == "jsonl":
        rows = _load_jsonl(target, collector, image_column, text_column)
        source = f"jsonl manifest {target}"
    else:
        rows = _load_csv(target, collector, image_column, text_column)
        source = f"csv manifest {target}"
    return collector.finish(source, fmt, rows)


def split_samples(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split into `(train, val)`; the same inputs always give the same split.

    The validation split holds `round(len(samples) * val_fraction)` samples; both
    splits keep the input order. An empty split is a DataError.
    """
    n = len(samples)
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise DataError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    n_val = int(math.floor(n * val_fraction + 0.5))
    if n_val == 0 or n_val == n:
        empty = "validation" if n_val == 0 else "training"
        raise DataError(
            f"val_fraction={val_fraction} of {n} sample(s) leaves the {empty} split empty "
            f"({n_val} validation, {n - n_val} training); use more data or another fraction"
        )
    order = list(range(n))
    random.Random(f"mdsweep-split:{seed}").shuffle(order)
    val_idx = set(order[:n_val])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def load_unlabelled_images(paths: Sequence[PathLike]) -> list[Sample]:
    """Image files, and folders searched recursively, as samples without labels (for prediction).

    Every image is decoded here, so a corrupt file is reported by name before any
    model work starts. Sample ids are the paths as given (folder entries: the
    folder joined with the relative path), in sorted order within a folder.
    """
    samples: list[Sample] = []
    for given in paths:
        p = Path(given).expanduser()
        if p.is_dir():
            files = _files_under(p, IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
        elif p.is_file():
            files = [p]
        else:
            raise DataError(f"{p}: no such image file or folder")
        for f in files:
            try:
                data = f.read_bytes()
                decode_image(data)
            except Exception as exc:  # OSError, or PIL's many types for corrupt input
                raise DataError(f"{f}: unreadable image ({type(exc).__name__}: {exc})") from None
            samples.append(Sample(str(f), data, ""))
    if not samples:
        raise DataError("no images given")
    return samples
