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
    Storage that existed before (parameters, inputs) is not counted, views and in-place results neither.

    Two things FSDP does are seen too: a wrapper tensor (DTensor) counts as the tensors it holds, and a storage
    grown or shrunk in place (`UntypedStorage.resize_`, how FSDP2 allocates and frees a gathered unit) counts by
    the bytes it gains or loses (one that existed before, by what it gains beyond its size then)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
    from torch.utils._pytree import tree_leaves

    def plain_tensors(tree) -> list[torch.Tensor]:
        found = []
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t):
                found += plain_tensors([getattr(t, name) for name in t.__tensor_flatten__()[0]])
            elif isinstance(t, torch.Tensor):
                found.append(t)
        return found

    class AllocationTracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = 0
            self.peak = 0
            self._counted: dict[int, int] = {}  # storage (its C++ address, stable across resizes) -> bytes counted
            self._before: dict[int, int] = {}  # storages made before, resized inside: their size then
            self._resize = None

        def _add(self, size: int) -> None:
            self.live += size
            self.peak = max(self.peak, self.live)

        def _freed(self, key: int) -> None:
            self.live -= self._counted.pop(key, 0)

        def _resized(self, storage, size: int) -> None:
            key = storage._cdata
            if key not in self._counted:
                self._before.setdefault(key, storage.nbytes())
                self._counted[key] = 0
                weakref.finalize(storage, self._freed, key)
            counted = max(size - self._before.get(key, 0), 0)
            self._add(counted - self._counted[key])
            self._counted[key] = counted

        def __enter__(self):
            tracker, self._resize = self, torch.UntypedStorage.resize_

            def resize_(storage, size):
                tracker._resized(storage, int(size))
                return tracker._resize(storage, size)

            torch.UntypedStorage.resize_ = resize_
            return super().__enter__()

        def __exit__(self, *exc):
            torch.UntypedStorage.resize_ = self._resize
            return super().__exit__(*exc)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in plain_tensors((args, kwargs))}
            for tensor in plain_tensors(out):
                storage = tensor.untyped_storage()
                address, size, key = storage.data_ptr(), storage.nbytes(), storage._cdata
                if size == 0 or address in inputs or key in self._counted:
                    continue
                self._counted[key] = size
                self._add(size)
                # storages keep their Python object while alive, so this runs when the memory is freed
                weakref.finalize(storage, self._freed, key)
            return out

    return AllocationTracker()
