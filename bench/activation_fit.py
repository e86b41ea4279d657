"""Where the memory model's activation coefficients come from: bytes a decoder block keeps for backward,
per token, measured on CPU with trainer.memory.sizes.track_allocations and fitted as a·dim + b·ff_dim.

Varies layers (2 vs 4) and batch (4 vs 8) so that neither per-layer constants (weight copies) nor
per-batch constants (logits, masks) enter the per-token, per-layer figure. Prints the table and the fit
for fp32 and bf16 compute; trainer/memory/estimate.py holds the rounded result.

    python bench/activation_fit.py
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from trainer.model.config import PRESETS
from trainer.memory.sizes import track_allocations
from trainer.model.network import MoondreamModel

SHAPES = ((128, 256), (128, 512), (256, 512), (256, 1024), (384, 768))
TEXT_TOKENS = 12


def saved_bytes(dim: int, ff_dim: int, layers: int, batch: int, dtype) -> tuple[int, int]:
    """(bytes alive after the forward pass, tokens in the batch) for a text fine-tune without checkpointing."""
    base = PRESETS["small"]
    config = dataclasses.replace(
        base, text=dataclasses.replace(base.text, dim=dim, ff_dim=ff_dim, n_layers=layers),
        vision=dataclasses.replace(base.vision, proj_out_dim=dim))
    torch.manual_seed(0)
    model = MoondreamModel(config, bos_id=1)
    model.set_train_scope("text")
    model.train()
    crops = torch.randn(batch * 2, 3, config.vision.crop_size, config.vision.crop_size)
    ids = torch.randint(0, 100, (batch, TEXT_TOKENS))
    with track_allocations() as tracker:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None, cache_enabled=False):
            loss, _, _ = model.answer_loss(crops, [(1, 1)] * batch, ids, ids, "prefix")
        saved = tracker.live
    del loss
    return saved, batch * (1 + config.vision.n_image_tokens + TEXT_TOKENS)


def main() -> None:
    torch.set_num_threads(2)
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        rows = []
        print(f"\n{name} compute: bytes kept per token per decoder block")
        print(f"{'dim':>5} {'ff_dim':>6} {'bytes':>8}")
        for dim, ff_dim in SHAPES:
            per = {}
            for layers in (2, 4):
                for batch in (4, 8):
                    per[layers, batch] = saved_bytes(dim, ff_dim, layers, batch, dtype)
            # per layer: difference in layers; per token: difference in batch
            delta = (per[4, 8][0] - per[2, 8][0]) - (per[4, 4][0] - per[2, 4][0])
            tokens = per[4, 8][1] - per[4, 4][1]
            value = delta / 2 / tokens
            rows.append((dim, ff_dim, value))
            print(f"{dim:>5} {ff_dim:>6} {value:>8.1f}")
        a, b = np.linalg.lstsq(np.array([[d, f] for d, f, _ in rows], float),
                               np.array([v for *_, v in rows]), rcond=None)[0]
        print(f"fit: {a:.2f}·dim + {b:.2f}·ff_dim bytes")


if __name__ == "__main__":
    main()
