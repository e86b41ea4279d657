"""The model's own choices and names, torch-free: how attention is masked and computed, which parts train, the
dtypes weights are held in, the prompt templates, and the decoder layers LoRA can wrap.

They belong to the model (the network, its masks and its tokenizer act on them), so they live here and the job
contract, `trainer.job_config`, imports them to type and check its fields, as a Hugging Face configuration
imports its model's constants. Nothing here imports torch or any other module of the project, so the contract
stays importable by the sweep driver without the model stack."""
from __future__ import annotations

from typing import Literal

# read with typing.get_args wherever the choices are listed (masks, scopes, precisions, search spaces, CLI)
AttentionMode = Literal["causal", "prefix"]
AttentionBackend = Literal["sdpa", "flex", "eager-4d"]
TrainScope = Literal["text", "text+projection", "all", "lora"]
DType = Literal["fp16", "bf16", "fp32"]
PromptTemplateName = Literal["moondream2-2025", "moondream2-legacy", "moondream2-starmie"]

# every linear layer of a Phi decoder block: attention projections and the MLP
LORA_TARGETS = "q_proj,k_proj,v_proj,dense,fc1,fc2"


def lora_target_names(targets: str) -> list[str]:
    """'q_proj, fc2' -> ['q_proj', 'fc2']: the one reading of `lora_targets`."""
    return [name.strip() for name in str(targets).split(",") if name.strip()]
