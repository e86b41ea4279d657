"""Training budgets: samples, not steps, so grad_accum and batch size compete on the same data."""
from __future__ import annotations

import pytest

from trainer.budget import plan_budget
from trainer.job import run_job
from trainer.job_config import JobConfig


def _plan(n_train=72, **overrides):
    values = dict(batch_size=8, grad_accum=1, epochs=1.0, max_samples=None, max_steps=None, eval_every=None,
                  eval_every_samples=None)
    values.update(overrides)
    return plan_budget(n_train, **values)


def test_a_sample_budget_is_the_same_data_for_every_grad_accum():
    for accum in (1, 3, 8):
        budget = _plan(max_samples=200, grad_accum=accum)
        assert budget.total_micro_batches == 25  # 200 samples over 72-sample epochs of 8-sample batches
        assert budget.samples_in(budget.total_micro_batches) == 200
        assert budget.total_steps == -(-25 // accum)  # the last step takes what is left
        groups, done = [], 0
        for _ in range(budget.total_steps):  # as the job draws them: no step reaches past the budget
            groups.append(budget.group_size(done))
            done += groups[-1]
        assert sum(groups) == 25 and groups[:-1] == [accum] * (len(groups) - 1) and groups[-1] == 25 - accum * (
            len(groups) - 1)


def test_epochs_end_with_a_short_batch():
    budget = _plan(n_train=20, batch_size=8, epochs=2)
    assert budget.batches_per_epoch == 3 and budget.total_micro_batches == 6
    assert [budget.samples_in(m) for m in range(7)] == [0, 8, 16, 20, 28, 36, 40]


def test_evaluations_fall_at_the_same_sample_counts():
    def eval_points(accum):
        budget = _plan(max_samples=256, grad_accum=accum, eval_every_samples=64, n_train=1000)
        points, seen, micro = [], 0, 0
        for step in range(1, budget.total_steps + 1):
            micro += budget.group_size(micro)
            before, seen = seen, budget.samples_in(micro)
            if budget.should_evaluate(step, before, seen):
                points.append(seen)
        return points

    assert eval_points(1) == eval_points(2) == eval_points(8) == [64, 128, 192, 256]


@pytest.mark.parametrize("overrides, message", [
    (dict(max_samples=100, max_steps=5), "not both"),
    (dict(eval_every=2, eval_every_samples=64), "not both"),
    (dict(max_steps=0), "max_steps must be ≥ 1"),
    (dict(max_samples=-3), "max_samples must be ≥ 1"),
    (dict(batch_size=0), "batch_size must be ≥ 1"),
    (dict(epochs=0.0), "epochs must be a positive number"),
])
def test_bad_budgets_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _plan(**overrides)


def test_jobs_with_grad_accum_1_and_8_see_the_same_samples(captcha_parquet):
    seen = {}
    for accum in (1, 8):
        steps, reports = [], []
        config = JobConfig(model="tiny", train_data=str(captcha_parquet), val_fraction=0.25, batch_size=4,
                           grad_accum=accum, max_samples=96, eval_every_samples=48, lr=1e-3, max_new_tokens=5)
        result = run_job(config, on_step=steps.append, on_report=lambda m, _c: reports.append(m))
        assert result.outcome == "ok"
        seen[accum] = (steps[-1]["samples_seen"], [r["samples_seen"] for r in reports], len(steps))
    assert seen[1][:2] == seen[8][:2] == (96, [48, 96])
    assert (seen[1][2], seen[8][2]) == (24, 4)  # 8 micro-batches, then 4 up to the 48-sample evaluation, ...
