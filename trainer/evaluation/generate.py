"""Batched greedy decoding with a KV cache, under the same attention layout as training.

The prompt (BOS + image + question) is encoded once with the trial's attention
mode; each new token then attends to everything before it, which is causal for
both modes, so decoding steps need no explicit mask.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from trainer.model.attention import build_mask
from trainer.model.choices import AttentionMode
from trainer.data.batching import Batch
from trainer.model.network import MoondreamModel


@torch.no_grad()
def greedy_decode(model: MoondreamModel, batch: Batch, mode: AttentionMode, *, eos_id: int,
                  max_new_tokens: int) -> list[list[int]]:
    """Answer token ids per sample (without EOS) for a batch whose prompts share one length."""
    prompts = batch.text_ids[:, : batch.prompt_len]
    embeds = model.embed_sequence(model.encode_images(batch.crops, batch.tilings), prompts)
    size, seq_len = embeds.shape[:2]
    cache = DynamicCache(config=model.text.config)
    mask = build_mask(mode, model.attention_backend, batch_size=size, seq_len=seq_len,
                      prefix_len=model.prefix_len, device=embeds.device)
    logits = model.text(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True,
                        logits_to_keep=1).logits
    embed = model.text.get_input_embeddings()
    finished = torch.zeros(size, dtype=torch.bool, device=embeds.device)
    outputs: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        token = torch.where(finished, torch.full_like(token, eos_id), token)
        outputs.append(token)
        finished |= token == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        position = torch.full((size, 1), seq_len + step, dtype=torch.long, device=embeds.device)
        logits = model.text(inputs_embeds=embed(token[:, None]), position_ids=position, cache=cache,
                            use_cache=True).logits
    tokens = torch.stack(outputs, dim=1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in tokens]
