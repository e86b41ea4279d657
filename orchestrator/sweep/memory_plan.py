"""What a sweep's configurations need in GPU memory, per shape, and how many fit each GPU.

A shape is what the memory model reads from a configuration (`MEMORY_FIELDS`); the
learning rate and everything else that does not change memory collapse into one
shape, so a space with hundreds of configurations usually has a handful of shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from orchestrator.results.groups import build_expansions
from orchestrator.results.spaces import validate_space
from orchestrator.sweep.trainable import job_config_from
from trainer.job_config import JobConfig
from trainer.memory.estimate import MEMORY_FIELDS, MemoryEstimate, Workload, estimate_memory, memory_shape


@dataclass(frozen=True)
class ShapePlan:
    shape: dict[str, Any]  # the MEMORY_FIELDS values
    estimate: MemoryEstimate
    configurations: int  # probed configurations with this shape

    def trials_per_gpu(self, gpu_bytes: int) -> int:
        return int(gpu_bytes // self.estimate.device_total)


def plan_space(space: str, fixed: dict[str, Any], cross: Sequence[tuple[str, list[Any]]] = (), probes: int = 200,
               workload: Workload = Workload()) -> list[ShapePlan]:
    """Probe the space (random Optuna trials covering its branches) and estimate every distinct shape,
    largest first."""
    info = validate_space(space, fixed, probes=probes)
    counts: dict[tuple, int] = {}
    examples: dict[tuple, JobConfig] = {}  # one configuration per shape: all of a shape need the same memory
    for sample in info.samples:
        for expansion in build_expansions(1, 0, list(cross)):
            config = job_config_from(fixed, {**sample, **expansion})
            key = memory_shape(config)
            counts[key] = counts.get(key, 0) + 1
            examples.setdefault(key, config)
    plans = [ShapePlan(dict(key), estimate_memory(examples[key], workload=workload), count)
             for key, count in counts.items()]
    return sorted(plans, key=lambda p: (-p.estimate.device_total, str(sorted(p.shape.items()))))


def varying_fields(plans: Sequence[ShapePlan]) -> list[str]:
    """The shape fields that differ between shapes: the columns worth printing."""
    return [name for name in MEMORY_FIELDS if len({str(p.shape[name]) for p in plans}) > 1]
