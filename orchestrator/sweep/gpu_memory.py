"""`--gpu-memory-per-trial auto`: each trial's GPU share from its own predicted memory, corrected by what
finished trials measured, and memory shapes that ran out of memory kept out of the search.

Two driver-side pieces share one `MemoryBook` per sweep:
- the searcher records every finished trial's measured peak and outcome by shape, and
  rejects (and resamples) a proposal whose shape already ran out of memory or is
  predicted to fit no GPU;
- `AutoGpuResources`, the per-trial resource function Ray Tune calls when it creates a
  trial, asks for prediction × calibration × margin, never less than the peak measured
  for that shape × margin, plus the CUDA context, as a fraction of the smallest GPU.
The trial caps its allocator at the share it was given, so one trial cannot push a
neighbour out. Tune unpickles the resource function into its own copy, so the book is
found by sweep name in this module's registry rather than held by reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from orchestrator.cluster.resources import round_gpu_fraction
from orchestrator.sweep.trainable import job_config_from
from trainer.job_config import JobConfig
from trainer.memory.estimate import CUDA_CONTEXT_BYTES, estimate_memory, memory_shape

MARGIN = 1.15  # headroom over a prediction or a measurement: allocator fragmentation, other libraries


@dataclass
class MemoryBook:
    """What a sweep has learnt about memory, by shape. Saved with the searcher, so a resumed sweep keeps it."""

    gpu_bytes: Optional[int] = None  # the smallest GPU trials may land on, when known
    workers: int = 1  # the sweep's workers per trial: needs and peaks are one rank's at this count
    measured: dict[tuple, int] = field(default_factory=dict)  # shape -> largest peak measured
    predicted: dict[tuple, int] = field(default_factory=dict)  # shape -> allocator peak predicted
    out_of_memory: set[tuple] = field(default_factory=set)  # shapes that ended oom
    rejected: int = 0  # proposals not run because their shape cannot fit

    def calibration(self) -> float:
        """Measured / predicted over the shapes seen so far, the largest ratio (1 before any measurement): applied
        to shapes not yet measured, so a model that under-predicts on this hardware is corrected everywhere."""
        ratios = [self.measured[k] / self.predicted[k] for k in self.measured if self.predicted.get(k)]
        return max(ratios) if ratios else 1.0

    def need(self, config: JobConfig, workers: Optional[int] = None) -> int:
        """Bytes of GPU one rank of this configuration should be given on `workers` workers (default: the
        sweep's), context included."""
        workers = workers or self.workers
        key = self._key(config, workers)
        predicted = self.predicted.setdefault(key, estimate_memory(config, workers=workers).allocator_peak)
        allocator = max(predicted * self.calibration(), self.measured.get(key, 0))
        return int(allocator * MARGIN) + CUDA_CONTEXT_BYTES

    @staticmethod
    def _key(config: JobConfig, workers: int) -> tuple:
        """A shape at a worker count: one rank's memory differs by count (a 1-worker key is the bare shape, as in
        books saved before the count was part of it)."""
        shape = memory_shape(config)
        return shape if workers == 1 else (*shape, ("workers", workers))

    def observe(self, config: JobConfig, outcome: str, peak_bytes: Optional[int]) -> None:
        key = self._key(config, self.workers)
        self.predicted.setdefault(key, estimate_memory(config, workers=self.workers).allocator_peak)
        if outcome == "oom":
            self.out_of_memory.add(key)
        elif peak_bytes:
            self.measured[key] = max(self.measured.get(key, 0), int(peak_bytes))

    def cannot_fit(self, config: JobConfig) -> Optional[str]:
        """Why this configuration is not worth running, or None."""
        if self._key(config, self.workers) in self.out_of_memory:
            return "a trial of the same memory shape ran out of memory"
        if self.gpu_bytes and self.need(config) > self.gpu_bytes:
            return f"predicted to need more than a whole {self.gpu_bytes / 2**30:.0f} GiB GPU"
        return None


_BOOKS: dict[str, MemoryBook] = {}


def book_for(sweep: str) -> MemoryBook:
    return _BOOKS.setdefault(sweep, MemoryBook())


def register_book(sweep: str, book: MemoryBook) -> None:
    _BOOKS[sweep] = book


class AutoGpuResources:
    """The per-trial resource function for `tune.with_resources`: {"cpu": ..., "gpu": this trial's share}."""

    def __init__(self, sweep: str, fixed: dict[str, Any], cpus: float, gpu_bytes: int,
                 memory_bytes: Optional[int] = None) -> None:
        self.sweep = sweep
        self.fixed = dict(fixed)
        self.cpus = cpus
        self.gpu_bytes = gpu_bytes
        self.memory_bytes = memory_bytes

    def fraction_of(self, need_bytes: int) -> float:
        return min(1.0, round_gpu_fraction(need_bytes / self.gpu_bytes))

    def __call__(self, config: dict[str, Any]) -> dict[str, float]:
        need = book_for(self.sweep).need(job_config_from(self.fixed, config))
        resources = {"cpu": float(self.cpus), "gpu": self.fraction_of(need)}
        if self.memory_bytes:
            resources["memory"] = float(self.memory_bytes)
        return resources
