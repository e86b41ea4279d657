"""Predicted peak GPU memory of one job, from its settings and the model's sizes, without torch.

Memory depends on the shape of a configuration (scope, batch, sequence, precision,
optimizer, checkpointing, attention backend, adapter rank), not on its learning rate,
so a sweep can know it before a trial runs: to choose each trial's GPU share, to plan
how many trials fit a GPU, and to stop proposing shapes that cannot fit.

What is counted, and the assumptions (also in the README):
- Weights, gradients and optimizer states: exact byte counts from the parameter
  shapes (checked against real modules and real optimizer states in the tests).
- The peak is the largest of four phases on top of weights and optimizer states:
  the vision pass, the end of the forward pass, the backward pass (all gradients
  plus what is kept and one block's recomputation) and the optimizer step.
  Gradients exist before backward only when grad_accum > 1 (earlier micro-batches).
- The optimizer step: torch's multi-tensor AdamW (`adamw` on CUDA) makes one
  temporary copy of all trained values (its denominator); fused and 8-bit do not.
- fp16/bf16 compute over fp32 trained weights: linear layers keep a half copy of
  their weight for backward. With checkpointing the trainer turns the autocast
  weight cache off, so only the recomputed block's copies exist at once (with the
  cache on, the forward pass would hold half copies of all of them: 2.6 GiB for
  the real text decoder).
- Activations of a decoder block, per token: `D_BYTES[c]`·dim + 5·c·ff_dim bytes
  saved for backward, where c is the compute type's size (28·dim + 20·ff fp32,
  22·dim + 10·ff bf16). Fitted to allocations
  measured on CPU with `trainer.memory.sizes.track_allocations` (bench/activation_fit.py);
  the 5·c·ff term is the MLP input, fc1 output and the tanh-GELU's intermediates.
  With gradient checkpointing a block keeps only its input (the fp32 residual) and
  one block is recomputed at a time during backward.
- Logits only at text positions (the trainer asks for no more): half logits, an fp32
  copy and the fp32 log-softmax.
- `eager-4d` keeps, per layer (per recomputed layer with checkpointing), the fp32
  probabilities [B, heads, S, S] and their half copy, and builds one float
  [B, 1, S, S] mask; `sdpa` and `flex` never hold S×S per head.
- A frozen vision tower runs without autograd: only one block's intermediates at a
  time, before the decoder runs.
- The CUDA context (kernels, cuBLAS workspace) is outside the allocator and outside
  `max_gpu_memory`; `CUDA_CONTEXT_BYTES` is an assumption until measured on a GPU.

On k workers (trainer.parallel) the estimate is one rank's, each rank holding its share
of the micro-batch (batch_size / k samples) and its own CUDA context:
- `ddp`: a full replica, plus DDP's gradient buckets. torch 2.13's reducer allocates,
  when the model is wrapped, one flat bucket per ~25 MB of trained parameters (the first
  1 MB) covering every trained parameter; with `gradient_as_bucket_view=False` (the
  trainer's setting, DDP's default) they are a second copy of the gradients, held for
  the whole job (`buckets`). The wrap's one-off broadcast of the weights is over before
  training and smaller than its peak.
- `fsdp` (FSDP2 `fully_shard`; each decoder block and each vision block a unit, the rest
  the root): weights, gradients and optimizer states ÷ k; the root's weights gathered
  from its forward to the end of backward (FSDP2 never reshards the root in between),
  with its trained weights' full gradients through backward until their reduce-scatter;
  and two block units gathered at once (the running one and the prefetched next), with,
  in backward, one unit's full gradients and its reduce-scatter input. Gathered weights
  are in the compute type when it is half (the mixed-precision policy), else in their
  storage type, and so need no autocast half copies. With grad_accum > 1 the earlier
  micro-batches skip the reduce-scatter (FSDP's gradient sync off), so they leave every
  gradient unsharded until the last one: accumulation costs FSDP the full gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from trainer.model.config import MoondreamConfig, TextConfig, model_config_of
from trainer.job_config import JobConfig
from trainer.model.choices import LORA_TARGETS, lora_target_names
from trainer.memory.optimizers import BLOCK_SIZE_8BIT, MIN_8BIT_SIZE, QUANTILE_MAP_VALUES
from trainer.memory.precision import BYTES_PER_VALUE, plan_precision

GIB = 2 ** 30
CUDA_CONTEXT_BYTES = 600 * 2 ** 20
# text tokens a sequence holds besides BOS and the image when nothing better is known: prompt, answer, EOS
PLANNING_TEXT_TOKENS = 24
# crops per image when nothing better is known: a captcha is one global crop plus one tile
PLANNING_CROPS_PER_IMAGE = 2
# bytes saved per token per unit of model width, by compute size (see the module docstring)
D_BYTES = {4: 28, 2: 22}
FF_VALUES = 2
# the JobConfig fields `estimate_memory` reads: configurations equal in these need the same memory
MEMORY_FIELDS: tuple[str, ...] = ("model", "train_scope", "lora_rank", "lora_targets", "optimizer", "precision",
                                  "trained_dtype", "frozen_dtype", "batch_size", "grad_accum",
                                  "gradient_checkpointing", "attention_backend", "parallel")


def memory_shape(config: JobConfig) -> tuple[tuple[str, Any], ...]:
    """What of a configuration decides its memory: configurations with equal shapes need the same."""
    return tuple((name, getattr(config, name)) for name in MEMORY_FIELDS)


# the FSDP unit of everything outside the vision and decoder blocks: stem, projection, embedding, head
ROOT_UNIT = "root"


@dataclass(frozen=True)
class ParamTensor:
    part: str  # vision, projection, text or lora
    numel: int
    trains: bool
    unit: str = ROOT_UNIT  # the FSDP unit it is sharded and gathered with: a block ("vision.3", "text.0") or the root


def _linear(part: str, n_in: int, n_out: int, trains: bool, bias: bool = True,
            unit: str = ROOT_UNIT) -> list[ParamTensor]:
    return [ParamTensor(part, n_in * n_out, trains, unit)] + ([ParamTensor(part, n_out, trains, unit)] if bias else [])


def _norm(part: str, width: int, trains: bool, unit: str = ROOT_UNIT) -> list[ParamTensor]:
    return [ParamTensor(part, width, trains, unit), ParamTensor(part, width, trains, unit)]


def decoder_linears(text: TextConfig) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each linear layer of a Phi decoder block, by the name LoRA targets use."""
    head_dim = text.dim // text.n_heads
    return {"q_proj": (text.dim, text.n_heads * head_dim), "k_proj": (text.dim, text.n_kv_heads * head_dim),
            "v_proj": (text.dim, text.n_kv_heads * head_dim), "dense": (text.n_heads * head_dim, text.dim),
            "fc1": (text.dim, text.ff_dim), "fc2": (text.ff_dim, text.dim)}


def parameter_tensors(model: MoondreamConfig, scope: str, lora_rank: int = 16,
                      lora_targets: str = LORA_TARGETS) -> list[ParamTensor]:
    """Every parameter tensor of the model (and its LoRA adapters), with whether it trains under `scope`."""
    v, t = model.vision, model.text
    vision_trains, projection_trains = scope == "all", scope in ("text+projection", "all")
    text_trains = scope != "lora"
    tensors = [ParamTensor("vision", v.enc_dim * v.in_channels * v.enc_patch_size ** 2, vision_trains),
               ParamTensor("vision", v.enc_dim, vision_trains),
               ParamTensor("vision", v.n_image_tokens * v.enc_dim, vision_trains)]
    for layer in range(v.enc_n_layers):
        unit = f"vision.{layer}"
        tensors += _norm("vision", v.enc_dim, vision_trains, unit) + _norm("vision", v.enc_dim, vision_trains, unit)
        for _ in range(4):
            tensors += _linear("vision", v.enc_dim, v.enc_dim, vision_trains, unit=unit)
        tensors += _linear("vision", v.enc_dim, v.enc_ff_dim, vision_trains, unit=unit)
        tensors += _linear("vision", v.enc_ff_dim, v.enc_dim, vision_trains, unit=unit)
    tensors += _norm("vision", v.enc_dim, vision_trains)
    tensors += _linear("projection", 2 * v.enc_dim, v.proj_inner_dim, projection_trains)
    tensors += _linear("projection", v.proj_inner_dim, v.proj_out_dim, projection_trains)

    targets = set(lora_target_names(lora_targets)) if scope == "lora" else set()
    tensors.append(ParamTensor("text", t.vocab_size * t.dim, text_trains))
    for layer in range(t.n_layers):
        unit = f"text.{layer}"
        tensors += _norm("text", t.dim, text_trains, unit)
        for name, (n_in, n_out) in decoder_linears(t).items():
            tensors += _linear("text", n_in, n_out, text_trains, unit=unit)
            if name in targets:
                tensors += [ParamTensor("lora", lora_rank * n_in, True, unit),
                            ParamTensor("lora", n_out * lora_rank, True, unit)]
    tensors += _norm("text", t.dim, text_trains) + _linear("text", t.dim, t.vocab_size, text_trains)
    return tensors


def optimizer_state_bytes(optimizer: str, tensors: list[ParamTensor], trained_bytes: int) -> int:
    """Bytes of optimizer state for the trained tensors, as torch and bitsandbytes keep it."""
    total = 0
    for tensor in (t for t in tensors if t.trains):
        if optimizer == "adamw8bit" and tensor.numel >= MIN_8BIT_SIZE:
            # two uint8 states, their fp32 block scales, and two 256-value fp32 quantile maps
            total += 2 * tensor.numel + 2 * 4 * math.ceil(tensor.numel / BLOCK_SIZE_8BIT) + 2 * 4 * QUANTILE_MAP_VALUES
        elif optimizer == "adamw8bit":
            total += 2 * 4 * tensor.numel  # small tensors keep fp32 states
        else:
            total += 2 * trained_bytes * tensor.numel + 4  # exp_avg, exp_avg_sq, and the fp32 step counter
    return total


def lora_inputs(config: JobConfig, model: MoondreamConfig) -> int:
    """Values per token per block that LoRA adapters keep: each adapted layer saves its input again, cast
    to the adapter's type."""
    if config.train_scope != "lora":
        return 0
    linears = decoder_linears(model.text)
    return sum(linears[name][0] for name in lora_target_names(config.lora_targets) if name in linears)


@dataclass(frozen=True)
class Workload:
    """What one micro-batch holds, beyond the config: text tokens per sequence and crops per image."""
    text_tokens: int = PLANNING_TEXT_TOKENS
    crops_per_image: int = PLANNING_CROPS_PER_IMAGE


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer_states: int
    transient: int  # the most activations or optimizer-step temporaries take at one time, beyond gradients
    allocator_peak: int  # what `torch.cuda.max_memory_allocated` should read; what `max_gpu_memory` must allow
    cuda_context: int
    buckets: int = 0  # DDP's gradient buckets on k > 1 workers: a second copy of the gradients, held throughout

    @property
    def device_total(self) -> int:
        """What the job takes of the GPU, context included: what packing trials onto a GPU has to use."""
        return self.allocator_peak + self.cuda_context

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Gathered:
    """What FSDP holds unsharded beyond the shards, by phase (module docstring): all zero for DDP and one worker."""
    forward: int = 0
    backward: int = 0


def fsdp_gathered(tensors: list[ParamTensor], gathered_bytes: dict[bool, int], trained_bytes: int) -> Gathered:
    """The root unit gathered throughout; two block units gathered at once; in backward the root's full trained
    gradients, and one block unit's full gradients with their reduce-scatter input (in the trained type).
    `gathered_bytes[trains]`: the bytes of a gathered value; its gradient has the same type."""
    gathered: dict[str, int] = {}
    trained: dict[str, int] = {}  # trained values per unit
    for t in tensors:
        gathered[t.unit] = gathered.get(t.unit, 0) + gathered_bytes[t.trains] * t.numel
        trained[t.unit] = trained.get(t.unit, 0) + (t.numel if t.trains else 0)
    root, root_trained = gathered.pop(ROOT_UNIT, 0), trained.pop(ROOT_UNIT, 0)
    blocks = sum(sorted(gathered.values(), reverse=True)[:2])
    block_gradients = (gathered_bytes[True] + trained_bytes) * max(trained.values(), default=0)
    return Gathered(forward=root + blocks,
                    backward=root + gathered_bytes[True] * root_trained + blocks + block_gradients)


def estimate_memory(config: JobConfig, model: Optional[MoondreamConfig] = None,
                    workload: Workload = Workload(), workers: int = 1) -> MemoryEstimate:
    """Predicted peak memory of `config` on a CUDA GPU; `model` defaults to the sizes `config.model` loads with.
    On `workers` > 1 ranks (`config.parallel`), the peak of one of them: what each worker's GPU must hold."""
    model = model or model_config_of(config.model)
    plan = plan_precision(config.precision, config.trained_dtype, config.frozen_dtype, on_gpu=True)
    c = BYTES_PER_VALUE[plan.compute]
    trained_bytes, frozen_bytes = BYTES_PER_VALUE[plan.trained], BYTES_PER_VALUE[plan.frozen]
    tensors = parameter_tensors(model, config.train_scope, config.lora_rank, config.lora_targets)
    strategy = config.parallel if workers > 1 else None
    gathered, unsharded_gradients = Gathered(), 0
    if strategy == "fsdp":
        # each rank keeps 1/k of every tensor (dim 0 padded to a multiple of k: at most k-1 rows, neglected)
        half = plan.compute != "fp32"
        gathered = fsdp_gathered(tensors, {True: c if half else trained_bytes, False: c if half else frozen_bytes},
                                 trained_bytes)
        unsharded_gradients = trained_bytes * sum(t.numel for t in tensors if t.trains)
        tensors = [replace(t, numel=-(-t.numel // workers)) for t in tensors]
    n_trained = sum(t.numel for t in tensors if t.trains)
    n_frozen = sum(t.numel for t in tensors if not t.trains)
    weights = trained_bytes * n_trained + frozen_bytes * n_frozen
    gradients = trained_bytes * n_trained
    states = optimizer_state_bytes(config.optimizer, tensors, trained_bytes)
    buckets = gradients if strategy == "ddp" else 0

    v, t = model.vision, model.text
    batch = -(-config.batch_size // workers)  # this rank's share of the micro-batch
    seq = 1 + v.n_image_tokens + workload.text_tokens
    tokens = batch * seq
    # half copies of fp32 trained weights that linear layers keep for backward; with checkpointing (and the
    # autocast cache off, as the trainer runs it) only one block's worth at a time; FSDP gathers them half already
    half_copies = c * n_trained if plan.compute != "fp32" and plan.trained == "fp32" and strategy != "fsdp" else 0
    if config.gradient_checkpointing:
        half_copies //= max(t.n_layers, 1)
    # the residual stream is in the embedding's storage type: frozen under LoRA
    residual = trained_bytes if config.train_scope != "lora" else frozen_bytes
    block = tokens * (D_BYTES[c] * t.dim + FF_VALUES * c * t.ff_dim + trained_bytes * lora_inputs(config, model))
    attention = 0
    if config.attention_backend == "eager-4d":  # scores kept per layer, or for the recomputed layer only
        layers_with_scores = 1 if config.gradient_checkpointing else t.n_layers
        attention = layers_with_scores * batch * t.n_heads * seq * seq * (4 + c) + batch * seq * seq * 4
    logits = batch * (workload.text_tokens + 1) * t.vocab_size * (c + 8)
    if config.gradient_checkpointing:
        kept = t.n_layers * tokens * t.dim * residual
        recompute = block  # one block recomputed, with its activation gradients, during backward
    else:
        kept = t.n_layers * block
        recompute = block // 2

    # one micro-batch on the device: fp32 pixels of its crops and int64 token ids and labels
    inputs = batch * (workload.crops_per_image * v.in_channels * v.crop_size ** 2 * 4 + 2 * workload.text_tokens * 8)
    crop_tokens = batch * workload.crops_per_image * v.n_image_tokens
    vision_block = crop_tokens * (D_BYTES[c] * v.enc_dim + FF_VALUES * c * v.enc_ff_dim)
    vision_pass = vision_block  # a frozen tower: one block's intermediates at a time, before the decoder
    if config.train_scope == "all":  # a trained tower keeps its activations for its own backward
        vision_kept = v.enc_n_layers * (crop_tokens * v.enc_dim * trained_bytes if config.gradient_checkpointing
                                        else vision_block)
        kept += vision_kept
        vision_pass += vision_kept

    # gradients exist before the backward pass only when earlier micro-batches of the step left them (FSDP: whole,
    # turned into shards one unit at a time in the last micro-batch's backward)
    earlier_gradients = (unsharded_gradients if strategy == "fsdp" else gradients) if config.grad_accum > 1 else 0
    phases = {
        "vision pass": earlier_gradients + inputs + vision_pass + gathered.forward,
        "forward end": earlier_gradients + inputs + half_copies + kept + attention + logits + gathered.forward,
        "backward": max(gradients, earlier_gradients) + inputs + half_copies + kept + recompute + attention + logits
        + gathered.backward,
        # torch's multi-tensor AdamW makes one temporary the size of all trained values; fused and 8-bit do not
        "optimizer step": gradients + (trained_bytes * n_trained if config.optimizer == "adamw" else 0),
    }
    peak_phase = max(phases.values())
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer_states=states,
                          transient=max(peak_phase - gradients, 0),
                          allocator_peak=weights + states + buckets + peak_phase, cuda_context=CUDA_CONTEXT_BYTES,
                          buckets=buckets)
