"""How long a job trains and when it evaluates, counted in micro-batches and samples.

A budget in optimizer steps is unfair across settings: with `max_steps` a trial
with grad_accum 16 sees 16× the data of one with grad_accum 1, so a sweep over
grad_accum would reward compute rather than the setting. A budget in samples
(`max_samples`, or `epochs`) fixes the number of micro-batches instead; the last
optimizer step takes only the micro-batches left, so every grad_accum sees
exactly the same samples. `eval_every_samples` puts evaluations at the same
sample counts across trials (the step that reaches an evaluation point
accumulates only up to it), so curves and early-stopping rungs compare like
with like. Torch-free and importing nothing of the project: it is part of the trainer's base, so
`JobConfig` checks a budget with it and the sweep driver validates budgets without the model stack.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TrainingBudget:
    n_train: int
    batch_size: int
    grad_accum: int
    total_micro_batches: int
    eval_every_steps: Optional[int]  # evaluate every N optimizer steps, or
    eval_every_samples: Optional[int]  # every N training samples

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    @property
    def total_steps(self) -> int:
        steps, done = 0, 0
        while done < self.total_micro_batches:
            done += self.group_size(done)
            steps += 1
        return steps

    def group_size(self, micro_batches_done: int) -> int:
        """Micro-batches in the next optimizer step: grad_accum, fewer for the last one and, under
        `eval_every_samples`, for the one that reaches an evaluation point, so that every trial is
        evaluated after exactly the same samples."""
        most = min(self.grad_accum, self.total_micro_batches - micro_batches_done)
        if self.eval_every_samples:
            mark = self.samples_in(micro_batches_done) // self.eval_every_samples
            for size in range(1, most):
                if self.samples_in(micro_batches_done + size) // self.eval_every_samples > mark:
                    return size
        return most

    def samples_in(self, micro_batches: int) -> int:
        """Samples in the first `micro_batches` micro-batches (each epoch ends with a short batch)."""
        per_epoch = self.batches_per_epoch
        epochs, rest = divmod(micro_batches, per_epoch)
        return epochs * self.n_train + min(rest * self.batch_size, self.n_train)

    def should_evaluate(self, step: int, samples_before: int, samples_after: int) -> bool:
        if step >= self.total_steps:
            return True
        if self.eval_every_samples:
            return samples_after // self.eval_every_samples > samples_before // self.eval_every_samples
        return step % (self.eval_every_steps or 1) == 0


def plan_budget(n_train: int, *, batch_size: int, grad_accum: int, epochs: float, max_samples: Optional[int],
                max_steps: Optional[int], eval_every: Optional[int],
                eval_every_samples: Optional[int]) -> TrainingBudget:
    """The budget of a job over `n_train` training samples; ValueError names a bad or conflicting field."""
    check_budget_fields(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_samples=max_samples,
                        max_steps=max_steps, eval_every=eval_every, eval_every_samples=eval_every_samples)
    if n_train < 1:
        raise ValueError("the training set is empty")
    per_epoch = math.ceil(n_train / batch_size)
    if max_steps is not None:
        total = max_steps * grad_accum
    elif max_samples is not None:
        epochs_done, rest = divmod(max_samples, n_train)
        total = epochs_done * per_epoch + math.ceil(rest / batch_size)
    else:
        total = max(1, math.ceil(epochs * per_epoch))
    default_eval = None if eval_every_samples else (eval_every or max(1, math.ceil(per_epoch / grad_accum)))
    return TrainingBudget(n_train, batch_size, grad_accum, total, default_eval, eval_every_samples)


def check_budget_fields(*, batch_size: int, grad_accum: int, epochs: float, max_samples: Optional[int],
                        max_steps: Optional[int], eval_every: Optional[int],
                        eval_every_samples: Optional[int]) -> None:
    """The checks that need no data, shared by the job and the sweep's up-front validation."""
    for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("max_samples", max_samples),
                        ("max_steps", max_steps), ("eval_every", eval_every),
                        ("eval_every_samples", eval_every_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    if not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"epochs must be a positive number, got {epochs}")
    if max_samples is not None and max_steps is not None:
        raise ValueError("give max_samples (the same data for every trial) or max_steps, not both")
    if eval_every is not None and eval_every_samples is not None:
        raise ValueError("give eval_every (steps) or eval_every_samples, not both")


def worker_split_problem(batch_size: int, workers: int, *,
                         names: tuple[str, str] = ("batch_size", "workers")) -> Optional[str]:
    """Why `workers` cannot share micro-batches of `batch_size` samples, or None. `batch_size` keeps its meaning at
    any worker count (the samples of one micro-step summed over the workers), so that a k-worker job trains on
    the samples of the 1-worker job; each worker takes an equal share. `names` are how the caller's user
    gives the two numbers (the job's fields, or a command's flags)."""
    if workers > 1 and batch_size % workers:
        return (f"{names[0]} {batch_size} is not divisible by {names[1]} {workers}: it counts the samples of one "
                f"micro-step summed over the workers, each taking an equal share; give a multiple of {workers}")
    return None
