"""MKL's code path is pinned when `trainer` is imported, unless the user chose one.

What it buys, bit-identical numbers across processes, is held by test_cli_train's crashed-and-resumed job
ending with the weights of an uninterrupted run: without the pin it failed 3 runs in 4 on the project's
machine."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.cpu_math import AVX512_FLAGS, MKL_PATH_VARIABLE, cpu_flags, mkl_path_for, pin_mkl_code_path


@pytest.mark.parametrize("flags, expected", [(AVX512_FLAGS | {"avx2"}, "AVX512,STRICT"),
                                             ({"avx2", "avx512f"}, "AVX2,STRICT"),  # avx512f alone: not enough
                                             ({"sse2"}, None), (set(), None)])
def test_the_path_follows_the_cpu(monkeypatch, flags, expected):
    monkeypatch.delenv(MKL_PATH_VARIABLE, raising=False)
    assert pin_mkl_code_path(flags) == expected
    assert os.environ.get(MKL_PATH_VARIABLE) == expected


def test_a_users_choice_is_kept(monkeypatch):
    monkeypatch.setenv(MKL_PATH_VARIABLE, "COMPATIBLE")
    assert pin_mkl_code_path(AVX512_FLAGS) is None
    assert os.environ[MKL_PATH_VARIABLE] == "COMPATIBLE"


def test_importing_trainer_pins_it_for_the_process_and_its_children():
    env = {k: v for k, v in os.environ.items() if k != MKL_PATH_VARIABLE}
    code = "import os, trainer, subprocess, sys; print(os.environ.get('MKL_CBWR')); sys.stdout.flush(); " \
           "subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"MKL_CBWR\"))'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == [str(mkl_path_for(cpu_flags()))] * 2  # this machine's path, in parent and child
