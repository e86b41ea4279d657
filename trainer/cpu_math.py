"""Pin MKL's code path, so that a job computes the same numbers in every process on a CPU.

Without this, MKL picks its kernels per call from the CPU and the memory alignment of the arrays, and
alignment differs between processes: two runs of the same seeded job, or a run and its `--resume`, then
part in the last bits after a few steps (seen on the project's AVX-512 machine: 4 identical processes gave
3 different gradients). MKL's conditional numerical reproducibility (`MKL_CBWR`, in STRICT mode) fixes the
path; it is read when MKL first computes, so this runs when `trainer` is imported, before any torch math.
A value the user has set is left alone; GPUs do not use MKL and are not affected.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

MKL_PATH_VARIABLE = "MKL_CBWR"
# MKL's AVX-512 path needs these (Skylake-X and later); the AVX2 path is about 15 % slower here
AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags, read from /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def mkl_path_for(flags: set[str]) -> Optional[str]:
    """The reproducible MKL path for a CPU with these flags; None where MKL has none worth pinning."""
    branch = "AVX512" if AVX512_FLAGS <= flags else "AVX2" if "avx2" in flags else None
    return f"{branch},STRICT" if branch else None


def pin_mkl_code_path(flags: Optional[set[str]] = None) -> Optional[str]:
    """Set MKL_CBWR for this process and the processes it starts; the value set, or None if left alone."""
    if MKL_PATH_VARIABLE in os.environ:
        return None
    path = mkl_path_for(cpu_flags() if flags is None else flags)
    if path is not None:
        os.environ[MKL_PATH_VARIABLE] = path
    return path
