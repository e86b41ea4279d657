"""Whole-or-absent files, and the layering promise that a job runs without the sweep's libraries."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.files import atomic_path

ROOT = Path(__file__).resolve().parent.parent


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_importing_the_job_leaves_ray_and_optuna_out():
    """The README's promise: trainer/ runs a job alone, without the sweep's libraries loaded."""
    code = ("import sys, trainer.job, trainer.memory_model; "
            "print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), check=True)
    assert out.stdout.strip() == "[]"
