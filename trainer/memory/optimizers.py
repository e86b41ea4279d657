"""The optimizers a job can use (and the learning-rate schedule they run under), each a memory/speed trade-off with the same AdamW update rule.

- `adamw`: torch's AdamW (multi-tensor `foreach` on CUDA); two states per trained
  value, in the trained weights' type (fp32: 8 bytes per value).
- `adamw-fused`: the same update in one fused kernel per step; same memory, faster
  on CUDA.
- `adamw8bit`: bitsandbytes' AdamW8bit, the optimizer of the official Moondream
  fine-tuning notebook: both states quantised blockwise to 8 bits (about 2 bytes per
  value with the block scales), a quarter of fp32 AdamW. bitsandbytes rather than
  torchao because it runs on CPU without compiling anything, so the same option is
  tested here, and it is what Moondream users already run. Tensors under 4 096
  values (biases, norms) keep 32-bit states, as bitsandbytes does by default.
"""
from __future__ import annotations

import math
import typing
from typing import TYPE_CHECKING, Callable, Iterable

from trainer.job_config import OptimizerName

if TYPE_CHECKING:
    import torch

OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)
# bitsandbytes keeps 32-bit states for tensors smaller than this (its `min_8bit_size` default)
MIN_8BIT_SIZE = 4096
# bitsandbytes' blockwise quantisation: one fp32 scale per this many values of each state,
# and per state a fp32 quantile map of this many values
BLOCK_SIZE_8BIT = 256
QUANTILE_MAP_VALUES = 256


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    import torch  # here, so the memory model can read the constants above without torch

    params = list(params)
    common = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(params, **common)
    if name == "adamw-fused":
        return torch.optim.AdamW(params, **common, fused=True)
    if name == "adamw8bit":
        import bitsandbytes  # imported here: it takes seconds and only this option needs it

        return bitsandbytes.optim.AdamW8bit(params, **common, min_8bit_size=MIN_8BIT_SIZE)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier for `LambdaLR`: warmup avoids the early blow-ups of Adam on a fresh head."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor
