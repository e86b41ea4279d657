"""Raw (image, text) samples from three on-disk formats, validated when loaded: the entry points. The sample
and its row checks are in trainer.data.samples, the format readers in trainer.data.formats.

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

import math
import random
from pathlib import Path
from typing import Optional, Sequence

from trainer.data.formats import load_csv, load_image_folder, load_jsonl, load_parquet
from trainer.job_config import OnBadSample
from trainer.data.samples import (IMAGE_EXTENSIONS, MANIFEST_SUFFIXES, SKIP_HINT, TEXT_COLUMN_CANDIDATES, DataError,
                             LoadedDataset, PathLike, Sample, RowCollector, files_under, decode_image,
                             decoded)

__all__ = [
    "DataError",
    "Sample",
    "LoadedDataset",
    "load_samples",
    "split_samples",
    "split_indices",
    "read_rows",
    "decode_image",
    "detect_format",
    "IMAGE_EXTENSIONS",
    "TEXT_COLUMN_CANDIDATES",
    "SKIP_HINT",
]


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
    if files_under(p, [".parquet"]):
        return "parquet", p
    manifests = sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in MANIFEST_SUFFIXES
                       and not c.name.startswith("."))
    if len(manifests) > 1:
        raise DataError(f"{p} holds several manifests ({', '.join(m.name for m in manifests)}); point at one")
    if manifests:
        return MANIFEST_SUFFIXES[manifests[0].suffix.lower()], manifests[0]
    if files_under(p, IMAGE_EXTENSIONS):
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
    collector = RowCollector(on_bad_sample)
    source, fmt, rows = read_rows(path, collector, text_column=text_column, image_column=image_column, split=split)
    return collector.finish(source, fmt, rows)


def read_rows(path: PathLike, collector: RowCollector, *, text_column: Optional[str] = None,
              image_column: Optional[str] = None, split: Optional[str] = None) -> tuple[str, str, int]:
    """Feed every row under `path` to `collector`, which decides what becomes of it (kept, cropped into the
    preprocessing cache, or only hashed); returns (source description, format, rows seen)."""
    fmt, target = detect_format(path)
    if split is not None and fmt != "parquet":
        raise DataError(f"{target}: split={split!r} applies only to a Parquet directory, this is {fmt}")
    if fmt == "parquet":
        rows, n_files = load_parquet(target, collector, image_column, text_column, split)
        source = f"parquet {target}" + (f" ({n_files} files)" if n_files > 1 else "")
    elif fmt == "image-folder":
        rows = load_image_folder(target, collector)
        source = f"image folder {target}"
    elif fmt == "jsonl":
        rows = load_jsonl(target, collector, image_column, text_column)
        source = f"jsonl manifest {target}"
    else:
        rows = load_csv(target, collector, image_column, text_column)
        source = f"csv manifest {target}"
    return source, fmt, rows


def split_samples(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split into `(train, val)`; the same inputs always give the same split.

    The validation split holds `round(len(samples) * val_fraction)` samples; both
    splits keep the input order. An empty split is a DataError.
    """
    train_idx, val_idx = split_indices(len(samples), val_fraction, seed)
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """`split_samples` on positions: the preprocessing cache splits its rows without loading them."""
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
    in_val = set(order[:n_val])
    return [i for i in range(n) if i not in in_val], [i for i in range(n) if i in in_val]


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
            files = files_under(p, IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
        elif p.is_file():
            files = [p]
        else:
            raise DataError(f"{p}: no such image file or folder")
        for f in files:
            try:
                data = f.read_bytes()
            except OSError as exc:
                raise DataError(f"{f}: cannot read image file ({exc.strerror or exc})") from None
            image, why = decoded(data)
            if image is None:
                raise DataError(f"{f}: {why}")
            samples.append(Sample(str(f), data, ""))
    if not samples:
        raise DataError("no images given")
    return samples
