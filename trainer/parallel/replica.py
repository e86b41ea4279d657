"""The model as one worker trains it: the model itself alone, a DistributedDataParallel replica among several.

With k workers each rank backpropagates its share's summed loss divided by the labelled tokens of the whole
accumulation group (all ranks), times k: DDP averages gradients (divides their sum by k), so the update is the
1-worker update on the same samples, whatever the shares' sizes. Only the last micro-batch of an accumulation
group all-reduces; the others accumulate locally under `no_sync`.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel

from trainer.data.batching import Batch
from trainer.job_config import ParallelStrategy
from trainer.model.choices import AttentionMode
from trainer.model.network import MoondreamModel
from trainer.parallel.ranks import Ranks


class AnswerLoss(torch.nn.Module):
    """The model's answer loss as a module's forward. DDP readies each backward's all-reduce in its own forward
    (and only there), so the loss is computed through the wrapper, never by a method of the model under it."""

    def __init__(self, model: MoondreamModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, mode: AttentionMode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.answer_loss(batch.crops, batch.tilings, batch.text_ids, batch.labels, mode)


class Replica:
    """One worker's view of the model for training: its loss, when its backward all-reduces, and the factor
    that turns DDP's average into the 1-worker gradient."""

    def __init__(self, model: MoondreamModel, ranks: Ranks, strategy: ParallelStrategy,
                 device: torch.device) -> None:
        self.model, self.ranks = model, ranks
        self.ddp: DistributedDataParallel | None = None
        if ranks.parallel:
            if strategy != "ddp":
                raise ValueError(f"parallel={strategy} is not built yet; use parallel=ddp")
            # the model's buffers are constants (rotary tables), equal on every rank: not broadcast each forward
            self.ddp = DistributedDataParallel(AnswerLoss(model), device_ids=[device] if device.type == "cuda" else None,
                                               broadcast_buffers=False)

    def answer_loss(self, batch: Batch, mode: AttentionMode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, correct tokens, labelled tokens) of this rank's share, as `MoondreamModel.answer_loss`."""
        if self.ddp is None:
            return self.model.answer_loss(batch.crops, batch.tilings, batch.text_ids, batch.labels, mode)
        return self.ddp(batch, mode)

    def micro_step(self, last: bool) -> ContextManager[object]:
        """Around one micro-batch's forward and backward: its gradients are all-reduced only when it is the `last`
        of its accumulation group; before that they accumulate on each rank."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def backward_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: k times this rank's part, so that DDP's average over k ranks is the sum
        of the parts, the 1-worker gradient. Alone, the loss itself."""
        return loss * self.ranks.world if self.ranks.parallel else loss
