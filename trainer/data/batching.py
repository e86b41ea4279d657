"""A sample encoded for the model (uint8 crops, prompt and answer ids) and batch assembly.

A job's samples come from the preprocessing cache (trainer.job_data), which crops
every image once per node; `encode_samples` encodes in memory, for the few images
`mdsweep predict` is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from trainer.model.config import VisionConfig
from trainer.model.image_crops import make_crops, normalize
from trainer.model.tokenizer import PromptTemplate, Tokenizer

IGNORE = -100


@dataclass(frozen=True)
class EncodedSample:
    sample_id: str
    target: str
    crops: np.ndarray  # uint8 [n_crops, crop, crop, 3]
    tiling: tuple[int, int]
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # answer tokens followed by EOS


def encode_samples(samples: Sequence, vision: VisionConfig, tokenizer: Tokenizer, template: PromptTemplate,
                   question: str) -> list[EncodedSample]:
    """Crop and tokenise `trainer.data.dataset.Sample`s in memory; the prompt is shared, so it is tokenised once."""
    prompt = tuple(template.prompt_ids(tokenizer, question))
    encoded = []
    for sample in samples:
        crops = make_crops(sample.image, vision)
        encoded.append(EncodedSample(sample.sample_id, sample.text, crops.pixels, crops.tiling, prompt,
                                     tuple(template.answer_ids(tokenizer, sample.text))))
    return encoded


@dataclass
class Batch:
    crops: torch.Tensor  # float [total crops, 3, H, W], normalised
    tilings: list[tuple[int, int]]
    text_ids: torch.Tensor  # [batch, T] prompt + answer + EOS, right-padded with EOS
    labels: torch.Tensor  # [batch, T] answer + EOS ids, IGNORE elsewhere
    prompt_len: int  # shared prompt length (generation needs equal-length prompts)
    samples: list[EncodedSample]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.crops.to(device, non_blocking=True), self.tilings, self.text_ids.to(device),
                     self.labels.to(device), self.prompt_len, self.samples)


def collate(samples: Sequence[EncodedSample], pad_id: int) -> Batch:
    prompt_lens = {len(s.prompt_ids) for s in samples}
    if len(prompt_lens) != 1:
        raise ValueError(f"a batch must share one prompt length, got {sorted(prompt_lens)}")
    length = max(len(s.prompt_ids) + len(s.answer_ids) for s in samples)
    text_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        ids = s.prompt_ids + s.answer_ids
        text_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(s.prompt_ids): len(ids)] = torch.tensor(s.answer_ids)
    crops = normalize(np.concatenate([s.crops for s in samples]))
    return Batch(crops, [s.tiling for s in samples], text_ids, labels, prompt_lens.pop(), list(samples))
