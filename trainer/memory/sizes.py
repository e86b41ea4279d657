"""The per-job GPU cap applied, peak-memory readings on GPU or CPU, and a tracker of the bytes torch
allocates (the CPU measurement the memory model is checked against).

Sizes are read by the contract (`trainer.job_config.parse_bytes`, `cap_fraction`), so `JobConfig` checks
`max_gpu_memory` without this layer. torch is imported inside the functions that need it.
"""
from __future__ import annotations

import resource
import sys
import weakref
from typing import TYPE_CHECKING, Optional, Union

from trainer.job_config import cap_fraction

if TYPE_CHECKING:
    import torch


def apply_gpu_cap(cap: Optional[Union[str, int, float]], device: torch.device) -> Optional[int]:
    """Limit this process's CUDA caching allocator; returns the cap in bytes (None: no cap).

    Allocations beyond the cap raise `torch.OutOfMemoryError` in this process only,
    which is what keeps one trial from pushing a neighbour on the same GPU out.
    """
    import torch

    if cap is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = cap_fraction(cap, total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return int(fraction * total)


def reset_peak(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak allocator memory on CUDA; on CPU the process's peak resident set size."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def track_allocations():
    """A context manager counting the bytes of tensor storage that torch ops allocate inside it, on any
    device: `.live` now, `.peak` the most at once. It works on CPU, where torch keeps no allocator
    statistics, which is what lets the memory model be checked against real allocations without a GPU.
    Storage that existed before (parameters, inputs) is not counted, views and in-place results neither."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class AllocationTracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = 0
            self.peak = 0
            self._counted: set[int] = set()

        def _freed(self, address: int, size: int) -> None:
            self.live -= size
            self._counted.discard(address)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for tensor in tree_leaves(out):
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                address, size = storage.data_ptr(), storage.nbytes()
                if size == 0 or address in inputs or address in self._counted:
                    continue
                self._counted.add(address)
                self.live += size
                self.peak = max(self.peak, self.live)
                # storages keep their Python object while alive, so this runs when the memory is freed
                weakref.finalize(storage, self._freed, address, size)
            return out

    return AllocationTracker()
