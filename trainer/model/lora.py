"""LoRA adapters on the text decoder (via peft), and folding them back into plain weights.

The adapters are injected into the Phi decoder in place, so the model keeps its
structure: checkpoints hold only the adapter tensors (what trains), and merging
turns the adapted decoder back into plain `Linear` layers that the official-layout
writer knows. lora_B starts at zero, so an untrained adapter leaves the model as it was.
"""
from __future__ import annotations

from torch import nn

from trainer.model.choices import lora_target_names


def add_lora(text_decoder: nn.Module, *, rank: int, alpha: float, targets: str) -> None:
    """Inject rank-`rank` adapters into the decoder's layers named in `targets`; seeded by torch's RNG."""
    from peft import LoraConfig, inject_adapter_in_model  # imported here: seconds, and only LoRA needs it

    names = lora_target_names(targets)
    present = {name.rsplit(".", 1)[-1] for name, module in text_decoder.named_modules()
               if isinstance(module, nn.Linear)}
    missing = sorted(set(names) - present)
    if missing:
        raise ValueError(f"lora_targets {', '.join(missing)} match no linear layer of the text decoder; "
                         f"it has {', '.join(sorted(present))}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=names,
                        exclude_modules=["lm_head"])
    inject_adapter_in_model(config, text_decoder)


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter into its base layer and put the plain layer back; returns how many were merged."""
    if not any(".lora_" in name for name, _ in module.named_parameters()):
        return 0  # nothing to merge: spare the seconds of importing peft
    from peft.tuners.lora import LoraLayer

    adapted = [(name, child) for name, child in module.named_modules() if isinstance(child, LoraLayer)]
    for name, layer in adapted:
        layer.merge()
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, layer.get_base_layer())
    return len(adapted)
