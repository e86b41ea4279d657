"""Ray Tune's experiment state on storage, made safe to resume: a last-known-good copy of its files, and the
repair of the one checkpoint Tune may delete too early.

Tune uploads its state (`experiment_state-*.json`, the searcher's `search_gen_state-*.json` and
`searcher-state-*.pkl`, named in orchestrator.cluster.tune_internals) by overwriting the files on storage in
place. A driver killed during that write leaves an empty or truncated file, and `Tuner.restore` then fails, or
restores a searcher that has forgotten its trials. The
driver therefore copies every complete state file to `.mdsweep-state/` (write to a temporary name, then rename),
and `mdsweep resume` puts a copy back wherever the file on storage is incomplete, or refuses when it has none.
"""
from __future__ import annotations

import fnmatch
import json
import pickletools
import time
from typing import Any, Optional

from orchestrator.cluster.connect import storage_filesystem, write_file_atomic
from orchestrator.cluster.tune_internals import (EXPERIMENT_STATE_FILE, STATE_FILE_PATTERNS, checkpoint_dir_name,
                                                 checkpoint_index, tune_callback_base, unfinished_trials)

BACKUP_DIR = ".mdsweep-state"


def complete(data: bytes) -> bool:
    """Whether a state file's bytes are whole: a pickle whose opcodes run to their STOP, or JSON that parses.

    Judged by the bytes, not the file name: Tune writes `search_gen_state-*.json` with cloudpickle, so a check by
    suffix would never find it whole, never back it up, and leave a resume with an empty one."""
    if not data:
        return False
    if data[:1] == b"\x80":  # a pickle's PROTO opcode
        try:
            for _ in pickletools.genops(data):
                pass
        except (ValueError, EOFError):
            return False
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _state_files(fs: Any, root: str) -> list[Any]:
    import pyarrow.fs as pafs

    return [info for info in fs.get_file_info(pafs.FileSelector(root))
            if info.type == pafs.FileType.File and any(fnmatch.fnmatch(info.base_name, p) for p in STATE_FILE_PATTERNS)]


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def back_up(experiment_path: str, seen: Optional[dict[str, tuple]] = None) -> int:
    """Copy every complete state file that changed since `seen` (name -> (size, mtime), updated in place) into
    the backup folder; returns how many were copied."""
    fs, root = storage_filesystem(experiment_path)
    seen = {} if seen is None else seen
    copied = 0
    for info in _state_files(fs, root):
        stamp = (info.size, info.mtime_ns)
        if seen.get(info.base_name) == stamp:
            continue
        data = _read(fs, info.path)
        if not complete(data):
            continue  # being written right now: the next pass takes it
        fs.create_dir(f"{root}/{BACKUP_DIR}", recursive=True)
        write_file_atomic(fs, f"{root}/{BACKUP_DIR}/{info.base_name}", data)
        seen[info.base_name] = stamp
        copied += 1
    return copied


class StateLost(Exception):
    """A state file is incomplete and no complete copy of it was kept: resuming would restart the search blind."""


def restore_incomplete(experiment_path: str) -> list[str]:
    """Put the backup copy back over every state file on storage that is incomplete; returns their names.

    Raises StateLost naming the files that are incomplete with no complete copy: Tune would otherwise resume
    with a searcher that has forgotten the trials it proposed, and propose them again."""
    fs, root = storage_filesystem(experiment_path)
    files = _state_files(fs, root)
    # Tune reads only the newest file of each kind (by name); an older session's cut file does not matter
    newest = {max(i.base_name for i in files if fnmatch.fnmatch(i.base_name, p)) for p in STATE_FILE_PATTERNS
              if any(fnmatch.fnmatch(i.base_name, p) for i in files)}
    restored, lost = [], []
    for info in files:
        if complete(_read(fs, info.path)):
            continue
        try:
            data = _read(fs, f"{root}/{BACKUP_DIR}/{info.base_name}")
        except (FileNotFoundError, OSError):
            data = b""
        if complete(data):
            write_file_atomic(fs, info.path, data)
            restored.append(info.base_name)
        elif info.base_name in newest:
            lost.append(info.base_name)
    if lost:
        raise StateLost(", ".join(lost))
    return restored


class StateBackup(tune_callback_base()):
    """Backs the experiment state up while the sweep runs (at most every `interval_s`) and when it ends."""

    def __init__(self, experiment_path: str, interval_s: float = 2.0) -> None:
        self.experiment_path = experiment_path
        self.interval_s = interval_s
        self._seen: dict[str, tuple] = {}
        self._last = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_seen": {}, "_last": 0.0}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.time() - self._last >= self.interval_s:
            self._last = time.time()
            back_up(self.experiment_path, self._seen)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        back_up(self.experiment_path, self._seen)


def _unfinished_trials(fs: Any, root: str) -> Optional[dict[str, Optional[str]]]:
    """Trial folder -> checkpoint folder the newest experiment state restores it from
    (None when it does not say), for trials that state has not finished; None if unreadable."""
    import pyarrow.fs as pafs

    try:
        states = sorted(e.path for e in fs.get_file_info(pafs.FileSelector(root))
                        if fnmatch.fnmatch(e.base_name, EXPERIMENT_STATE_FILE.format("*")))
        if not states:
            return None
        with fs.open_input_stream(states[-1]) as f:
            return unfinished_trials(json.loads(f.read().decode()))
    except Exception:
        return None  # an unknown format: consider every trial


def repair_checkpoints(experiment_path: str) -> list[str]:
    """Undo Tune's one unsafe window before a resume; returns the trial folders repaired.

    With `num_to_keep=1`, registering a trial's checkpoint N deletes N-1 at once,
    while the experiment state that still points at N-1 reaches storage a moment
    later. A driver killed in between leaves a state whose trial cannot be restored
    ("checkpoint ... does not exist on storage anymore"). N is complete (it is
    registered only once fully written), so the missing folder is recreated as a
    copy of N: the trial continues from its newest state.
    """
    import pyarrow.fs as pafs

    fs, root = storage_filesystem(experiment_path)
    repaired = []
    unfinished = _unfinished_trials(fs, root)
    for trial_dir in fs.get_file_info(pafs.FileSelector(root)):
        if trial_dir.type != pafs.FileType.Directory:
            continue
        if unfinished is not None and trial_dir.base_name not in unfinished:
            continue  # finished trials are not restored: nothing to repair
        indices = []
        for entry in fs.get_file_info(pafs.FileSelector(trial_dir.path)):
            index = checkpoint_index(entry.base_name)
            if index is not None and entry.type == pafs.FileType.Directory:
                indices.append(index)
        if not indices:
            continue
        newest = max(indices)
        wanted = unfinished.get(trial_dir.base_name) if unfinished is not None else None
        if wanted is None:  # the state does not say: assume the one before the newest
            if newest == 0:
                continue
            wanted = checkpoint_dir_name(newest - 1)
        wanted_index = checkpoint_index(wanted)
        if wanted_index is None or wanted_index >= newest or wanted_index in indices:
            continue
        src = f"{trial_dir.path}/{checkpoint_dir_name(newest)}"
        dst = f"{trial_dir.path}/{wanted}"
        fs.create_dir(dst, recursive=True)
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        repaired.append(trial_dir.base_name)
    return repaired


def drop_repair_copies(experiment_path: str, repaired: list[str]) -> None:
    """After the resumed run: remove repair copies that a newer checkpoint made redundant."""
    import pyarrow.fs as pafs

    fs, root = storage_filesystem(experiment_path)
    for name in repaired:
        entries = fs.get_file_info(pafs.FileSelector(f"{root}/{name}"))
        indices = sorted(i for e in entries if (i := checkpoint_index(e.base_name)) is not None)
        for i in indices[:-1]:  # Tune keeps one checkpoint per trial: anything older is a leftover copy
            fs.delete_dir(f"{root}/{name}/{checkpoint_dir_name(i)}")
