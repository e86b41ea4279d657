"""Each worker's share of a micro-batch.

Every worker draws the same seeded order of samples (trainer.job_data.micro_batches), cuts the same micro-batch
from it and keeps its contiguous share (`Ranks.share`), so k workers together train on exactly the samples of one
worker, and each reads from disk only its own.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from trainer.data.batching import IGNORE, Batch
from trainer.parallel.ranks import Ranks


def share_batch(indices: Sequence[int], ranks: Ranks, collate: Callable[[Sequence[int]], Batch]) -> Batch:
    """This rank's share of the micro-batch of samples `indices`, collated by `collate`.

    A share left empty (an epoch's short last micro-batch with fewer samples than workers) stands in the
    micro-batch's first sample with every label ignored: it adds nothing to the loss, the token counts or the
    gradient, yet its backward joins the all-reduce that the other ranks wait in."""
    mine = indices[ranks.share(len(indices))]
    if len(mine):
        return collate(mine)
    stand_in = collate(indices[:1])
    return dataclasses.replace(stand_in, labels=torch.full_like(stand_in.labels, IGNORE))
