"""Per-trial resources: parse sizes, turn GPU memory into a GPU fraction, check fit.

Ray enforces none of these physically: `GPU: 0.25` and `memory` only steer
scheduling (admission control). So a trial that asks for GPU memory also gets the
same number as its own allocator cap (`JobConfig.max_gpu_memory`), and a trial
that takes a fraction of a GPU without a memory figure is capped at that fraction:
one trial's growth cannot push a neighbour on the same GPU out of memory.
"""
from __future__ import annotations

import math
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from trainer.job_config import parse_bytes

# Ray schedules fractional GPUs in steps of 1e-4.
GPU_GRANULARITY = 10_000
# What the driver of a trial on several workers (--workers-per-trial N > 1) reserves: it only relays its workers'
# reports and checkpoints to Tune (Ray Train's controller takes none), so a small share, but not none, so that
# Tune never starts more drivers than the CPUs can hold
DRIVER_CPUS = 0.25


class ResourceError(ValueError):
    """A resource request that is malformed or cannot be met by the cluster."""


def parse_size(text: str, flag: str = "size") -> int:
    """A size flag ('16GiB', '512MB', '1.5e10') in bytes; errors name the flag."""
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise ResourceError(f"{flag}: {exc}") from None


def format_size(n: Optional[float]) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def is_auto(gpu_memory_per_trial: Optional[str]) -> bool:
    """`--gpu-memory-per-trial auto`: each trial's share from its predicted memory (orchestrator.sweep.gpu_memory)."""
    return bool(gpu_memory_per_trial) and gpu_memory_per_trial.strip().lower() == "auto"


def round_gpu_fraction(x: float) -> float:
    """Round a GPU share up to Ray's granularity (never down: rounding down could overpack)."""
    return math.ceil(x * GPU_GRANULARITY - 1e-9) / GPU_GRANULARITY


@dataclass
class NodeInfo:
    node_id: str
    address: str
    cpus: float = 0.0
    gpus: float = 0.0
    memory: float = 0.0  # bytes of Ray's `memory` resource (host RAM for tasks)
    gpu_memory: Optional[int] = None  # bytes per GPU, when known
    resources: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        gm = f" x {format_size(self.gpu_memory)}" if self.gpu_memory else ""
        return (f"{self.address} ({self.node_id[:8]}): {self.cpus:g} CPU, {self.gpus:g} GPU{gm}, "
                f"{format_size(self.memory)} memory")


def nodes_from_ray(ray_nodes: Sequence[dict[str, Any]]) -> list[NodeInfo]:
    """Alive nodes from `ray.nodes()`, with their total (not currently free) resources."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = dict(n.get("Resources") or {})
        out.append(NodeInfo(
            node_id=str(n.get("NodeID", "")),
            address=str(n.get("NodeManagerAddress", "")),
            cpus=float(res.get("CPU", 0.0)),
            gpus=float(res.get("GPU", 0.0)),
            memory=float(res.get("memory", 0.0)),
            resources=res,
        ))
    return out


@dataclass
class TrialResources:
    """What every trial asks Ray for, plus the GPU memory cap handed to the job. With several workers, `cpus`,
    `gpus` and `memory_bytes` are each worker's, and the trial's driver takes DRIVER_CPUS besides."""

    workers: int = 1  # Ray Train workers of each trial's job (--workers-per-trial)
    cpus: float = 1.0
    gpus: float = 0.0
    memory_bytes: Optional[int] = None  # host RAM (Ray `memory`)
    gpu_memory_bytes: Optional[int] = None  # per-trial GPU memory, when asked by size
    max_gpu_memory: Optional[str] = None  # what JobConfig.max_gpu_memory gets
    notes: list[str] = field(default_factory=list)
    capacity: Optional[int] = None  # trials the cluster can hold at once (set after the fit check)
    auto_gpu_bytes: Optional[int] = None  # with --gpu-memory-per-trial auto: the GPU size shares are taken of

    def ray_resources(self) -> dict[str, float]:
        """What Tune reserves for a trial: everything with one worker; with several, its driver's share, as the
        workers ask Ray Train for theirs (worker_resources)."""
        if self.workers > 1:
            return {"cpu": DRIVER_CPUS, "gpu": 0.0}
        res: dict[str, float] = {"cpu": float(self.cpus), "gpu": float(self.gpus)}
        if self.memory_bytes:
            res["memory"] = float(self.memory_bytes)
        return res

    def worker_resources(self) -> dict[str, float]:
        """What each of a trial's Ray Train workers asks for (ScalingConfig.resources_per_worker)."""
        res = {"CPU": float(self.cpus), "GPU": float(self.gpus)}
        if self.memory_bytes:
            res["memory"] = float(self.memory_bytes)
        return res

    def trial_cpus(self) -> float:
        """The CPUs one trial holds in all: its workers' and, with several, its driver's."""
        return self.cpus * self.workers + (DRIVER_CPUS if self.workers > 1 else 0.0)

    def gpu_slots(self, node: NodeInfo) -> int:
        """How many workers' GPU shares `node` holds: whole GPUs split into shares never pooled across cards."""
        if self.gpus < 1:
            return int(node.gpus) * math.floor(1 / self.gpus + 1e-9)
        return math.floor(node.gpus / self.gpus + 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU", f"{self.gpus:g} GPU"]
        if self.gpu_memory_bytes:
            parts.append(f"{format_size(self.gpu_memory_bytes)} GPU memory")
        if self.memory_bytes:
            parts.append(f"{format_size(self.memory_bytes)} host memory")
        if self.workers > 1:
            return f"{self.workers} workers of {', '.join(parts)} and {DRIVER_CPUS:g} CPU for its driver"
        return ", ".join(parts)


def plan_resources(
    nodes: Sequence[NodeInfo],
    *,
    cpus_per_trial: Optional[float] = None,
    gpus_per_trial: Optional[float] = None,
    gpu_memory_per_trial: Optional[str] = None,
    memory_per_trial: Optional[str] = None,
    node_gpu_memory: Optional[str] = None,
    workers: int = 1,
) -> TrialResources:
    """Resolve the per-trial request (with `workers` > 1: each worker's). Raises ResourceError naming the flag at
    fault.

    GPU memory per GPU comes from `node_gpu_memory` (a size, for logical GPUs or
    when it cannot be measured) or from `NodeInfo.gpu_memory` (measured). The
    fraction is taken against the smallest GPU that can hold the request, and
    rounded up: on a bigger GPU the trial then reserves more than it needs, never less.
    """
    r = TrialResources(workers=workers)
    if cpus_per_trial is not None:
        if cpus_per_trial < 0:
            raise ResourceError("--cpus-per-trial must be >= 0")
        r.cpus = float(cpus_per_trial)
    if memory_per_trial:
        r.memory_bytes = parse_size(memory_per_trial, "--memory-per-trial")
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    if gpus_per_trial is not None:
        g = float(gpus_per_trial)
        if g < 0:
            raise ResourceError("--gpus-per-trial must be >= 0")
        if g > 1 and not float(g).is_integer():
            raise ResourceError(f"--gpus-per-trial {g:g}: above 1 it must be a whole number of GPUs")
        r.gpus = round_gpu_fraction(g) if 0 < g < 1 else g
    if gpu_memory_per_trial:
        auto = is_auto(gpu_memory_per_trial)
        want = 0 if auto else parse_size(gpu_memory_per_trial, "--gpu-memory-per-trial")
        r.gpu_memory_bytes = want or None
        r.max_gpu_memory = "auto" if auto else str(want)
        if not gpu_nodes:
            raise ResourceError("--gpu-memory-per-trial: the cluster has no GPUs")
        if auto and gpus_per_trial is not None:
            raise ResourceError("--gpu-memory-per-trial auto sets each trial's GPU share; drop --gpus-per-trial")
        if node_gpu_memory:
            per_gpu = parse_size(node_gpu_memory, "--node-gpu-memory")
            for n in gpu_nodes:
                n.gpu_memory = per_gpu
        sizes = [n.gpu_memory for n in gpu_nodes if n.gpu_memory]
        if not sizes:
            raise ResourceError(
                "--gpu-memory-per-trial: the GPU memory of the cluster's nodes is unknown "
                "(could not be measured); give it with --node-gpu-memory, e.g. 80GiB")
        if auto:
            # shares are taken of the smallest GPU, so a trial fits wherever it lands; set per trial later
            r.auto_gpu_bytes = min(sizes)
            r.gpus = 1.0
            return r
        fitting = [s for s in sizes if s >= want]
        if not fitting:
            raise ResourceError(
                f"--gpu-memory-per-trial {gpu_memory_per_trial}: larger than every GPU in the cluster "
                f"(largest {format_size(max(sizes))})")
        smallest = min(fitting)
        if len(fitting) < len(sizes):
            r.notes.append(
                f"some GPUs are smaller than --gpu-memory-per-trial {gpu_memory_per_trial}; a trial placed "
                "there is capped at the request but the card may not hold it")
        frac = round_gpu_fraction(want / smallest)
        if gpus_per_trial is None:
            r.gpus = frac
        elif r.gpus < 1 and r.gpus + 1e-9 < frac:
            raise ResourceError(
                f"--gpu-memory-per-trial {gpu_memory_per_trial} needs {frac:g} of a "
                f"{format_size(smallest)} GPU, more than --gpus-per-trial {r.gpus:g}")
    elif gpus_per_trial is None:
        r.gpus = 1.0 if gpu_nodes else 0.0
        if gpu_nodes:
            r.notes.append("the cluster has GPUs: one whole GPU per trial (set --gpus-per-trial to change)")
    if r.max_gpu_memory is None and 0 < r.gpus < 1:
        # A fraction of a GPU without a size: cap the job at that fraction of its card.
        r.max_gpu_memory = f"{r.gpus:g}"
    return r


def check_fit(req: TrialResources, nodes: Sequence[NodeInfo]) -> NodeInfo:
    """Return a node one trial fits on; otherwise raise ResourceError naming the flag."""
    if not nodes:
        raise ResourceError("the Ray cluster has no alive nodes")
    reasons: list[str] = []
    flags: set[str] = set()
    # a trial's workers all run on its driver's node (orchestrator.cluster.train_workers): one node holds them all
    times = f"{req.workers} x " if req.workers > 1 else ""
    for n in nodes:
        short = []
        if req.trial_cpus() > n.cpus + 1e-9:
            short.append(("--cpus-per-trial", f"{req.trial_cpus():g} CPU > {n.cpus:g}"))
        if req.gpus > 0:
            if n.gpus <= 0:
                short.append(("--gpus-per-trial", "no GPU"))
            elif req.gpu_slots(n) < req.workers:
                short.append(("--gpus-per-trial", f"{times}{req.gpus:g} GPU > {n.gpus:g}"))
        if req.memory_bytes and req.memory_bytes * req.workers > n.memory:
            short.append(("--memory-per-trial",
                          f"{times}{format_size(req.memory_bytes)} memory > {format_size(n.memory)}"))
        if not short:
            return n
        flags.update(flag for flag, _ in short)
        if req.workers > 1:
            flags.add("--workers-per-trial")
        reasons.append(f"  {n.describe()}: " + "; ".join(f"{why} ({flag})" for flag, why in short))
    raise ResourceError(
        f"a trial needing {req.describe()} fits on no node of the cluster "
        f"(check {', '.join(sorted(flags))}):\n"
        + "\n".join(reasons))


def concurrency_capacity(req: TrialResources, nodes: Sequence[NodeInfo]) -> int:
    """How many trials of `req` the cluster could run at once (a bin count per node: a trial's workers share their
    driver's node)."""
    total = 0
    for n in nodes:
        fits = []
        if req.trial_cpus() > 0:
            fits.append(math.floor(n.cpus / req.trial_cpus() + 1e-9))
        if req.gpus > 0:
            fits.append(req.gpu_slots(n) // req.workers)
        if req.memory_bytes:
            fits.append(math.floor(n.memory / (req.memory_bytes * req.workers)))
        total += min(fits) if fits else 0
    return total


PROBE_SCRIPT = ("nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits")


def probe_gpu_memory(nodes: Sequence[NodeInfo], timeout_s: float = 60.0) -> None:
    """Measure each GPU node's smallest GPU memory with nvidia-smi, in place.

    Runs a zero-resource task pinned to every GPU node, so it never waits for busy
    GPUs. Nodes where it fails keep `gpu_memory = None`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=0)
    def _probe() -> Optional[int]:
        try:
            out = subprocess.run(PROBE_SCRIPT, capture_output=True, text=True, timeout=20, check=True).stdout
            mib = [int(float(x)) for x in out.split() if x.strip()]
            return min(mib) * 2**20 if mib else None
        except Exception:
            return None

    gpu_nodes = [n for n in nodes if n.gpus > 0 and n.gpu_memory is None]
    refs = {n.node_id: _probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n.node_id, soft=False)).remote()
        for n in gpu_nodes}
    for n in gpu_nodes:
        try:
            n.gpu_memory = ray.get(refs[n.node_id], timeout=timeout_s)
        except Exception:
            n.gpu_memory = None
