"""A trial's scratch folder: gone when the trial ends, and when its worker is killed, gone once the next trial on
the node starts, while the folders of live trials and everything else stay."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.cluster.scratch import OWNER_FILE, PREFIX, remove_orphans, trial_scratch

ROOT = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pathlib import Path
from orchestrator.cluster.scratch import trial_scratch
with trial_scratch(Path(sys.argv[1])) as folder:
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.pt").write_bytes(b"x" * 1000)
    print(folder, flush=True)
    time.sleep(120)
"""


def _holder(root: Path) -> tuple[subprocess.Popen, Path]:
    """Another process in the middle of a trial: its scratch folder holds a checkpoint."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, Path(proc.stdout.readline().strip())


def test_the_folder_goes_when_the_trial_ends_even_by_an_exception(tmp_path):
    try:
        with trial_scratch(tmp_path) as folder:
            assert folder.name.startswith(PREFIX) and (folder / OWNER_FILE).is_file()
            (folder / "checkpoint").mkdir()
            raise RuntimeError("the job failed")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_killed_workers_folder_is_removed_by_the_next_trial_and_a_live_ones_is_kept(tmp_path):
    killed, killed_folder = _holder(tmp_path)
    live, live_folder = _holder(tmp_path)
    stranger = tmp_path / f"{PREFIX}not-ours"  # the prefix, but no owner file: left alone
    stranger.mkdir()
    unrelated = tmp_path / "results"
    unrelated.mkdir()
    try:
        killed.send_signal(signal.SIGKILL)  # no cleanup runs: the folder stays, its lock is released
        killed.wait(timeout=30)
        assert (killed_folder / "checkpoint" / "state.pt").is_file()
        with trial_scratch(tmp_path) as mine:
            assert not killed_folder.exists()
            assert (live_folder / "checkpoint" / "state.pt").is_file()
            assert stranger.is_dir() and unrelated.is_dir() and mine.is_dir()
            assert remove_orphans(tmp_path) == []  # its own folder is live too
    finally:
        live.kill()
        live.wait(timeout=30)
        killed.stdout.close()
        live.stdout.close()
    assert remove_orphans(tmp_path) == [live_folder]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([stranger.name, "results"])
