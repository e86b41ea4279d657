"""Files that are either whole or absent."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A hidden temporary path beside `path` to write to; on success it replaces `path` in one rename, on any
    failure it is removed. Readers (a query while a sweep writes, a trial resuming after a kill) see the old
    file or the new one, never half of one. The name is unique, so concurrent writers do not collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
