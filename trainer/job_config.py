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


@dataclass
class JobConfig:
    """Everything one trial needs; every field is a plain value so it can be a sweep parameter."""

    # model: a small config name ("tiny", "small"), a local directory, or a hub id
    model: str = "tiny"
    revision: Optional[str] = None
    # data: a Parquet file/dir, an image folder, or a JSONL/CSV manifest
    train_data: str = ""
    val_data: Optional[str] = None
    val_fraction: float = 0.1  # used when val_data is None: a split of train_data by split_seed
    split_seed: int = 0  # fixed apart from `seed`, so replicate seeds share one validation set
    text_column: Optional[str] = None
    image_column: Optional[str] = None
    on_bad_sample: Literal["error", "skip"] = "error"
    max_val_samples: Optional[int] = None
    question: str = "What does the text say?"
    prompt_template: str = "moondream2-2025"
    # optimisation
    lr: float = 3e-5
    grad_accum: int = 1
    batch_size: int = 8
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # model behaviour
    attention: Literal["causal", "prefix"] = "prefix"
    attention_backend: Literal["sdpa", "flex", "eager-4d"] = "sdpa"
    train_scope: Literal["text", "text+projection", "all"] = "text"
    precision: Optional[Literal["fp16", "bf16", "fp32"]] = None  # None: fp16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = True
    device: Optional[str] = None  # None: cuda when available, else cpu
    # reproducibility and reporting
    seed: int = 0
    eval_every: Optional[int] = None  # optimizer steps between evaluations; None: once per epoch
    max_new_tokens: int = 16
    # safety
    max_gpu_memory: Optional[str] = None  # bytes ("16GiB", "1.5e10") or a fraction ("0.25")
    diverge_patience: int = 5  # consecutive non-finite losses that end the job as `diverged`
    # deliberate failures, for testing recovery paths end to end: "oom@STEP",
    # "nan@STEP" or "crash@STEP" (the process exits; fires only on a fresh start)
    fault: Optional[str] = None

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
