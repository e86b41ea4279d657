"""Data-parallel training is fair: k workers train on the samples of one and give its losses (issue 31).

The 2-worker job runs in two processes of a gloo process group on the CPU, each calling `run_job` as a Ray
Train worker does; the 1-worker job runs in this process without any process group, as today.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from trainer.job import run_job
from trainer.job_config import JobConfig
from trainer.parallel.ranks import Ranks

# 96 captchas less 25 for validation: 71 to train on, so the epoch's last micro-batch of 2 holds 1 sample and
# one worker's share of it is empty; 9 steps of 4 micro-batches are exactly that epoch.
FAIR = dict(model="tiny", val_fraction=0.26, batch_size=2, grad_accum=4, max_steps=9, eval_every=5, lr=2e-3,
            train_scope="all", attention="prefix", max_new_tokens=6, max_val_samples=10, max_grad_norm=1e9)


def _worker(rank: int, world: int, init_file: str, values: dict, out: str) -> None:
    """One rank of the job, as a launcher starts it: a process group, then `run_job`; what it saw, pickled."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        steps, reports = [], []
        result = run_job(JobConfig(**values), on_step=steps.append,
                         on_report=lambda metrics, _checkpoint: reports.append(metrics),
                         checkpoint_dir=Path(out) / "checkpoint")
        (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps((steps, reports, result)))
    finally:
        dist.destroy_process_group()


def _run(values: dict, workers: int, out: Path) -> list[tuple[list, list, object]]:
    """(steps, reports, result) of each rank of the job on `workers` workers."""
    out.mkdir(parents=True)
    if workers == 1:
        steps, reports = [], []
        result = run_job(JobConfig(**values), on_step=steps.append,
                         on_report=lambda metrics, _checkpoint: reports.append(metrics),
                         checkpoint_dir=out / "checkpoint")
        return [(steps, reports, result)]
    torch.multiprocessing.spawn(_worker, args=(workers, str(out / "init"), values, str(out)), nprocs=workers)
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(workers)]


@pytest.mark.slow
def test_two_workers_train_on_the_samples_of_one_and_give_its_losses(captcha_parquet, tmp_path):
    values = dict(FAIR, train_data=str(captcha_parquet))
    (one_steps, one_reports, one), = _run(values, 1, tmp_path / "one")
    (two_steps, two_reports, two), (other_steps, other_reports, other) = _run(values, 2, tmp_path / "two")
    assert one.outcome == two.outcome == other.outcome == "ok", (one.error, two.error, other.error)
    assert [s["samples_seen"] for s in two_steps] == [s["samples_seen"] for s in one_steps]
    assert one_steps[-1]["samples_seen"] == 71  # the whole epoch, its last micro-batch of 1 sample included
    one_losses = [s["train_loss"] for s in one_steps]
    two_losses = [s["train_loss"] for s in two_steps]
    difference = max(abs(a - b) / abs(a) for a, b in zip(one_losses, two_losses))
    print(f"per-step losses, 1 vs 2 workers: max relative difference {difference:.2e}")
    assert len(two_losses) == 9 and difference < 1e-5, (one_losses, two_losses)
    for key in ("token_accuracy", "grad_norm"):
        assert [s[key] for s in two_steps] == pytest.approx([s[key] for s in one_steps], rel=1e-5), key
    # the ranks' FLOPs add up to one worker's; in the last step the empty share's stand-in sample adds its own
    assert [s["flops_per_sample"] for s in two_steps[:-1]] == [s["flops_per_sample"] for s in one_steps[:-1]]
    assert two_steps[-1]["flops_per_sample"] > one_steps[-1]["flops_per_sample"]
    # rank 0 alone evaluates, reports and checkpoints: one row per validation sample, none from rank 1
    assert [r["step"] for r in two_reports] == [r["step"] for r in one_reports] == [5, 9]
    assert other_steps == other_reports == [] and other.predictions == []
    ids = [p.sample_id for p in two.predictions]
    assert len(ids) == len(set(ids)) == two_reports[-1]["val_n"] == 10
    assert [dataclasses.astuple(p)[:3] for p in two.predictions] == [dataclasses.astuple(p)[:3]
                                                                    for p in one.predictions]
    weights_one = torch.load(tmp_path / "one" / "checkpoint" / "state.pt", weights_only=False)["model"]
    weights_two = torch.load(tmp_path / "two" / "checkpoint" / "state.pt", weights_only=False)["model"]
    for key in weights_one:
        # Adam's update is lr·m/(√v+eps): in a near-zero gradient, summation-order rounding moves a weight by up
        # to about lr per step (seen: 2.4e-5 after 9 steps); a missing average would move thousands by lr each
        torch.testing.assert_close(weights_two[key], weights_one[key], atol=1e-4, rtol=1e-4)


def test_a_batch_size_the_workers_cannot_share_is_one_line_naming_it(captcha_parquet, tmp_path):
    values = dict(FAIR, train_data=str(captcha_parquet), batch_size=3, max_steps=1)
    with pytest.raises(torch.multiprocessing.ProcessRaisedException) as raised:
        _run(values, 2, tmp_path / "two")
    message = str(raised.value).strip().splitlines()[-1]
    assert message == ("ValueError: batch_size 3 is not divisible by workers 2: it counts the samples of one "
                       "micro-step summed over the workers, each taking an equal share; give a multiple of 2")


def test_each_rank_takes_its_contiguous_share_and_together_they_take_all():
    for count in (0, 1, 3, 8):
        for world in (1, 2, 3):
            shares = [list(range(count))[Ranks(rank, world).share(count)] for rank in range(world)]
            assert sum(shares, []) == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
