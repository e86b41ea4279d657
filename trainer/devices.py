"""Where and in which precision a job's model runs: one reading for training, held-out tests and prediction."""
from __future__ import annotations

from typing import Optional

import torch

from trainer.job_config import JobConfig
from trainer.memory.precision import PrecisionPlan, plan_precision

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(requested: Optional[str]) -> torch.device:
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested}: torch {torch.__version__} sees no CUDA GPU here; "
                         "use --device cpu or a machine with a GPU")
    return device


def resolve_precision(config: JobConfig, device: torch.device) -> PrecisionPlan:
    return plan_precision(config.precision, config.trained_dtype, config.frozen_dtype, device.type == "cuda")


def autocast_dtype_of(plan: PrecisionPlan) -> Optional[torch.dtype]:
    return None if plan.compute == "fp32" else TORCH_DTYPES[plan.compute]
