"""One fine-tuning job: data → model → train (fp16/bf16/fp32, accumulation, checkpointing) → evaluate.

`run_job` is the interface the sweep uses. It reports through callbacks and
returns an outcome instead of raising for the failures a sweep must survive: a
CUDA out-of-memory (`oom`) and a loss that stays non-finite (`diverged`).
Anything else (a bug, bad input) raises.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainer.data.batching import Batch
from trainer.budget import plan_budget, worker_split_problem
from trainer.checkpoint import Progress, TrainState, trainable_state
from trainer.devices import (TORCH_DTYPES, autocast_dtype_of, device_name, peak_tflops, resolve_device,
                             resolve_precision)
from trainer.evaluation.evaluate import evaluate
from trainer.faults import Fault
from trainer.held_out import test_metrics
from trainer.job_config import JobConfig, JobResult, Prediction
from trainer.job_data import micro_batches, open_job_data, prepare_data
from trainer.job_model import build_job_model, trained_model
from trainer.model.attention import attention_kernel
from trainer.model.flops import train_step_flops
from trainer.model.loading import LoadedModel, save_model
from trainer.memory.sizes import apply_gpu_cap, peak_bytes, reset_peak
from trainer.model.network import MoondreamModel
from trainer.memory.optimizers import build_optimizer, warmup_cosine
from trainer.memory.precision import PrecisionPlan
from trainer.parallel.ranks import current_ranks, gather_over_ranks, sum_over_ranks, wait_for_main
from trainer.parallel.replica import Replica
from trainer.parallel.sharding import full_value

Reporter = Callable[[dict[str, Any], Optional[Path]], None]
StepCallback = Callable[[dict[str, Any]], None]
ResumeCallback = Callable[[int, dict[str, Any]], None]


class Diverged(Exception):
    """The loss stayed non-finite for `diverge_patience` consecutive steps."""


def cap_note(cap: Optional[int]) -> str:
    """What an `oom` outcome adds about the allocator cap: whether the job ran out of the GPU or of its share."""
    return f" (cap {cap} bytes)" if cap else ""


def decoder_attention_kernel(model: MoondreamModel, mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel this job's decoder runs on (trainer.model.attention.attention_kernel); on a GPU, a
    fall back to PyTorch's math kernel, the slowest and largest, is said in the job's log."""
    text = model.config.text
    kernel = attention_kernel(mode, model.attention_backend, heads=text.n_heads, head_dim=text.dim // text.n_heads,
                              prefix_len=model.prefix_len, text_len=16, device=device, dtype=dtype)
    if device.type == "cuda" and kernel == "math":
        print(f"mdsweep: warning: the {mode} attention runs on PyTorch's math kernel on {device_name(device)} "
              "(slow, and memory grows with the square of the sequence); attention_backend=flex avoids it",
              file=sys.stderr, flush=True)
    return kernel


def prepare_model(config: JobConfig, precision: PrecisionPlan) -> LoadedModel:
    """The job's model as it trains, still on the CPU: built (trainer.job_model), its weights in their storage
    types, checkpointing as asked."""
    loaded = build_job_model(config)
    loaded.model.store_weights(TORCH_DTYPES[precision.trained], TORCH_DTYPES[precision.frozen])
    loaded.model.set_gradient_checkpointing(config.gradient_checkpointing)
    return loaded


def run_job(config: JobConfig, on_report: Optional[Reporter] = None, checkpoint_dir: Optional[Path] = None,
            resume_from: Optional[Path] = None, on_step: Optional[StepCallback] = None,
            test_data: Optional[str] = None, on_resume: Optional[ResumeCallback] = None) -> JobResult:
    """Run one job to its outcome; see the module docstring for what raises and what returns.

    `test_data`: a held-out set the final model is evaluated on once, when the job ends ok (`test_*` metrics in
    the result); it never steers training. A sweep does not pass it: it tests its best trials at the end.
    `on_resume(step, report)`: a resumed job says which step its checkpoint holds and the report made there, so
    whoever keeps rows can drop those of steps it will run again and keep the rest.

    In a torch.distributed process group of k > 1 workers (trainer.parallel), every rank calls this: each trains
    on its share of every micro-batch, and rank 0 alone evaluates, writes checkpoints, tests, saves the model
    and calls the callbacks (under FSDP every rank takes part in gathering the model whole for them); the other
    ranks return their outcome without metrics or predictions.
    """
    started = time.time()
    ranks = current_ranks()
    split_problem = worker_split_problem(config.batch_size, ranks.world)
    if split_problem:
        raise ValueError(split_problem)
    fault = Fault.parse(config.fault)
    device = resolve_device(config.device)
    precision = resolve_precision(config, device)
    autocast_dtype = autocast_dtype_of(precision)

    opened = open_job_data(config)
    # capped before the model arrives, so its weights count against the cap like every later allocation
    cap = apply_gpu_cap(config.max_gpu_memory, device)
    reset_peak(device)
    loaded = prepare_model(config, precision)
    model = loaded.model
    try:
        model.to(device).train()
    except torch.OutOfMemoryError:
        return JobResult(outcome="oom", step=0, peak_memory_bytes=peak_bytes(device),
                         error=f"out of memory moving the model to {device}{cap_note(cap)}",
                         wall_time_s=time.time() - started)
    replica = Replica(model, ranks, config.parallel, device, compute_dtype=autocast_dtype)
    hardware = {"device_name": device_name(device), "attention_kernel": decoder_attention_kernel(
        model, config.attention, device, autocast_dtype or TORCH_DTYPES[precision.trained]), "workers": ranks.world}
    data = prepare_data(config, loaded, opened)
    pad_id = loaded.tokenizer.eos_id

    budget = plan_budget(len(data.train), batch_size=config.batch_size, grad_accum=config.grad_accum,
                         epochs=config.epochs, max_samples=config.max_samples, max_steps=config.max_steps,
                         eval_every=config.eval_every, eval_every_samples=config.eval_every_samples)
    total_steps = budget.total_steps

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, params, lr=config.lr, weight_decay=config.weight_decay,
                                betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, round(config.warmup_ratio * total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.uses_loss_scaler)
    progress = Progress()
    final: dict[str, Any] = {}
    predictions: list[Prediction] = []
    resumed = resume_from is not None
    if resumed:
        saved = TrainState.load(resume_from)
        saved.restore(replica, optimizer, scheduler, scaler)
        # a checkpoint taken at the last step leaves nothing to run: its evaluation is the result
        progress, final, predictions = saved.progress, saved.final, saved.predictions
        if on_resume and ranks.main:
            on_resume(progress.step, dict(final))

    peak = peak_tflops(device, precision.compute, config.peak_tflops)
    stream = micro_batches(data.train, config.batch_size, config.seed, progress.micro_batches, pad_id, ranks)
    window: list[dict[str, float]] = []

    # every rank's peak, gathered where all ranks end training together (the loop's end, a divergence, which the
    # summed loss makes every rank's); not after an out-of-memory error, which may be one rank's alone
    rank_peaks: list[Optional[int]] = [None] * ranks.world

    def result(outcome: str, error: Optional[str] = None, tested: Optional[dict[str, Any]] = None) -> JobResult:
        peak = peak_bytes(device)  # this rank's own, to the end: rank 0 alone tests and saves the model
        peaks = [peak if r == ranks.rank else p for r, p in enumerate(rank_peaks)]
        return JobResult(outcome=outcome, step=progress.step, final_metrics=final,
                         best_metrics=progress.best_metrics, peak_memory_bytes=peak, error=error,
                         predictions=predictions, wall_time_s=time.time() - started, test_metrics=tested or {},
                         tokenizer=loaded.tokenizer_choice.as_record(), hardware=hardware,
                         rank_peak_memory_bytes=[] if None in peaks else peaks)

    try:
        while progress.step < total_steps:
            step = progress.step + 1
            if fault:
                fault.before_step(step, resumed)
            t0 = time.perf_counter()
            group = [next(stream) for _ in range(budget.group_size(progress.micro_batches))]
            progress.micro_batches += len(group)
            samples_before, progress.samples_seen = progress.samples_seen, budget.samples_in(progress.micro_batches)
            loss_total, correct, labelled = accumulate_gradients(
                replica, group, config.attention, scaler, device, autocast_dtype,
                poison=bool(fault and fault.poisons_loss(step)))
            # every sequence the decoder runs: BOS + image tokens + padded text
            decoder_tokens = sum(b.text_ids.numel() + len(b.samples) * model.prefix_len for b in group)
            step_flops = sum(train_step_flops(model.config, config.train_scope, model.gradient_checkpointing,
                                              crops=b.crops.shape[0], images=len(b.samples),
                                              text_len=b.text_ids.shape[1]) for b in group)
            # this rank's shares, added up over the ranks: the numbers of the whole step, as one worker has them
            loss_total, correct, decoder_tokens, step_flops = sum_over_ranks(
                ranks, [loss_total, correct, decoder_tokens, step_flops], device)
            grad_norm, skipped = optimizer_step(optimizer, scaler, params, config.max_grad_norm,
                                                finite_loss=math.isfinite(loss_total))
            scheduler.step()
            progress.step = step
            progress.scaler_skipped_steps += skipped
            progress.nonfinite_streak = 0 if math.isfinite(loss_total) else progress.nonfinite_streak + 1
            if progress.nonfinite_streak >= config.diverge_patience:
                raise Diverged(f"loss non-finite for {progress.nonfinite_streak} consecutive steps")
            seconds = time.perf_counter() - t0
            n_samples = progress.samples_seen - samples_before  # every worker's
            achieved_tflops = step_flops / seconds / 1e12
            metrics = {
                "step": step, "total_steps": total_steps, "samples_seen": progress.samples_seen,
                "epoch": progress.micro_batches / budget.batches_per_epoch,
                "train_loss": loss_total,
                "token_accuracy": correct / max(labelled, 1), "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm, "scaler_skipped_steps": progress.scaler_skipped_steps,
                "samples_per_s": n_samples / seconds, "tokens_per_s": decoder_tokens / seconds,
                "flops_per_sample": step_flops / n_samples, "achieved_tflops": achieved_tflops,
                "mfu": achieved_tflops / peak if peak else None,
                "peak_memory_bytes": peak_bytes(device),
            }
            window.append(metrics)
            if on_step and ranks.main:
                on_step(metrics)
            if budget.should_evaluate(step, samples_before, progress.samples_seen):
                # every rank takes part: FSDP gathers the model and the optimizer state whole onto rank 0
                with replica.whole() as whole:
                    optimizer_state = replica.optimizer_state(optimizer) if checkpoint_dir is not None else {}
                    if ranks.main:
                        val_metrics, predictions = evaluate(
                            whole, data.val, loaded.tokenizer, config.attention, batch_size=config.batch_size,
                            max_new_tokens=config.max_new_tokens, device=device, autocast_dtype=autocast_dtype)
                        final = report_metrics(window, val_metrics, data.skipped_samples, time.time() - started,
                                               device)
                        best = progress.best_metrics
                        if not best or final["val_exact_match"] > best["val_exact_match"]:
                            progress.best_metrics = dict(final)
                        if checkpoint_dir is not None:
                            TrainState.capture(whole, optimizer_state, scheduler, scaler, progress=progress,
                                               config=config, final=final, predictions=predictions
                                               ).save(Path(checkpoint_dir))
                        if on_report:
                            on_report(dict(final), Path(checkpoint_dir) if checkpoint_dir is not None else None)
                window = []
                wait_for_main(ranks)
    except torch.OutOfMemoryError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        return result("oom", f"out of memory at step {progress.step + 1}{cap_note(cap)}: {message}")
    except Diverged as exc:
        rank_peaks[:] = gather_over_ranks(ranks, peak_bytes(device), device)
        return result("diverged", str(exc))
    rank_peaks[:] = gather_over_ranks(ranks, peak_bytes(device), device)
    if not (test_data or config.save_model):
        return result("ok")
    with replica.whole() as whole:  # every rank takes part, as at an evaluation
        if not ranks.main:
            return result("ok")
        tested = test_metrics(whole, loaded, config, test_data, device=device,
                              autocast_dtype=autocast_dtype) if test_data else {}
        trained = trainable_state(whole) if config.save_model else None
    if trained is not None:
        # the training copy, its gradients and optimizer states give their memory back first: at real size
        # they and the fp32 rebuild below do not fit in host memory together
        optimizer.state.clear()
        replica.release()
        # rebuilt in fp32 with the trained tensors laid over it, as an export does: frozen parts kept in
        # half precision for training are not written rounded
        save_model(trained_model(config, trained, "this job"), Path(config.save_model))
    return result("ok", tested=tested)


def accumulate_gradients(replica: Replica, group: list[Batch], mode: str, scaler: torch.amp.GradScaler,
                         device: torch.device, autocast_dtype: Optional[torch.dtype], *,
                         poison: bool = False) -> tuple[float, int, int]:
    """Backward over this rank's shares of the micro-batches of one optimizer step; returns this rank's (loss,
    correct tokens) and the labelled tokens of the whole group, every rank's.

    Each micro-batch's summed loss is divided by the labelled tokens of the whole
    group, so the accumulated gradient is that of one batch of all the samples (on
    k workers, once DDP has averaged it: trainer.parallel.replica).
    `poison` turns the loss into NaN (the `nan@STEP` fault).
    """
    labelled = int(sum_over_ranks(replica.ranks, [sum(int((b.labels != -100).sum()) for b in group)], device)[0])
    loss_total, correct = 0.0, 0
    for i, batch in enumerate(group):
        batch = batch.to(device)
        with replica.micro_step(last=i == len(group) - 1):
            # with checkpointing the autocast weight cache would only hold a half copy of every trained weight
            # until the forward pass ends (2.6 GiB for the real text decoder): the recomputation casts again anyway
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None,
                                cache_enabled=not replica.model.gradient_checkpointing):
                loss_sum, n_correct, _ = replica.answer_loss(batch, mode)
            loss = loss_sum / labelled
            if poison:
                loss = loss * float("nan")
            scaler.scale(replica.backward_loss(loss)).backward()
        loss_total += float(loss.detach())
        correct += int(n_correct)
    return loss_total, correct, labelled


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.nn.Parameter],
                   max_grad_norm: float, *, finite_loss: bool) -> tuple[float, int]:
    """Unscale, clip and step; returns (grad norm, 1 if the step was skipped else 0).

    A non-finite loss skips the update outright; under fp16 the loss scaler also
    skips steps whose gradients overflowed, and lowers its scale.
    """
    if not finite_loss:
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update(scaler.get_scale() / 2)
        return float("nan"), 1
    scaler.unscale_(optimizer)
    # over FSDP's sharded gradients the norm is a DTensor: its full value is the global norm
    grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    skipped = int(scale_before is not None and scaler.get_scale() < scale_before)
    return grad_norm, skipped


def report_metrics(window: list[dict[str, float]], val_metrics: dict[str, float], skipped_samples: int,
                   elapsed_s: float, device: torch.device) -> dict[str, Any]:
    """One report: training metrics averaged over the steps since the last one, plus validation."""
    last = window[-1]
    mean = lambda key: sum(m[key] for m in window) / len(window)  # noqa: E731
    return {
        "step": last["step"], "samples_seen": last["samples_seen"], "epoch": last["epoch"],
        "train_loss": mean("train_loss"),
        "token_accuracy": mean("token_accuracy"), "lr": last["lr"], "grad_norm": last["grad_norm"],
        "scaler_skipped_steps": last["scaler_skipped_steps"], "samples_per_s": mean("samples_per_s"),
        "tokens_per_s": mean("tokens_per_s"), "flops_per_sample": mean("flops_per_sample"),
        "achieved_tflops": mean("achieved_tflops"), "mfu": None if last["mfu"] is None else mean("mfu"),
        "peak_memory_bytes": peak_bytes(device),
        **val_metrics, "skipped_samples": skipped_samples, "elapsed_s": elapsed_s,
    }
