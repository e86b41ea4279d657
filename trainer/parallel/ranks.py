"""Which worker of a job this process is, and the collectives the job loop needs beyond DDP's own.

A job on k workers keeps the meaning of its numbers: its loss, token accuracy and FLOPs are sums over every
worker's share, so each rank adds its part with `sum_over_ranks` before rank 0 reports them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's workers; rank 0 of 1 when no process group runs."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that evaluates, writes checkpoints and reports, so each happens once."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def share(self, count: int) -> slice:
        """This rank's contiguous share of `count` samples, in order: rank r takes [r·count/k, (r+1)·count/k).
        Shares differ by at most one sample, so an epoch's short last micro-batch is split too."""
        return slice(self.rank * count // self.world, (self.rank + 1) * count // self.world)


def current_ranks() -> Ranks:
    """The ranks of the process group the launcher initialised, else a lone worker's."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def sum_over_ranks(ranks: Ranks, values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks, in one all-reduce on `device` (where the backend can reach it: NCCL only
    reduces GPU tensors); a lone worker's values come back as they are (no collective, no conversion). In
    float64, so counts of tokens and FLOPs stay exact."""
    if not ranks.parallel:
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def gather_over_ranks(ranks: Ranks, value: int, device: torch.device) -> list[int]:
    """Every rank's `value`, in rank order, on every rank: each adds its own into its place of a zero vector
    (sum_over_ranks, exact in float64 below 2**53); a lone worker's is [value]."""
    return [int(v) for v in sum_over_ranks(ranks, [value if r == ranks.rank else 0 for r in range(ranks.world)],
                                           device)]


def wait_for_main(ranks: Ranks) -> None:
    """Every rank waits here until rank 0 has evaluated, saved and reported, so no rank runs ahead of the
    checkpoint that would resume it."""
    if ranks.parallel:
        dist.barrier()


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another worker went away (killed, out of memory), not
    an error of this worker's own work: the job could go on from its checkpoint on a fresh set of workers.

    NCCL raises DistBackendError and a lost TCP store DistNetworkError; gloo raises a plain RuntimeError whose
    message names the gloo source file of its TCP transport ("Connection closed by peer", "Read error")."""
    if isinstance(error, (dist.DistBackendError, dist.DistNetworkError)):
        return True
    return isinstance(error, RuntimeError) and "gloo/transport/" in str(error)
