"""The on-disk form of a preprocessed dataset: every sample's uint8 crops in one flat file, plus an index.

    crops.u8       the crops of sample 0, then sample 1, ... (uint8, [n_crops, crop, crop, 3] each)
    index.parquet  per sample: sample_id, text, offset and byte length in crops.u8, tiling, CRC-32 of its bytes
    meta.json      format version, geometry, counts, total size, what was skipped while building

A reader fetches one sample's crops with a positioned read (`os.pread`), so a
training process holds only the batch it works on, and the file's pages live once
in the OS page cache however many trials on the node read them. Whether an entry
can be trusted is checked when it is opened (every size adds up: a truncated file
is caught) and each sample's CRC when it is read (a flipped byte is caught, and
the entry is marked so that the next open rebuilds it).
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

FORMAT_VERSION = 1
CROPS_FILE, INDEX_FILE, META_FILE = "crops.u8", "index.parquet", "meta.json"
CORRUPT_MARK = "corrupt"  # written into an entry found altered: the next open rebuilds it


class CacheEntryInvalid(Exception):
    """An entry that must not be trusted (cut short, altered, another format); the message says what."""


@dataclass(frozen=True)
class StoredSample:
    """What the index says about one sample; its crops stay on disk until asked for."""

    sample_id: str
    text: str
    offset: int
    n_crops: int
    tiling: tuple[int, int]
    crc: int


class CropStoreWriter:
    """Appends samples to a new entry directory; `finish` writes the index and meta last."""

    def __init__(self, directory: Path, crop_size: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=False)
        self.crop_size = crop_size
        self._file = open(self.directory / CROPS_FILE, "wb")
        self._rows: dict[str, list[Any]] = {k: [] for k in ("sample_id", "text", "offset", "n_crops", "rows",
                                                              "cols", "crc")}
        self._offset = 0

    def __len__(self) -> int:
        return len(self._rows["sample_id"])

    def append(self, sample_id: str, text: str, crops: np.ndarray, tiling: tuple[int, int]) -> None:
        if crops.dtype != np.uint8 or crops.shape[1:] != (self.crop_size, self.crop_size, 3):
            raise ValueError(f"crops of {sample_id!r} are {crops.dtype} {crops.shape}, expected uint8 "
                             f"[n, {self.crop_size}, {self.crop_size}, 3]")
        data = np.ascontiguousarray(crops).tobytes()
        self._file.write(data)
        for key, value in (("sample_id", sample_id), ("text", text), ("offset", self._offset),
                           ("n_crops", len(crops)), ("rows", tiling[0]), ("cols", tiling[1]),
                           ("crc", zlib.crc32(data))):
            self._rows[key].append(value)
        self._offset += len(data)

    def finish(self, meta: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        pq.write_table(pa.table(self._rows), self.directory / INDEX_FILE)
        full = {**meta, "format": FORMAT_VERSION, "crop_size": self.crop_size, "n_samples": len(self),
                "crops_bytes": self._offset}
        (self.directory / META_FILE).write_text(json.dumps(full, indent=1))

    def abandon(self) -> None:
        self._file.close()


class CropStore:
    """A finished entry, opened read-only; `crops(i)` reads sample i's crops from disk."""

    def __init__(self, directory: Path) -> None:
        self._fd: Optional[int] = None
        self.directory = Path(directory)
        self.meta, self.samples = _read_checked(self.directory)
        self.crop_size = int(self.meta["crop_size"])
        self._fd = os.open(self.directory / CROPS_FILE, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.samples)

    def crops(self, i: int) -> np.ndarray:
        s = self.samples[i]
        size = s.n_crops * self.crop_size * self.crop_size * 3
        data = os.pread(self._fd, size, s.offset)
        if len(data) != size or zlib.crc32(data) != s.crc:
            reason = f"the crops of sample {s.sample_id!r} do not match their checksum"
            (self.directory / CORRUPT_MARK).write_text(reason)
            raise CacheEntryInvalid(f"{self.directory}: {reason} (the file was altered after it was written); the "
                                    "entry is marked, and the next job that opens it rebuilds it")
        return np.frombuffer(data, dtype=np.uint8).reshape(s.n_crops, self.crop_size, self.crop_size, 3)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def _read_checked(directory: Path) -> tuple[dict[str, Any], list[StoredSample]]:
    """meta and index of an entry, after checking that they describe the crops file exactly."""
    import pyarrow.parquet as pq

    if (directory / CORRUPT_MARK).exists():
        raise CacheEntryInvalid(f"{directory}: marked corrupt ({(directory / CORRUPT_MARK).read_text()})")
    try:
        meta = json.loads((directory / META_FILE).read_text())
        index = pq.read_table(directory / INDEX_FILE).to_pydict()
        size = (directory / CROPS_FILE).stat().st_size
    except FileNotFoundError as e:
        raise CacheEntryInvalid(f"{directory}: {Path(e.filename).name} is missing") from None
    except Exception as e:  # a cut JSON or Parquet file: pyarrow and json raise many types
        raise CacheEntryInvalid(f"{directory}: unreadable ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CacheEntryInvalid(f"{directory}: format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
    n = len(index.get("sample_id", []))
    per_crop = int(meta["crop_size"]) ** 2 * 3
    expected = sum(index["n_crops"]) * per_crop
    if n != meta.get("n_samples") or size != meta.get("crops_bytes") or size != expected:
        raise CacheEntryInvalid(f"{directory}: {CROPS_FILE} holds {size} bytes for {n} samples, the index and meta "
                                f"say {expected} and {meta.get('crops_bytes')} bytes for {meta.get('n_samples')}")
    samples = [StoredSample(*row[:4], (row[4], row[5]), row[6]) for row in zip(
        index["sample_id"], index["text"], index["offset"], index["n_crops"], index["rows"], index["cols"],
        index["crc"])]
    return meta, samples
