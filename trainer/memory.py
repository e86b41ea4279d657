"""Memory sizes, the per-job GPU cap, and peak-memory readings on GPU or CPU."""
from __future__ import annotations

import re
import resource
import sys
from typing import Optional, Union

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: Union[str, int, float]) -> int:
    """'16GiB', '1.5e10', '512MB', 2**30 → bytes. Raises ValueError naming the bad text."""
    if isinstance(text, (int, float)):
        return int(text)
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size (e.g. 16GiB, 512MB, 1.5e10)")
    return int(float(match.group(1)) * _UNITS[unit])


def cap_fraction(cap: Union[str, int, float], total_bytes: int) -> float:
    """A cap given as bytes or as a fraction ('0.25') → the fraction of `total_bytes` it allows."""
    text = str(cap).strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value <= 1:
        return value
    fraction = parse_bytes(text) / total_bytes
    if not 0 < fraction <= 1:
        raise ValueError(f"GPU memory cap {cap!r} is not within the device's {total_bytes / 2**30:.1f} GiB")
    return fraction


def apply_gpu_cap(cap: Optional[Union[str, int, float]], device: torch.device) -> Optional[int]:
    """Limit this process's CUDA caching allocator; returns the cap in bytes (None: no cap).

    Allocations beyond the cap raise `torch.OutOfMemoryError` in this process only,
    which is what keeps one trial from pushing a neighbour on the same GPU out.
    """
    if cap is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = cap_fraction(cap, total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return int(fraction * total)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak allocator memory on CUDA; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
