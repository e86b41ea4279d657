"""A stand-in for `run_job` that trains nothing: for measuring what the sweep machinery costs at scale.

A sweep's job is a setting (`SweepSettings.job_fn`), so `bench/scale.py` runs a thousand trials with this one
instead of the real job: no torch, no data read, just reports. Each trial reports `max_steps / eval_every`
evaluations, one every `MDSWEEP_STANDIN_SECONDS` seconds (default 0.5), with a validation metric that depends
on lr and grad_accum as a real sweep's would (best near lr 3e-4 and grad_accum 2, rising with the steps), so
the search has something to find. It ends with per-sample predictions on `val_n` (200) validation samples, right
with the trial's final exact match as probability, so paired comparisons and the predictions table cost what
they cost in a real sweep. With `MDSWEEP_STANDIN_CHECKPOINT_BYTES` set, each report comes with a checkpoint of
that size, as a real trial's does. Deterministic: the same config gives the same reports.
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.job_config import JobConfig, JobResult, Prediction

SECONDS_VARIABLE = "MDSWEEP_STANDIN_SECONDS"
CHECKPOINT_VARIABLE = "MDSWEEP_STANDIN_CHECKPOINT_BYTES"
VAL_N = 200


def quality(lr: float, grad_accum: int) -> float:
    """The exact match a trial of these settings ends at: a bump in log10(lr) around 3e-4, best at grad_accum 2."""
    return 0.9 * math.exp(-((math.log10(lr) + 3.5) ** 2) / 0.8) * (1.0 - 0.08 * abs(math.log2(grad_accum) - 1.0))


def report_at(config: JobConfig, evaluation: int, total: int) -> dict[str, Any]:
    """The metrics of evaluation `evaluation` of `total`: rising towards the trial's quality, with seeded noise."""
    key = f"{config.lr}-{config.grad_accum}-{config.attention}-{config.seed}-{evaluation}"
    noise = random.Random(key).gauss(0, 0.01)
    value = min(1.0, max(0.0, quality(config.lr, config.grad_accum) * (1 - math.exp(-3 * evaluation / total)) + noise))
    step = evaluation * (config.eval_every or 1)
    return {"step": step, "samples_seen": step * config.batch_size * config.grad_accum, "epoch": evaluation / total,
            "train_loss": 2.0 * (1.0 - value) + 0.05, "val_exact_match": value, "val_cer": (1.0 - value) / 3,
            "val_n": VAL_N, "lr": config.lr, "elapsed_s": 0.0}


def predictions(config: JobConfig, exact_match: float) -> list[Prediction]:
    """The final evaluation's answers: sample i is read right when its seeded draw falls under the exact match, so
    two trials of similar quality agree on most samples, as real ones do."""
    answers = []
    for i in range(VAL_N):
        target = f"{i:06d}"
        right = random.Random(f"{config.seed}-{i}").random() < exact_match
        answers.append(Prediction(sample_id=str(i), target=target, prediction=target if right else target[::-1],
                                  correct=right, cer=0.0 if right else 1.0))
    return answers


def run_standin_job(config: JobConfig, on_report: Optional[Callable[[dict[str, Any], Optional[Path]], None]] = None,
                    checkpoint_dir: Optional[Path] = None, resume_from: Optional[Path] = None,
                    **_: Any) -> JobResult:
    """Report every evaluation of the trial's budget (from `resume_from`'s step on), then end `ok`."""
    seconds = float(os.environ.get(SECONDS_VARIABLE, "0.5"))
    checkpoint_bytes = int(os.environ.get(CHECKPOINT_VARIABLE, "0"))
    total = max(1, (config.max_steps or 1) // (config.eval_every or 1))
    done = resume_from / "evaluation" if resume_from is not None else None
    first = int(done.read_text()) + 1 if done is not None and done.is_file() else 1
    started = time.time()
    metrics: dict[str, Any] = {}
    for evaluation in range(first, total + 1):
        time.sleep(seconds)
        metrics = {**report_at(config, evaluation, total), "elapsed_s": time.time() - started}
        saved = None
        if checkpoint_bytes and checkpoint_dir is not None:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / "state.bin").write_bytes(bytes(checkpoint_bytes))
            (checkpoint_dir / "evaluation").write_text(str(evaluation))
            saved = checkpoint_dir
        if on_report is not None:
            on_report(metrics, saved)
    final = report_at(config, total, total)
    return JobResult(outcome="ok", step=total * (config.eval_every or 1), final_metrics=metrics or final,
                     best_metrics=metrics or final, predictions=predictions(config, final["val_exact_match"]),
                     wall_time_s=time.time() - started)
