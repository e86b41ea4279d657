"""The preprocessing cache: a dataset's crops made once per node and read by every trial after.

Cropping is the slow part of reading a dataset at Moondream2's geometry (8 s and
0.86 GB per 1 000 captchas), and it is the same for every trial that reads the
same data at the same geometry. An entry is keyed by a content hash of the rows
(ids, labels, image bytes, how they were read) and of the crop geometry, so a
changed file or another model size gets its own entry and a stale one is never
used. Token ids are not cached: they depend on the model's tokenizer and prompt,
and 20 000 labels tokenise in well under a second.

Entries are built in a private directory and renamed into place whole, under a
per-key file lock: trials that start together build an entry once, the others
wait for it. An entry that fails its checks (trainer.data.crop_store) is rebuilt.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from PIL import Image

from trainer.model.config import VisionConfig
from trainer.data.crop_store import CacheEntryInvalid, CropStore, CropStoreWriter
from trainer.data.dataset import read_rows
from trainer.model.image_crops import make_crops
from trainer.data.samples import RowCollector, Sample

# bump when make_crops or image decoding changes what it produces: every entry made before is then stale
# (2: 16-bit grayscale images scaled to 8 bits instead of clipped white)
CROPS_VERSION = 2
CACHE_DIR_ENV = "MDSWEEP_CACHE_DIR"
PROGRESS_EVERY_S = 10.0

Say = Callable[[str], None]


def default_cache_dir() -> Path:
    """$MDSWEEP_CACHE_DIR, else $XDG_CACHE_HOME/mdsweep/crops, else ~/.cache/mdsweep/crops: on the node that
    reads the data, so every trial there shares one copy through the page cache."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mdsweep" / "crops"


@dataclass(frozen=True)
class ReadOptions:
    """How rows are read from a dataset: part of what an entry holds, so part of its key."""

    text_column: Optional[str] = None
    image_column: Optional[str] = None
    on_bad_sample: str = "error"


def geometry_of(vision: VisionConfig) -> dict[str, int]:
    """The vision settings make_crops reads; models that agree on these share crops."""
    return {"crop_size": vision.crop_size, "patch_size": vision.enc_patch_size,
            "overlap_margin": vision.overlap_margin, "max_crops": vision.max_crops}


class _HashingCollector(RowCollector):
    """Hashes every row as the loaders hand it over, without decoding or keeping images: the key of an entry
    costs one read of the files, not a preprocessing pass."""

    def __init__(self, on_bad_sample: str) -> None:
        super().__init__(on_bad_sample)
        self.digest = hashlib.sha256()

    def mix(self, *parts: object) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else repr(part).encode()
            self.digest.update(len(data).to_bytes(8, "little"))
            self.digest.update(data)

    def add(self, sample_id: str, where: str, data: Optional[bytes], text: object) -> None:
        self.mix("row", sample_id, text, data or b"")

    def bad(self, where: str, reason: str) -> None:
        self.mix("bad", where, reason)
        super().bad(where, reason)


def entry_key(path: str, read: ReadOptions, vision: VisionConfig) -> str:
    """The content hash naming the entry of `path` read with `read` and cropped at `vision`'s geometry."""
    hasher = _HashingCollector(read.on_bad_sample)
    read_rows(path, hasher, text_column=read.text_column, image_column=read.image_column)
    hasher.mix("crops", CROPS_VERSION, json.dumps(geometry_of(vision), sort_keys=True),
                json.dumps(asdict(read), sort_keys=True))
    return hasher.digest.hexdigest()[:32]


class _CroppingCollector(RowCollector):
    """Crops each row as it is read and appends it to the entry being built: nothing accumulates in memory."""

    def __init__(self, on_bad_sample: str, writer: CropStoreWriter, vision: VisionConfig,
                 progress: Callable[[int], None]) -> None:
        super().__init__(on_bad_sample)
        self.writer, self.vision, self.progress = writer, vision, progress

    def keep(self, sample: Sample, image: Image.Image) -> None:
        crops = make_crops(image, self.vision)
        self.writer.append(sample.sample_id, sample.text, crops.pixels, crops.tiling)
        self.progress(self.kept)


def open_cached(path: str, vision: VisionConfig, read: ReadOptions = ReadOptions(),
                cache_dir: Optional[Path] = None, say: Optional[Say] = None) -> CropStore:
    """The entry for `path` at `vision`'s geometry, built first if this node has none (or an invalid one).

    Raises trainer.data.dataset.DataError for a dataset that cannot be read, naming the file and row.
    """
    say = say or _stderr
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = entry_key(path, read, vision)
    entry = root / key
    store = _open_valid(entry)  # the common case: built before, no lock needed
    if store is not None:
        return store
    with _locked(root / f"{key}.lock", lambda: say(f"waiting for another process preparing {path} ({entry})")):
        store = _open_valid(entry, say)  # built by whoever held the lock before us
        if store is None:
            _build(path, read, vision, root, key, say)
            store = CropStore(entry)
    return store


def _open_valid(entry: Path, say: Optional[Say] = None) -> Optional[CropStore]:
    """The entry if it exists and passes its checks; else None, saying why through `say` when given."""
    if not entry.exists():
        return None
    try:
        return CropStore(entry)
    except CacheEntryInvalid as e:
        if say is not None:
            say(f"cache entry not usable, rebuilding it: {e}")
        return None


def _build(path: str, read: ReadOptions, vision: VisionConfig, root: Path, key: str, say: Say) -> None:
    """Crop every row into a private directory, then rename it into place whole (caller holds the key's lock)."""
    for leftover in root.glob(f".building-{key}-*"):  # a builder that died: nobody else builds this key now
        shutil.rmtree(leftover, ignore_errors=True)
    started = last = time.monotonic()
    building = root / f".building-{key}-{uuid.uuid4().hex[:8]}"
    writer = CropStoreWriter(building, vision.crop_size)

    def progress(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            say(f"preparing {path}: {done} samples cropped in {now - started:.0f} s")

    say(f"preparing {path}: cropping every image once for this node ({root / key})")
    collector = _CroppingCollector(read.on_bad_sample, writer, vision, progress)
    try:
        source, fmt, rows = read_rows(path, collector, text_column=read.text_column, image_column=read.image_column)
        collector.finish(source, fmt, rows)  # raises for a dataset with no usable row
        writer.finish({"key": key, "source": source, "format": fmt, "rows_seen": rows,
                       "skipped": collector.skipped, "skipped_reasons": collector.reasons,
                       "geometry": geometry_of(vision), "crops_version": CROPS_VERSION,
                       "read": asdict(read), "seconds": time.monotonic() - started})
    except BaseException:
        writer.abandon()
        shutil.rmtree(building, ignore_errors=True)
        raise
    target = root / key
    if target.exists():  # an invalid entry we are replacing
        shutil.rmtree(target)
    os.rename(building, target)
    say(f"prepared {path}: {len(writer)} samples in {time.monotonic() - started:.1f} s")


@contextlib.contextmanager
def _locked(lock_path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stderr(message: str) -> None:
    print(f"mdsweep: {message}", file=sys.stderr, flush=True)
