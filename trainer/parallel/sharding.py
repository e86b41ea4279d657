"""FSDP2 for the job: the model cut into units and sharded, and its state gathered whole or cut back into shards.

Every decoder block and every vision block is one `fully_shard` unit, the loss module around the model the root:
a unit's parameters are gathered for its forward and backward and freed after, so a rank holds its shards plus
the largest unit whole. Parameters, gradients and the optimizer's states (built over the sharded parameters) are
DTensors sharded on dim 0 over the ranks.

What leaves the job is whole, as one worker has it: checkpoints hold full tensors in the layout `TrainState`
always wrote (optimizer states keyed by parameter index), so export, predict and a resume on any number of
workers read them unchanged. Gathering is a collective: every rank calls these functions in the same order,
and only rank 0 keeps what they gather.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.model.network import MoondreamModel


def model_blocks(model: MoondreamModel) -> list[torch.nn.Module]:
    """The units below the root: every vision block and every decoder block."""
    return [*model.vision.encoder.layers, *model.text.model.layers]


def shard_model(root: torch.nn.Module, blocks: list[torch.nn.Module], world: int, device: torch.device,
                compute_dtype: Optional[torch.dtype]) -> FSDPModule:
    """Shard each of `blocks`, then `root` (the module whose forward computes the loss, holding them and the
    rest), over `world` ranks. Under autocast (`compute_dtype`) a unit is gathered in the compute type, which
    autocast would cast it to anyway, and its gradients reduced in the trained weights' type, as one worker
    keeps them."""
    mesh = init_device_mesh(device.type, (world,))
    trained = [p.dtype for p in root.parameters() if p.requires_grad]
    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=trained[0] if trained else None)
              if compute_dtype is not None else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(root, mesh=mesh, mp_policy=policy)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as one worker would have it: a DTensor gathered whole (a collective), anything else as it is.
    `clip_grad_norm_` over sharded gradients returns the global norm as a DTensor; this is its value."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of the whole tensor `full`, placed as the DTensor `like` is (every rank holds `full`,
    so no data moves); `full` itself when `like` is not sharded."""
    if not isinstance(like, DTensor) or full.shape != like.shape:
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def whole_optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded state gathered whole onto rank 0's CPU: the layout a lone
    worker saves. Every rank takes part; the others get an empty dict."""
    state = optimizer.state_dict()
    whole: dict[int, dict[str, Any]] = {}
    for index, values in state["state"].items():
        # one parameter at a time: no rank holds more than its states whole on its device
        gathered = {key: full_value(value) for key, value in values.items()}
        if main:
            whole[index] = {key: value.cpu() if isinstance(value, torch.Tensor) else value
                            for key, value in gathered.items()}
    return {"state": whole, "param_groups": state["param_groups"]} if main else {}


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer state of whole tensors (any worker count wrote it), each state of a sharded parameter
    cut to this rank's shard, for `optimizer.load_state_dict`. Saved indices follow the parameter order of the
    param groups, as `load_state_dict` maps them."""
    saved_indices = [index for group in saved["param_groups"] for index in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_index = dict(zip(saved_indices, params))
    state = {index: {key: shard_like(value, by_index[index]) if isinstance(value, torch.Tensor) else value
                     for key, value in values.items()}
             for index, values in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}
