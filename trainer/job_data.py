"""A job's data: its datasets opened through the preprocessing cache, split, and tokenised for its model.

Crops stay on disk (trainer.data.crop_store) and are read a batch at a time, so a
job's host memory does not grow with the dataset; what is held per sample is its
id, label and answer token ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from trainer.data.batching import Batch, EncodedSample, collate
from trainer.model.config import MoondreamConfig, VisionConfig, model_config_of
from trainer.data.crop_cache import ReadOptions, geometry_of, open_cached
from trainer.data.crop_store import CropStore
from trainer.data.dataset import SKIP_HINT, DataError, split_indices
from trainer.data.samples import label_in_message
from trainer.job_config import JobConfig
from trainer.model.loading import LoadedModel
from trainer.model.tokenizer import PromptTemplate, Tokenizer
from trainer.parallel.ranks import Ranks
from trainer.parallel.shares import share_batch


class SampleView(Sequence[EncodedSample]):
    """Some rows of a cache entry as EncodedSamples; a row's crops are read from disk when it is indexed."""

    def __init__(self, store: CropStore, rows: list[int], prompt_ids: tuple[int, ...] = (),
                 answer_ids: Optional[list[tuple[int, ...]]] = None) -> None:
        self.store, self.rows, self.prompt_ids = store, rows, prompt_ids
        self.answer_ids = answer_ids if answer_ids is not None else [() for _ in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> EncodedSample:  # type: ignore[override]
        row = self.rows[i]
        s = self.store.samples[row]
        return EncodedSample(s.sample_id, s.text, self.store.crops(row), s.tiling, self.prompt_ids,
                             self.answer_ids[i])

    def texts(self) -> list[str]:
        return [self.store.samples[row].text for row in self.rows]

    def ids(self) -> list[str]:
        return [self.store.samples[row].sample_id for row in self.rows]


@dataclass
class OpenedData:
    """The job's datasets opened (built in the cache if need be), split, not yet tokenised."""

    train: SampleView
    val: SampleView
    skipped: int
    geometry: dict[str, int]


@dataclass
class JobData:
    train: SampleView
    val: SampleView
    skipped_samples: int


def read_options(config: JobConfig) -> ReadOptions:
    return ReadOptions(config.text_column, config.image_column, config.on_bad_sample)


def open_dataset(path: str, config: JobConfig, vision: VisionConfig) -> CropStore:
    return open_cached(path, vision, read_options(config), Path(config.cache_dir) if config.cache_dir else None)


def open_job_data(config: JobConfig) -> OpenedData:
    """Open, validate and split the datasets: before the model is built, so a bad file fails first. The crop
    geometry is read from the model's config without loading its weights."""
    vision = model_config_of(config.model).vision
    train = open_dataset(config.train_data, config, vision)
    skipped = int(train.meta["skipped"])
    if config.val_data:
        val = open_dataset(config.val_data, config, vision)
        skipped += int(val.meta["skipped"])
        train_rows, val_store, val_rows = list(range(len(train))), val, list(range(len(val)))
    else:
        train_rows, val_rows = split_indices(len(train), config.val_fraction, config.split_seed)
        val_store = train
    if config.max_val_samples is not None:
        val_rows = val_rows[: config.max_val_samples]
    return OpenedData(SampleView(train, train_rows), SampleView(val_store, val_rows), skipped, geometry_of(vision))


def prepare_data(config: JobConfig, loaded: LoadedModel, opened: OpenedData) -> JobData:
    """Tokenise the labels for this model; labels it cannot read or write are named, or skipped with
    on_bad_sample=skip."""
    if geometry_of(loaded.model.config.vision) != opened.geometry:
        raise ValueError(f"model {config.model}: its crop geometry {geometry_of(loaded.model.config.vision)} is not "
                         f"the one its config announced ({opened.geometry})")
    train, train_bad = tokenised(opened.train, config, loaded)
    val, val_bad = tokenised(opened.val, config, loaded)
    if not len(train) or not len(val):
        raise DataError(f"no {'training' if not len(train) else 'validation'} sample left after skipping labels "
                        "the model cannot read or write")
    return JobData(train, val, opened.skipped + train_bad + val_bad)


def tokenised(view: SampleView, config: JobConfig, loaded: LoadedModel) -> tuple[SampleView, int]:
    """`view` with prompt and answer ids for `loaded`'s tokenizer, minus unusable labels; and how many those were."""
    template = loaded.template(config.prompt_template)
    prompt = tuple(template.prompt_ids(loaded.tokenizer, config.question))
    room = answer_room(loaded.model.config, prompt)
    rows, answers = [], []
    for row, sample_id, text in zip(view.rows, view.ids(), view.texts()):
        ids, why = answer_ids(text, loaded.tokenizer, template, room)
        if ids is not None:
            rows.append(row)
            answers.append(ids)
        elif config.on_bad_sample == "error":
            raise DataError(f"sample {sample_id}: {why} {SKIP_HINT}")
    return SampleView(view.store, rows, prompt, answers), len(view) - len(rows)


def answer_room(config: MoondreamConfig, prompt: Sequence[int]) -> int:
    """The tokens a sequence leaves for the answer: its context, less BOS, the image tokens and the prompt."""
    return config.text.max_context - 1 - config.vision.n_image_tokens - len(prompt)


def answer_ids(text: str, tokenizer: Tokenizer, template: PromptTemplate,
               room: int) -> tuple[Optional[tuple[int, ...]], Optional[str]]:
    """(the answer's ids with its end token, None), or (None, why the label cannot be trained on: a character
    the tokenizer lacks, an answer longer than the context leaves room for)."""
    try:
        ids = tuple(template.answer_ids(tokenizer, text))
    except ValueError as e:
        return None, f"label {label_in_message(text)} cannot be encoded: {e}"
    if len(ids) > room:
        return None, (f"label {label_in_message(text)} is {len(ids)} tokens with its end token, the context leaves "
                      f"room for {room}")
    return ids, None


def micro_batches(data: Sequence[EncodedSample], batch_size: int, seed: int, start: int,
                  pad_id: int, ranks: Ranks = Ranks()) -> Iterator[Batch]:
    """Endless stream of batches: a fresh seeded permutation per epoch, resumable at any position. Only the
    batch being made is read from disk. On k workers every rank draws the same permutation and gets its own
    share of each micro-batch of `batch_size` samples (trainer.parallel.shares)."""
    per_epoch = math.ceil(len(data) / batch_size)
    epoch, position = divmod(start, per_epoch)
    while True:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        for position in range(position, per_epoch):
            yield share_batch(order[position * batch_size: (position + 1) * batch_size], ranks,
                              lambda indices: collate([data[i] for i in indices], pad_id))
        epoch, position = epoch + 1, 0
