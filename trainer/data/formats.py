"""The on-disk formats a dataset can come in (see trainer.data.dataset): Parquet in the Hugging Face layout, an image
folder named by labels, and JSONL/CSV manifests. Each reader feeds rows to a `RowCollector`, which validates them."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from trainer.data.samples import (DEFAULT_IMAGE_COLUMN, IMAGE_EXTENSIONS, KNOWN_SPLITS, TEXT_COLUMN_CANDIDATES, DataError,
                             RowCollector, files_under, missing_column, read_image_file, resolve_path)

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
    files = files_under(root, [".parquet"])
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
            raise missing_column(str(file), "image", [image_column], described, "")
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
            raise missing_column(str(file), "image", [DEFAULT_IMAGE_COLUMN], described,
                                  "Expected {bytes, path} structs or binary; name one with image_column.")
        image_col = candidates[0]
    wanted = [text_column] if text_column is not None else list(TEXT_COLUMN_CANDIDATES)
    found = [n for n in wanted if n in names]
    if not found:
        raise missing_column(str(file), "text", wanted, described,
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


def load_parquet(path: Path, collector: RowCollector, image_column: Optional[str],
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
            # without pre-buffering: it would read every row group of the file up front (a 200 MB file held whole)
            pf = pq.ParquetFile(file, pre_buffer=False)
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


def _parquet_image_bytes(cell: Any, file: Path, where: str, collector: RowCollector) -> Optional[bytes]:
    if isinstance(cell, dict):
        data, ref = cell.get("bytes"), cell.get("path")
        if data is not None:  # empty bytes are an empty image, whatever the path beside them says
            return bytes(data)
        if ref:
            return read_image_file(resolve_path(file.parent, ref), where, collector)
        collector.bad(where, "image struct has neither bytes nor path")
        return None
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        return read_image_file(resolve_path(file.parent, cell), where, collector)
    collector.bad(where, "missing image")
    return None


# --------------------------------------------------------------------------- image folder


def load_image_folder(root: Path, collector: RowCollector) -> int:
    files = files_under(root, IMAGE_EXTENSIONS)
    for f in files:
        rel = f.relative_to(root).as_posix()
        data = read_image_file(f, str(f), collector)
        if data is not None:
            collector.add(rel, str(f), data, f.stem)
    return len(files)


# --------------------------------------------------------------------------- manifests


def _manifest_columns(file: Path, columns: Sequence[str], image_column: Optional[str],
                      text_column: Optional[str]) -> tuple[str, str]:
    image_col = image_column or DEFAULT_IMAGE_COLUMN
    described = [repr(c) for c in columns]
    if image_col not in columns:
        raise missing_column(str(file), "image", [image_col], described,
                              "The image column holds paths relative to the manifest's directory, or absolute.")
    wanted = [text_column] if text_column is not None else list(TEXT_COLUMN_CANDIDATES)
    found = [c for c in wanted if c in columns]
    if not found:
        raise missing_column(str(file), "text", wanted, described, "")
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
                  collector: RowCollector, ids: _Ids) -> None:
    if image_col not in record:
        return collector.bad(where, f"missing {image_col!r}")
    if text_col not in record:
        return collector.bad(where, f"missing {text_col!r}")
    ref = record[image_col]
    if not isinstance(ref, str) or not ref.strip():
        return collector.bad(where, f"{image_col!r} must be a non-empty path string, got {ref!r}")
    ref = ref.strip()
    data = read_image_file(resolve_path(file.parent, ref), where, collector)
    if data is not None:
        collector.add(ids.make(ref, row), where, data, record[text_col])


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from exc


def load_jsonl(file: Path, collector: RowCollector, image_column: Optional[str], text_column: Optional[str]) -> int:
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


def load_csv(file: Path, collector: RowCollector, image_column: Optional[str], text_column: Optional[str]) -> int:
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
