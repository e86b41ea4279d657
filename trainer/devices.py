"""Where and in which precision a job's model runs: one reading for training, held-out tests and prediction."""
from __future__ import annotations

from typing import Optional

import torch

from trainer.job_config import JobConfig
from trainer.memory.precision import PrecisionPlan, plan_precision

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Dense peak TFLOP/s from the vendors' data sheets, without sparsity: (fp16/bf16 tensor cores, fp32). The first
# entry whose key the CUDA device name contains wins, so the more specific names come first. A GPU not listed
# gets no MFU unless the job gives `peak_tflops`; a CPU never does (no peak worth the name to divide by).
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("H200", (989.4, 66.9)),
    ("H100 PCIe", (756.0, 51.2)),
    ("H100", (989.4, 66.9)),
    ("A100", (312.0, 19.5)),
    ("L40S", (362.1, 91.6)),
    ("L4", (121.0, 30.3)),
    ("A10G", (70.0, 31.2)),
    ("A10", (125.0, 31.2)),
    ("RTX 4090", (165.2, 82.6)),
    ("V100", (125.0, 15.7)),
    ("T4", (65.0, 8.1)),
)


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


def device_name(device: torch.device) -> str:
    """The device as the hardware columns name it: the GPU's model, or `cpu`."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device, compute: str, override: Optional[float] = None) -> Optional[float]:
    """The dense peak the job's compute dtype can reach on `device` (TFLOP/s), what `mfu` divides by: the
    job's `peak_tflops` when given, else the data-sheet figure of a known GPU, else None."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, (half, single) in PEAK_TFLOPS:
        if key in name:
            return single if compute == "fp32" else half
    return None
