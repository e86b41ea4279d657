"""The model as one worker trains it: the model itself alone, a DDP replica or an FSDP shard among several.

With k workers each rank backpropagates its share's summed loss divided by the labelled tokens of the whole
accumulation group (all ranks), times k: DDP's all-reduce and FSDP's reduce-scatter both average gradients
(divide their sum by k), so the update is the 1-worker update on the same samples, whatever the shares' sizes.
Only the last micro-batch of an accumulation group reduces; the others accumulate locally (`no_sync`, or FSDP's
gradient sync turned off).

Under FSDP no rank holds the model whole, so what needs it whole (evaluation, the checkpoint's tensors, the saved
model) goes through `whole`: the trained tensors gathered into an unsharded copy on rank 0, which evaluates
exactly as it would alone.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from trainer.data.batching import Batch
from trainer.job_config import ParallelStrategy
from trainer.model.choices import AttentionMode
from trainer.model.network import MoondreamModel
from trainer.parallel.ranks import Ranks
from trainer.parallel.sharding import (full_value, model_blocks, shard_like, shard_model, sharded_optimizer_state,
                                       whole_optimizer_state)


class AnswerLoss(torch.nn.Module):
    """The model's answer loss as a module's forward. DDP readies each backward's all-reduce in its own forward
    (and only there), and FSDP's root gathers and reduces around its own: so the loss is computed through the
    wrapper, never by a method of the model under it."""

    def __init__(self, model: MoondreamModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, mode: AttentionMode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.answer_loss(batch.crops, batch.tilings, batch.text_ids, batch.labels, mode)


class Replica:
    """One worker's view of the model for training: its loss, when its backward reduces, the factor that turns
    the reduction's average into the 1-worker gradient, and the model whole where the job needs it whole.

    `compute_dtype`: the autocast type (None in fp32), which FSDP gathers its units in."""

    def __init__(self, model: MoondreamModel, ranks: Ranks, strategy: ParallelStrategy, device: torch.device,
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        self.model, self.ranks, self.device = model, ranks, device
        self.ddp: Optional[DistributedDataParallel] = None
        self.fsdp: Optional[torch.nn.Module] = None
        # FSDP's rank 0: an unsharded copy, kept on the CPU between evaluations (made before sharding, so it
        # holds the frozen tensors; the trained ones are gathered into it each time)
        self.copy: Optional[MoondreamModel] = None
        if not ranks.parallel:
            return
        if strategy == "fsdp":
            if ranks.main:
                self.copy = copy.deepcopy(model).to("cpu")
            self.fsdp = shard_model(AnswerLoss(model), model_blocks(model), ranks.world, device, compute_dtype)
        else:
            # the model's buffers are constants (rotary tables), equal on every rank: not broadcast each forward
            self.ddp = DistributedDataParallel(AnswerLoss(model), device_ids=[device] if device.type == "cuda" else None,
                                               broadcast_buffers=False)

    def answer_loss(self, batch: Batch, mode: AttentionMode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, correct tokens, labelled tokens) of this rank's share, as `MoondreamModel.answer_loss`."""
        wrapped = self.ddp if self.ddp is not None else self.fsdp
        if wrapped is None:
            return self.model.answer_loss(batch.crops, batch.tilings, batch.text_ids, batch.labels, mode)
        return wrapped(batch, mode)

    def micro_step(self, last: bool) -> ContextManager[object]:
        """Around one micro-batch's forward and backward: its gradients are reduced only when it is the `last`
        of its accumulation group; before that they accumulate on each rank."""
        if last or (self.ddp is None and self.fsdp is None):
            return contextlib.nullcontext()
        return self.ddp.no_sync() if self.ddp is not None else self._without_gradient_sync()

    @contextlib.contextmanager
    def _without_gradient_sync(self) -> Iterator[None]:
        self.fsdp.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.fsdp.set_requires_gradient_sync(True)

    def backward_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: k times this rank's part, so that the average over k ranks is the sum
        of the parts, the 1-worker gradient. Alone, the loss itself."""
        return loss * self.ranks.world if self.ranks.parallel else loss

    @contextlib.contextmanager
    def whole(self) -> Iterator[Optional[MoondreamModel]]:
        """Rank 0's model, unsharded, on the job's device, for as long as the block runs; None on the other
        ranks. Every rank enters it: under FSDP the trained tensors are gathered (a collective) into the copy,
        which goes back to the CPU after the block. Alone or under DDP, the model itself."""
        if self.fsdp is None:
            yield self.model if self.ranks.main else None
            return
        if self.copy is not None:
            self.copy.to(self.device)
        mine = dict(self.copy.named_parameters()) if self.copy is not None else {}
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    full = full_value(param)
                    if self.copy is not None:
                        mine[name].copy_(full)
        try:
            yield self.copy
        finally:
            if self.copy is not None:
                self.copy.to("cpu")

    def load_trained(self, tensors: dict[str, torch.Tensor]) -> None:
        """Lay whole trained tensors (a checkpoint's, written by any number of workers) over the model, each
        rank keeping its shard. Frozen tensors are not in a checkpoint: they were built from the model source."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in tensors:
                    param.copy_(shard_like(tensors[name].to(param.dtype), param))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict whole, on rank 0, for a checkpoint (under FSDP every rank takes part in
        gathering it); the other ranks get an empty dict."""
        if self.fsdp is not None:
            return whole_optimizer_state(optimizer, self.ranks.main)
        return optimizer.state_dict() if self.ranks.main else {}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
        """Load a checkpoint's whole optimizer state, each rank keeping the shards of its parameters."""
        optimizer.load_state_dict(sharded_optimizer_state(optimizer, saved))

    def release(self) -> None:
        """Give the memory of the training model, and of the copy, back (their tensors go to the meta device)."""
        self.model.to("meta")
        if self.copy is not None:
            self.copy.to("meta")
