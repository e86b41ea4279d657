"""The contract between one fine-tuning job and whoever runs it (CLI or sweep).

Kept in its own module, free of torch imports, so the sweep driver can build and
validate configs without loading the model stack. It is the trainer's base: every
check of a value lives here or in the torch-free modules it imports (`budget`,
`faults`), and the layers above (memory, model, the job) import the readings from
here, so `JobConfig(...)` names every bad value without importing any of them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from trainer.budget import check_budget_fields
from trainer.faults import Fault
from trainer.model.choices import (LORA_TARGETS, AttentionBackend, AttentionMode, DType, PromptTemplateName,
                                   TrainScope, lora_target_names)

DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")

Outcome = Literal["ok", "oom", "diverged", "error"]
# The job's own choices; the model's (attention, scopes, dtypes, prompts, LoRA layers) are the model's, in
# trainer.model.choices. Each is read with typing.get_args where it is listed (optimizers, data, search spaces, CLI).
OptimizerName = Literal["adamw", "adamw-fused", "adamw8bit"]
OnBadSample = Literal["error", "skip"]
# How the workers of one job share it (trainer.parallel): ddp, a full replica per worker; fsdp, every block sharded.
ParallelStrategy = Literal["ddp", "fsdp"]


def precision_problem(precision: Optional[str], trained_dtype: str) -> Optional[str]:
    """Why this pair cannot work, or None: half trained weights compute in their own type."""
    if trained_dtype != "fp32" and precision not in (None, trained_dtype):
        return (f"trained_dtype={trained_dtype} computes in {trained_dtype}; precision={precision} "
                "cannot be combined with it (leave precision unset)")
    return None


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: Union[str, int, float]) -> int:
    """'16GiB', '1.5e10', '512MB', 2**30 → bytes (positive). Raises ValueError naming the bad text. The one
    reading of a size, for `max_gpu_memory` and the sweep's memory flags."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"cannot read {text!r} as a size; use e.g. 16GiB, 512MB, 1.5e10")
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} in {text!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r} must be positive")
    return size


def cap_fraction(cap: Union[str, int, float], total_bytes: int) -> float:
    """A cap given as bytes or as a fraction ('0.25') → the fraction of `total_bytes` it allows: the one
    reading of `max_gpu_memory`."""
    text = str(cap).strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value <= 1:
        return value
    fraction = parse_bytes(text) / total_bytes
    if not 0 < fraction <= 1:
        raise ValueError(f"GPU memory cap {cap!r} is not within the device's {total_bytes / 2**30:.1f} GiB")
    return fraction


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class JobConfig:
    """Everything one trial needs; every field is a plain value so it can be a sweep parameter."""

    model: str = _field("tiny", "a preset (tiny, small, moondream2: fresh weights), a local checkpoint "
                                "directory, or a hub id such as vikhyatk/moondream2")
    revision: Optional[str] = _field(None, "hub revision (branch, tag or commit) when `model` is a hub id; a dated "
                                           "revision (2025-01-09) also picks the tokenizer the official code of that "
                                           "revision used when the checkpoint has no tokenizer.json")
    tokenizer: Optional[str] = _field(None, "tokenizer to use: a directory holding tokenizer.json, a hub id or "
                                            "id@revision (default: tokenizer.json beside the weights, else the one "
                                            "the official code of `revision` loaded)")
    train_data: str = _field("", "training data: a Parquet file/dir, an image folder named by label, or a "
                                 "JSONL/CSV manifest")
    val_data: Optional[str] = _field(None, "validation data (same formats); default: split from train_data")
    val_fraction: float = _field(0.1, "fraction of train_data held out for validation when val_data is unset")
    split_seed: int = _field(0, "seed of that split; kept apart from `seed` so replicates share one validation set")
    text_column: Optional[str] = _field(None, "label column (default: solution, text or label)")
    image_column: Optional[str] = _field(None, "image column (default: image, else the first image-like column)")
    on_bad_sample: OnBadSample = _field("error", "error: stop on an unreadable row; skip: drop and "
                                                              "count it (metric skipped_samples)")
    max_val_samples: Optional[int] = _field(None, "evaluate on at most this many validation samples")
    cache_dir: Optional[str] = _field(None, "directory of the preprocessing cache: every dataset's crops made once "
                                            "per node and read from disk by every trial (default: "
                                            "$MDSWEEP_CACHE_DIR, else ~/.cache/mdsweep/crops on each node)")
    question: str = _field("What does the text say?", "the question asked about every image")
    prompt_template: Optional[PromptTemplateName] = _field(None, "prompt layout: moondream2-2025, moondream2-legacy or "
                                                  "moondream2-starmie (default: the one that goes with the "
                                                  "model's tokenizer: legacy for 2024 revisions, starmie for "
                                                  "2025-06-21 and later, else 2025)")
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
    attention: AttentionMode = _field("prefix", "causal, or prefix (BOS + image tokens attend both "
                                                              "ways, text causal)")
    attention_backend: AttentionBackend = _field(
        "sdpa", "sdpa (default), flex (FlexAttention, CUDA only), eager-4d (naive float mask; benchmarks only)")
    train_scope: TrainScope = _field(
        "text", "what trains; the rest is frozen. lora: low-rank adapters on the text decoder only (the "
                "least memory; exported merged into plain weights)")
    lora_rank: int = _field(16, "rank of the LoRA adapters (train_scope=lora)")
    lora_alpha: float = _field(32.0, "LoRA scaling numerator: adapters are scaled by lora_alpha / lora_rank")
    lora_targets: str = _field(LORA_TARGETS, "comma-separated names of the decoder's linear layers that get "
                                             "adapters")
    optimizer: OptimizerName = _field(
        "adamw", "adamw (torch), adamw-fused (one fused kernel: faster on CUDA, same memory), adamw8bit "
                 "(bitsandbytes: optimizer states in 8 bits, a quarter of the memory)")
    adam_beta1: float = _field(0.9, "AdamW's first-moment decay")
    adam_beta2: float = _field(0.999, "AdamW's second-moment decay (the official Moondream fine-tunes use 0.95)")
    adam_eps: float = _field(1e-8, "AdamW's epsilon (the official Moondream fine-tunes use 1e-6)")
    trained_dtype: DType = _field(
        "fp32", "storage of the trained weights: fp32 master weights, or half (as the official notebook): "
                "half their memory, but updates below the weight's precision are lost and fp16 has no loss "
                "scaler")
    frozen_dtype: Optional[DType] = _field(
        None, "storage of the frozen weights; default: the compute precision (fp16 on CUDA), which autocast "
              "casts them to anyway")
    precision: Optional[DType] = _field(None, "fp16 (autocast + loss scaling), bf16 or "
                                                                        "fp32; default fp16 on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = _field(True, "recompute activations in backward to save memory")
    device: Optional[str] = _field(None, "cuda, cuda:N or cpu; default cuda when available")
    parallel: ParallelStrategy = _field(
        "ddp", "how the workers of a job with --workers-per-trial N > 1 share it: ddp (each worker a full replica "
               "training on its share of every micro-batch, gradients averaged), or fsdp (the same training, with "
               "parameters, gradients and optimizer states sharded over the workers, each block gathered only while "
               "it runs: for a model that fits no single device; not with optimizer=adamw8bit). One worker ignores "
               "it")
    seed: int = _field(0, "seed of weights init, data order and dropout; sweep it for replicates")
    eval_every: Optional[int] = _field(None, "optimizer steps between evaluations (default: once per epoch)")
    eval_every_samples: Optional[int] = _field(None, "training samples between evaluations, so that every trial "
                                                     "is evaluated at the same sample counts; not with eval_every")
    max_new_tokens: int = _field(16, "longest answer generated at evaluation")
    peak_tflops: Optional[float] = _field(None, "the device's dense peak TFLOP/s at the compute precision, what "
                                                "mfu divides by (default: the data sheet of a known GPU; none on "
                                                "CPU)")
    max_gpu_memory: Optional[str] = _field(None, "cap on this job's GPU allocator: bytes (16GiB) or a fraction "
                                                 "(0.25); beyond it the job ends as oom")
    diverge_patience: int = _field(5, "consecutive non-finite losses that end the job as diverged")
    fault: Optional[str] = _field(None, "deliberate failure for testing recovery: oom@STEP, nan@STEP or "
                                        "crash@STEP (process exits; fresh starts only)")
    save_model: Optional[str] = _field(None, "directory to write the fine-tuned model to (official layout) "
                                             "when the job ends ok")

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every value that cannot work, each naming its field: one check for `train`, `run`, its
        `--dry-run` and the space probe, so a bad setting fails before any trial is scheduled."""
        found: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                found.append(message)

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(number(self.lr) and self.lr > 0, f"lr must be a positive finite number, got {self.lr!r}")
        need(number(self.val_fraction) and 0 < self.val_fraction < 1,
             f"val_fraction must be between 0 and 1, got {self.val_fraction!r}")
        need(number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
             f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        need(number(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be ≥ 0, got {self.weight_decay!r}")
        need(number(self.max_grad_norm) and self.max_grad_norm > 0,
             f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2 ** 32,  # numpy's seeds; others fail in every trial
             f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for name in ("diverge_patience", "max_new_tokens", "max_val_samples"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be ≥ 1, got {value!r}")
        for name, (kind, optional) in field_types().items():
            if typing.get_origin(kind) is Literal:
                choices, value = typing.get_args(kind), getattr(self, name)
                need(value in choices or (value is None and optional),
                     f"{name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            need(number(value) and 0 <= value < 1, f"{name} must be in [0, 1), got {value!r}")
        need(self.peak_tflops is None or (number(self.peak_tflops) and self.peak_tflops > 0),
             f"peak_tflops must be a positive number, got {self.peak_tflops!r}")
        need(number(self.adam_eps) and self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps!r}")
        need(isinstance(self.lora_rank, int) and self.lora_rank >= 1, f"lora_rank must be ≥ 1, got {self.lora_rank!r}")
        need(number(self.lora_alpha) and self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        need(bool(lora_target_names(self.lora_targets)),
             f"lora_targets must name at least one layer (e.g. {LORA_TARGETS}), got {self.lora_targets!r}")
        unknown_targets = sorted(set(lora_target_names(self.lora_targets)) - set(lora_target_names(LORA_TARGETS)))
        need(not unknown_targets, f"lora_targets {', '.join(unknown_targets)} match no linear layer of the text "
                                  f"decoder; it has {LORA_TARGETS.replace(',', ', ')}")
        need(precision_problem(self.precision, self.trained_dtype) is None,
             str(precision_problem(self.precision, self.trained_dtype)))
        need(self.device is None or bool(DEVICE.match(str(self.device))),
             f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        # bitsandbytes' 8-bit update is a kernel of its own that takes no sharded (DTensor) state
        need(not (self.parallel == "fsdp" and self.optimizer == "adamw8bit"),
             "parallel=fsdp cannot shard optimizer=adamw8bit (bitsandbytes' 8-bit update takes no sharded tensors); "
             "use optimizer=adamw, or parallel=ddp")
        checks = (
            ("", lambda: check_budget_fields(
                batch_size=self.batch_size, grad_accum=self.grad_accum, epochs=self.epochs,
                max_samples=self.max_samples, max_steps=self.max_steps, eval_every=self.eval_every,
                eval_every_samples=self.eval_every_samples)),
            ("", lambda: Fault.parse(self.fault)),
            ("max_gpu_memory: ", lambda: self.max_gpu_memory is None or cap_fraction(self.max_gpu_memory, 2 ** 60)),
        )
        for label, check in checks:
            try:
                check()
            except (ValueError, TypeError) as e:
                found.append(f"{label}{e}")
        return found

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


@dataclass(frozen=True)
class Metric:
    """One number a job reports at each evaluation."""

    type: type  # int or float: the Parquet column's type follows
    lower_is_better: bool = False  # which way a sweep optimising it goes by default
    help: str = ""


# Everything `run_job` reports at an evaluation (a test holds it to exactly these keys): the Parquet schema,
# the sweep's --metric choices and the default direction of each objective are all read from this table.
REPORT_METRICS: dict[str, Metric] = {
    "step": Metric(int, help="optimizer steps completed"),
    "samples_seen": Metric(int, help="training samples so far"),
    "epoch": Metric(float),
    "train_loss": Metric(float, lower_is_better=True, help="mean loss over the steps since the last report"),
    "token_accuracy": Metric(float),
    "lr": Metric(float),
    "grad_norm": Metric(float, lower_is_better=True),
    "scaler_skipped_steps": Metric(int, lower_is_better=True, help="fp16 steps skipped for inf/NaN gradients"),
    "samples_per_s": Metric(float),
    "tokens_per_s": Metric(float),
    "flops_per_sample": Metric(float, help="training FLOPs per sample, counted from the shapes that ran "
                                           "(trainer.model.flops)"),
    "achieved_tflops": Metric(float, help="training FLOPs per second, in TFLOP/s"),
    "mfu": Metric(float, help="model FLOPs utilisation: achieved_tflops / the device's dense peak; null on CPU"),
    "peak_memory_bytes": Metric(int, lower_is_better=True, help="GPU allocator peak; process RSS on CPU"),
    "val_exact_match": Metric(float),
    "val_exact_match_low": Metric(float, help="95 % Wilson interval"),
    "val_exact_match_high": Metric(float, help="95 % Wilson interval"),
    "val_cer": Metric(float, lower_is_better=True),
    "val_n": Metric(int),
    "skipped_samples": Metric(int, lower_is_better=True),
    "elapsed_s": Metric(float, lower_is_better=True),
}

# What a held-out test of a finished model gives (trainer.held_out): never reported during training, so never an
# objective; a sweep measures it once for its best trials and adds it to their rows.
TEST_METRICS: dict[str, Metric] = {
    "test_exact_match": Metric(float, help="exact match on --test-data"),
    "test_exact_match_low": Metric(float, help="95 % Wilson interval"),
    "test_exact_match_high": Metric(float, help="95 % Wilson interval"),
    "test_cer": Metric(float, lower_is_better=True),
    "test_n": Metric(int, help="test samples"),
}


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
    test_metrics: dict[str, Any] = field(default_factory=dict)  # run_job(test_data=...): the final model's test_*
    tokenizer: dict[str, Any] = field(default_factory=dict)  # the tokenizer the job used (TokenizerChoice.as_record)
    hardware: dict[str, Any] = field(default_factory=dict)  # where it ran and how (HARDWARE_COLUMNS)
    # each rank's peak memory (as peak_memory_bytes, rank 0's), by rank; empty where the ranks did not end together
    rank_peak_memory_bytes: list[int] = field(default_factory=list)


# What a job records of the hardware it ran on, beside its metrics: the trials table's columns of these names.
# `workers`: the ranks that shared the job (trainer.parallel), as the job itself counted them.
HARDWARE_COLUMNS: dict[str, type] = {"device_name": str, "attention_kernel": str, "workers": int}


@functools.lru_cache(maxsize=1)
def field_types() -> dict[str, tuple[Any, bool]]:
    """JobConfig field name -> (base type, optional), Literal[...] kept as is: the one reading of the
    annotations, for the config's own checks, CLI values and the Parquet schema. Read-only."""
    def unwrap(tp: Any) -> tuple[Any, bool]:
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1:
                return rest[0], True
        return tp, False

    hints = typing.get_type_hints(JobConfig)
    return {f.name: unwrap(hints[f.name]) for f in dataclasses.fields(JobConfig)}
