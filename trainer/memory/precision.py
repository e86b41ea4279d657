"""Which floating-point type a job computes in and stores each part of the model in.

Three separate choices, because they trade memory against accuracy differently:
- `precision` (compute): autocast to fp16/bf16, or fp32. Accuracy-neutral in practice
  when the trained weights stay fp32 and fp16 uses the loss scaler.
- `frozen_dtype` (storage of what does not train): the vision tower of a text fine-tune
  or the whole base under LoRA. Autocast casts these weights to the compute type on
  every forward anyway, so storing them in it halves their memory at no cost; that is
  the default.
- `trained_dtype` (storage of what trains): fp32 master weights by default. Half
  (what the official notebook does, with 8-bit Adam) halves weights and gradients,
  but an update smaller than the weight's own precision is lost (fp16 keeps about 3
  decimal digits, bf16 about 2), and fp16 gradients cannot go through the loss
  scaler, so small gradients can underflow. Explicit opt-in only.

Kept free of torch so the sweep driver and the memory model resolve the same plan
the trainer uses.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Optional

from trainer.job_config import precision_problem
from trainer.model.choices import DType

DTYPES: tuple[str, ...] = typing.get_args(DType)
BYTES_PER_VALUE = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class PrecisionPlan:
    compute: str  # autocast type ("fp32": no autocast)
    trained: str  # storage of trained weights, their gradients and torch AdamW's states
    frozen: str  # storage of frozen weights

    @property
    def uses_loss_scaler(self) -> bool:
        """fp16 compute over fp32 master weights: the case the GradScaler exists for (it cannot
        unscale half-precision gradients)."""
        return self.compute == "fp16" and self.trained == "fp32"


def plan_precision(precision: Optional[str], trained_dtype: str, frozen_dtype: Optional[str],
                   on_gpu: bool) -> PrecisionPlan:
    """The plan for a job on a GPU (`on_gpu`) or on CPU: unset precision means fp16 on a GPU and fp32
    on CPU, unless the trained weights are half; unset frozen_dtype follows the compute type."""
    problem = precision_problem(precision, trained_dtype)
    if problem:
        raise ValueError(problem)
    for name, value in (("precision", precision), ("trained_dtype", trained_dtype),
                        ("frozen_dtype", frozen_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
    if trained_dtype != "fp32":
        compute = trained_dtype
    else:
        compute = precision or ("fp16" if on_gpu else "fp32")
    return PrecisionPlan(compute=compute, trained=trained_dtype, frozen=frozen_dtype or compute)
