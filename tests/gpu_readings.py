"""A trial job for sweep tests that need GPU memory readings on a machine without a GPU: the real job on CPU,
reporting as its peak the reading a GPU would give if the memory model were exactly 2x pessimistic, and the GPU
it stands in for as its device (the sweep learns only from peaks read on a GPU)."""
from __future__ import annotations

from trainer.job import run_job
from trainer.job_config import JobConfig, JobResult
from trainer.memory.estimate import estimate_memory


def run_job_with_half_the_predicted_peak(config: JobConfig, **kwargs) -> JobResult:
    result = run_job(config, **kwargs)
    if result.outcome == "ok":
        result.peak_memory_bytes = estimate_memory(config).allocator_peak // 2
        result.final_metrics["peak_memory_bytes"] = result.peak_memory_bytes
        result.rank_peak_memory_bytes = [result.peak_memory_bytes]
        result.hardware["device_name"] = "a logical GPU"
    return result
