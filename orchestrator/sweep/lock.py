"""One driver per sweep: a lock held for the sweep's whole life, in its experiment folder and its results.

Two `mdsweep run --name X` started together on the same storage or results would both pass the "no such
sweep yet" check and merge into one sweep without it. The lock is an `fcntl` lock on a small file (`.mdsweep.lock`,
hidden from the Parquet readers) in each local place the sweep writes: the kernel releases it when its process
dies however it dies, so a lock left by a `kill -9` is recognised as stale and taken over, while one held by a
live driver refuses the second with a line naming who holds it. Object storage (s3://, gs://) has no such lock:
there only the results folder, when local, is locked.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from orchestrator.cluster.connect import is_remote_storage
from orchestrator.sweep.settings import SweepError

LOCK_FILE = ".mdsweep.lock"


class SweepLock:
    """Held from `acquire` until `release` (or the process's end); `stale` names a dead holder it replaced."""

    def __init__(self, name: str, folders: list[Path], purpose: str) -> None:
        self.name, self.folders, self.purpose = name, folders, purpose
        self._files: list = []
        self.stale: Optional[dict] = None

    def acquire(self) -> "SweepLock":
        try:
            for folder in self.folders:
                self._take(folder)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / LOCK_FILE, "a+")
        except OSError as e:
            raise SweepError(f"--name {self.name}: cannot create the sweep's lock in {folder} ({e.strerror})") \
                from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(handle)
            handle.close()
            raise SweepError(refusal(self.name, _describe(holder))) from None
        previous = _read(handle)
        if previous and self.stale is None:
            self.stale = previous  # a driver that died holding it: its kernel lock went with it
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self._files.append(handle)

    def release(self) -> None:
        for handle in self._files:
            try:
                handle.seek(0)
                handle.truncate()  # an empty lock file is a released one: no stale holder to report
            except OSError:
                pass
            handle.close()  # closing drops the kernel lock
        self._files = []

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def refusal(name: str, holder: str) -> str:
    return f"--name {name}: sweep {name} is being run now by another driver ({holder}); wait for it to end, or " \
           "choose another --name"


def _read(handle) -> Optional[dict]:
    handle.seek(0)
    text = handle.read().strip()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "holder unknown"
    return f"mdsweep {holder.get('purpose', '?')}, pid {holder.get('pid')} on {holder.get('host')} since " \
           f"{holder.get('since')}"


def running_driver(folder: Path) -> Optional[str]:
    """Who holds the lock in `folder` now (a live driver), described; None when nobody does."""
    path = folder / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(_read(handle))
    return None


def describe_stale(lock: SweepLock) -> Optional[str]:
    """A line for a lock taken over from a driver that died without releasing it, or None."""
    if not lock.stale:
        return None
    return f"took over the lock of a driver that ended without releasing it ({_describe(lock.stale)})"


def sweep_lock(name: str, experiment_path: str, results: str, purpose: str) -> SweepLock:
    """The lock of sweep `name` over its local experiment folder and its results partition."""
    from orchestrator.results.store import partition_dir

    folders = [] if is_remote_storage(experiment_path) else [Path(experiment_path)]
    folders.append(partition_dir(results, "sweeps", name))
    return SweepLock(name, folders, purpose)
