"""A trial's scratch folder on its node, and the removal of those that dead workers left behind.

A trial writes each checkpoint into a local folder before Tune copies it to the sweep's storage, and removes
the folder when it ends. A worker that is killed (the kernel's OOM killer, a crash, SIGKILL, a node agent
restarting it) never gets there, and at Moondream2 size each such folder holds gigabytes of weights and
optimizer state: a few retries fill a node's /tmp. So every folder carries a lock its owner holds for as long as
it lives (`flock`, which the kernel drops when the process dies, whatever killed it and across PID namespaces
that share the disk), and each new trial first removes the folders whose lock nobody holds.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

PREFIX = "mdsweep-trial-"
OWNER_FILE = ".owner"


def _locked(path: Path) -> Optional[int]:
    """An open descriptor of `path` holding its exclusive lock, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_orphans(root: Path) -> list[Path]:
    """Remove the scratch folders under `root` whose owner is gone; folders of live trials, folders without an
    owner file (not ours, or from before owner files existed) and everything else are left alone."""
    removed = []
    for folder in root.glob(f"{PREFIX}*"):
        owner = folder / OWNER_FILE
        if not owner.is_file():
            continue
        with contextlib.suppress(OSError):
            fd = _locked(owner)
            if fd is None:
                continue  # a live trial's
            try:
                shutil.rmtree(folder)
                removed.append(folder)
            finally:
                os.close(fd)
    return removed


@contextlib.contextmanager
def trial_scratch(root: Optional[Path] = None) -> Iterator[Path]:
    """A fresh scratch folder for this process's trial, removed when the trial ends; orphans go first.

    The folder gets its prefixed name only once its lock is held (it is made under another name and renamed),
    so `remove_orphans` in another process can never take a folder that is still being set up."""
    root = Path(root or tempfile.gettempdir())
    remove_orphans(root)
    staging = Path(tempfile.mkdtemp(prefix=".mdsweep-staging-", dir=root))
    fd = _locked(staging / OWNER_FILE)
    assert fd is not None  # a folder nobody else knows of
    folder = root / f"{PREFIX}{staging.name.rsplit('-', 1)[1]}"
    try:
        staging.rename(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)
