"""The contract between one fine-tuning job and whoever runs it (CLI or sweep).

Kept in its own module, free of torch imports, so the sweep driver can build and
validate configs without loading the model stack.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

Outcome = Literal["ok", "oom", "diverged", "error"]
OUTCOMES: tuple[str, ...] = ("ok", "oom", "diverged", "error")


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class JobConfig:
    """Everything one trial needs; every field is a plain value so it can be a sweep parameter."""

    model: str = _field("tiny", "a preset (tiny, small, moondream2: fresh weights), a local checkpoint "
                                "directory, or a hub id such as vikhyatk/moondream2")
    revision: Optional[str] = _field(None, "hub revision (branch, tag or commit) when `model` is a hub id")
    train_data: str = _field("", "training data: a Parquet file/dir, an image folder named by label, or a "
                                 "JSONL/CSV manifest")
    val_data: Optional[str] = _field(None, "validation data (same formats); default: split from train_data")
    val_fraction: float = _field(0.1, "fraction of train_data held out for validation when val_data is unset")
    split_seed: int = _field(0, "seed of that split; kept apart from `seed` so replicates share one validation set")
    text_column: Optional[str] = _field(None, "label column (default: solution, text or label)")
    image_column: Optional[str] = _field(None, "image column (default: image, else the first image-like column)")
    on_bad_sample: Literal["error", "skip"] = _field("error", "error: stop on an unreadable row; skip: drop and "
                                                              "count it (metric skipped_samples)")
    max_val_samples: Optional[int] = _field(None, "evaluate on at most this many validation samples")
    question: str = _field("What does the text say?", "the question asked about every image")
    prompt_template: str = _field("moondream2-2025", "prompt layout: moondream2-2025 or moondream2-legacy")
    lr: float = _field(3e-5, "peak learning rate (AdamW)")
    grad_accum: int = _field(1, "micro-batches accumulated per optimizer step")
    batch_size: int = _field(8, "samples per micro-batch")
    epochs: float = _field(1.0, "passes over the training data (ignored when max_samples or max_steps is set)")
    max_samples: Optional[int] = _field(None, "training samples to process: the same budget for every trial "
                                              "whatever its batch_size and grad_accum; overrides epochs")
    max_steps: Optional[int] = _field(None, "optimizer steps to run (a trial with larger grad_accum or batch "
                                            "sees more data); overrides epochs, not with max_samples")
    warmup_ratio: float = _field(0.05, "fraction of steps with linear warmup before cosine decay")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    max_grad_norm: float = _field(1.0, "gradient clipping norm")
    attention: Literal["causal", "prefix"] = _field("prefix", "causal, or prefix (BOS + image tokens attend both "
                                                              "ways, text causal)")
    attention_backend: Literal["sdpa", "flex", "eager-4d"] = _field(
        "sdpa", "sdpa (default), flex (FlexAttention, CUDA only), eager-4d (naive float mask; benchmarks only)")
    train_scope: Literal["text", "text+projection", "all"] = _field("text", "what trains; the rest is frozen")
    precision: Optional[Literal["fp16", "bf16", "fp32"]] = _field(None, "fp16 (autocast + loss scaling), bf16 or "
                                                                        "fp32; default fp16 on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = _field(True, "recompute activations in backward to save memory")
    device: Optional[str] = _field(None, "cuda, cuda:N or cpu; default cuda when available")
    seed: int = _field(0, "seed of weights init, data order and dropout; sweep it for replicates")
    eval_every: Optional[int] = _field(None, "optimizer steps between evaluations (default: once per epoch)")
    eval_every_samples: Optional[int] = _field(None, "training samples between evaluations, so that every trial "
                                                     "is evaluated at the same sample counts; not with eval_every")
    max_new_tokens: int = _field(16, "longest answer generated at evaluation")
    max_gpu_memory: Optional[str] = _field(None, "cap on this job's GPU allocator: bytes (16GiB) or a fraction "
                                                 "(0.25); beyond it the job ends as oom")
    diverge_patience: int = _field(5, "consecutive non-finite losses that end the job as diverged")
    fault: Optional[str] = _field(None, "deliberate failure for testing recovery: oom@STEP, nan@STEP or "
                                        "crash@STEP (process exits; fresh starts only)")
    save_model: Optional[str] = _field(None, "directory to write the fine-tuned model to (official layout) "
                                             "when the job ends ok")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "JobConfig":
        """Build a config, naming any unknown key instead of silently dropping it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown job config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


@dataclass
class Prediction:
    """One validation sample's result, kept so two trials can be compared sample by sample."""

    sample_id: str
    target: str
    prediction: str
    correct: bool
    cer: float


@dataclass
class JobResult:
    outcome: Outcome
    step: int  # optimizer steps completed
    final_metrics: dict[str, Any] = field(default_factory=dict)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    error: Optional[str] = None
    predictions: list[Prediction] = field(default_factory=list)
    wall_time_s: float = 0.0
