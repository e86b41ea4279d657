"""What a sweep's configurations need in GPU memory, per shape, and how many fit each GPU.

A shape is what the memory model reads from a configuration (`MEMORY_FIELDS`); the
learning rate and everything else that does not change memory collapse into one
shape, so a space with hundreds of configurations usually has a handful of shapes.
Each shape is also estimated per rank at every worker count of WORKER_CHOICES that
its batch splits over, so a plan says how many workers (GPUs) a trial needs on a card.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from orchestrator.results.groups import build_expansions
from orchestrator.results.spaces import validate_space
from orchestrator.sweep.trainable import job_config_from
from trainer.budget import worker_split_problem
from trainer.job_config import JobConfig
from trainer.memory.estimate import MEMORY_FIELDS, MemoryEstimate, Workload, estimate_memory, memory_shape


# the worker counts a plan shows and `--workers-per-trial auto` chooses from
WORKER_CHOICES = (1, 2, 4, 8)


def per_rank_estimates(config: JobConfig, workload: Workload = Workload()) -> dict[int, MemoryEstimate]:
    """One rank's estimate at each of WORKER_CHOICES that `config.batch_size` splits evenly over."""
    return {n: estimate_memory(config, workload=workload, workers=n) for n in WORKER_CHOICES
            if not worker_split_problem(config.batch_size, n)}


def fewest_workers(needs: dict[int, int], gpu_bytes: int) -> Optional[int]:
    """The smallest worker count whose per-rank need (bytes, by count) fits a GPU of `gpu_bytes`, or None."""
    return next((n for n in sorted(needs) if needs[n] <= gpu_bytes), None)


def workers_to_fit(configs: Sequence[JobConfig], gpu_bytes: int,
                   need: Callable[[JobConfig, int], int]) -> Optional[int]:
    """`--workers-per-trial auto`: the fewest of WORKER_CHOICES over which every configuration's batch splits and at
    which every configuration's per-rank `need(config, workers)` fits a GPU of `gpu_bytes`, or None. Every one, not
    most: a sweep's trials all run at one count, and a configuration left out would never be tried."""
    counts = [n for n in WORKER_CHOICES if not any(worker_split_problem(c.batch_size, n) for c in configs)]
    return fewest_workers({n: max(need(c, n) for c in configs) for n in counts}, gpu_bytes)


@dataclass(frozen=True)
class ShapePlan:
    shape: dict[str, Any]  # the MEMORY_FIELDS values
    estimate: MemoryEstimate  # at the plan's worker count: one rank's
    configurations: int  # probed configurations with this shape
    ranks: dict[int, MemoryEstimate] = field(default_factory=dict)  # one rank's estimate by worker count

    def trials_per_gpu(self, gpu_bytes: int) -> int:
        """How many ranks of such trials a GPU holds (trials, with one worker each)."""
        return int(gpu_bytes // self.estimate.device_total)

    def workers_needed(self, gpu_bytes: int) -> Optional[int]:
        """The fewest workers, one GPU each, whose ranks fit GPUs of `gpu_bytes` (None: no count does)."""
        return fewest_workers({n: e.device_total for n, e in self.ranks.items()}, gpu_bytes)


def plan_space(space: str, fixed: dict[str, Any], cross: Sequence[tuple[str, list[Any]]] = (), probes: int = 200,
               workload: Workload = Workload(), workers: int = 1) -> list[ShapePlan]:
    """Probe the space (random Optuna trials covering its branches) and estimate every distinct shape, per rank
    on `workers` workers and at every count of WORKER_CHOICES, largest first."""
    info = validate_space(space, fixed, probes=probes)
    counts: dict[tuple, int] = {}
    examples: dict[tuple, JobConfig] = {}  # one configuration per shape: all of a shape need the same memory
    for sample in info.samples:
        for expansion in build_expansions(1, 0, list(cross)):
            config = job_config_from(fixed, {**sample, **expansion})
            key = memory_shape(config)
            counts[key] = counts.get(key, 0) + 1
            examples.setdefault(key, config)
    plans = [ShapePlan(dict(key), estimate_memory(examples[key], workload=workload, workers=workers), count,
                       per_rank_estimates(examples[key], workload)) for key, count in counts.items()]
    return sorted(plans, key=lambda p: (-p.estimate.device_total, str(sorted(p.shape.items()))))


def varying_fields(plans: Sequence[ShapePlan]) -> list[str]:
    """The shape fields that differ between shapes: the columns worth printing."""
    return [name for name in MEMORY_FIELDS if len({str(p.shape[name]) for p in plans}) > 1]
