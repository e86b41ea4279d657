"""`--gpu-memory-per-trial auto` on the driver: shares from predictions, tightened or raised by measured peaks,
out-of-memory shapes rejected by the searcher, and the book kept across a searcher save/restore."""
from __future__ import annotations

import pytest

from orchestrator.sweep.driver import resolve_resources
from orchestrator.sweep.gpu_memory import MARGIN, AutoGpuResources, MemoryBook, book_for, register_book
from orchestrator.cluster.resources import GPU_GRANULARITY, NodeInfo, ResourceError, plan_resources
from orchestrator.sweep.memory_plan import workers_to_fit
from orchestrator.sweep.settings import SweepError, SweepSettings
from orchestrator.sweep.search import make_searcher
from orchestrator.sweep.trainable import job_config_from
from trainer.memory.estimate import CUDA_CONTEXT_BYTES, estimate_memory

GiB = 2 ** 30
FIXED = {"model": "moondream2", "train_data": "x", "train_scope": "text", "optimizer": "adamw8bit"}


def _share(sweep: str, **params) -> float:
    return AutoGpuResources(sweep, FIXED, cpus=1, gpu_bytes=80 * GiB)({"lr": 1e-5, **params})["gpu"]


def test_each_trial_asks_for_its_own_predicted_memory():
    register_book("shares", MemoryBook())
    small, large = _share("shares", batch_size=1), _share("shares", batch_size=32)
    predicted = estimate_memory(job_config_from(FIXED, {"batch_size": 1})).allocator_peak
    assert small == pytest.approx((predicted * 1.15 + CUDA_CONTEXT_BYTES) / (80 * GiB), abs=2e-4)
    assert small < large < 1


STEP = 80 * GiB / GPU_GRANULARITY  # Ray's rounding of a GPU fraction up adds less than this


def _given(sweep: str, batch_size: int) -> float:
    """Bytes of the 80 GiB GPU the share of a trial of `batch_size` amounts to."""
    return _share(sweep, batch_size=batch_size) * 80 * GiB


def _owed(allocator_bytes: float) -> float:
    """What a trial whose allocator peaks at `allocator_bytes` must be given: that plus the margin and the context,
    less 1 byte for the rounding to whole bytes."""
    return allocator_bytes * MARGIN + CUDA_CONTEXT_BYTES - 1


def test_measured_peaks_tighten_unmeasured_shapes_and_never_go_below_a_measurement():
    """docs/memory.md: a shape is never given less than the most it was measured to use, and the largest
    measured/predicted ratio so far is applied to shapes not yet measured."""
    assert MARGIN == 1.15  # "its predicted peak plus 15 % and the context"
    book = MemoryBook()
    register_book("calibrated", book)
    configs = {b: job_config_from(FIXED, {"batch_size": b}) for b in (1, 4, 8)}
    predicted = {b: estimate_memory(config).allocator_peak for b, config in configs.items()}
    for b in configs:  # nothing measured: the prediction
        assert _owed(predicted[b]) <= _given("calibrated", b) < _owed(predicted[b]) + STEP

    book.observe(configs[8], "ok", predicted[8] // 2)  # the model over-predicted 2x
    # tightened although batch 1 never ran
    assert _owed(predicted[1] / 2) <= _given("calibrated", 1) < _owed(predicted[1] / 2) + STEP

    book.observe(configs[8], "ok", int(predicted[8] * 1.5))  # a later run peaked above the prediction
    assert _given("calibrated", 8) >= _owed(predicted[8] * 1.5)
    # the largest ratio, on a shape never measured
    assert _owed(predicted[4] * 1.5) <= _given("calibrated", 4) < _owed(predicted[4] * 1.5) + STEP

    book.observe(configs[1], "ok", predicted[1] // 2)  # another shape over-predicted: the largest ratio stays
    assert _owed(predicted[4] * 1.5) <= _given("calibrated", 4) < _owed(predicted[4] * 1.5) + STEP
    book.observe(configs[8], "ok", int(predicted[8] * 0.8))  # a run of batch 8 peaking lower changes nothing
    assert _given("calibrated", 8) >= _owed(predicted[8] * 1.5)


def test_the_searcher_does_not_propose_a_shape_that_ran_out_of_memory(tmp_path):
    space = tmp_path / "space.py"
    space.write_text("def space(trial):\n"
                     "    return {'batch_size': trial.suggest_categorical('batch_size', [8, 16]),\n"
                     "            'lr': trial.suggest_float('lr', 1e-6, 1e-4, log=True)}\n")
    searcher = make_searcher(f"{space}:space", "val_exact_match", "max", 0, [{}], None, sweep="oomy",
                             fixed=FIXED)
    first = searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"outcome": "oom", "val_exact_match": float("nan"), "gpu_ids": "0"})
    assert book_for("oomy").out_of_memory
    later = [searcher.suggest(f"t{i}") for i in range(1, 8)]
    for i in range(1, 8):
        searcher.on_trial_complete(f"t{i}", {"outcome": "ok", "val_exact_match": 0.5, "gpu_ids": "0",
                                             "device_name": "NVIDIA H100 80GB HBM3", "peak_memory_bytes": 10 * GiB})
    assert all(c["batch_size"] != first["batch_size"] for c in later)
    assert book_for("oomy").rejected >= 1

    restored = make_searcher(f"{space}:space", "val_exact_match", "max", 0, [{}], None, sweep="oomy2", fixed=FIXED)
    restored.set_state(searcher.get_state())
    assert book_for("oomy").out_of_memory == restored.book.out_of_memory


def test_the_book_learns_the_largest_ranks_peak_of_a_trial_on_gpu_workers_and_never_a_cpu_peak(tmp_path):
    """A trial on GPU workers: its driver holds no GPU (no gpu_ids), its job's ranks each peaked on their own card;
    the book keeps the largest. A job that trained on the CPU (logical GPUs, device=cpu) teaches it nothing."""
    space = tmp_path / "space.py"
    space.write_text("def space(trial):\n    return {'lr': trial.suggest_float('lr', 1e-6, 1e-4, log=True)}\n")
    searcher = make_searcher(f"{space}:space", "val_exact_match", "max", 0, [{}], None, sweep="ranks",
                             fixed=FIXED)
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"outcome": "ok", "val_exact_match": 0.5, "gpu_ids": "", "workers": 2,
                                      "device_name": "NVIDIA H100 80GB HBM3", "peak_memory_bytes": 3 * GiB,
                                      "rank_peak_memory_bytes": [3 * GiB, 5 * GiB]})
    assert list(book_for("ranks").measured.values()) == [5 * GiB]
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"outcome": "ok", "val_exact_match": 0.5, "gpu_ids": "0", "device_name": "cpu",
                                      "peak_memory_bytes": 9 * GiB})
    assert list(book_for("ranks").measured.values()) == [5 * GiB]


def test_a_shape_predicted_to_fit_no_gpu_is_not_run():
    book = MemoryBook(gpu_bytes=24 * GiB)
    assert book.cannot_fit(job_config_from(FIXED, {"batch_size": 8})) is None
    assert "more than a whole 24 GiB GPU" in book.cannot_fit(job_config_from({**FIXED, "optimizer": "adamw"}, {}))


def test_auto_needs_gpus_and_does_not_mix_with_a_fixed_share():
    gpu_node = [NodeInfo("n1", "10.0.0.1", cpus=8, gpus=1, memory=64 * GiB)]
    req = plan_resources(gpu_node, gpu_memory_per_trial="auto", node_gpu_memory="80GiB")
    assert req.auto_gpu_bytes == 80 * GiB and req.max_gpu_memory == "auto"
    with pytest.raises(ResourceError, match="drop --gpus-per-trial"):
        plan_resources(gpu_node, gpu_memory_per_trial="auto", gpus_per_trial=0.5, node_gpu_memory="80GiB")
    with pytest.raises(ResourceError, match="no GPUs"):
        plan_resources([NodeInfo("n2", "10.0.0.2", cpus=8)], gpu_memory_per_trial="auto")


# `--workers-per-trial auto` (issue 31): moondream2's full fine-tune, fp32 AdamW, batch 8 needs 27.8 GiB on one
# worker and 14.2 GiB per rank on 2 FSDP workers (mdsweep plan); DDP keeps a whole replica on every rank
FULL = {"model": "moondream2", "train_data": "x", "train_scope": "all", "optimizer": "adamw", "batch_size": 8}


def test_auto_workers_is_the_fewest_count_whose_ranks_fit_and_whose_batch_splits():
    need = MemoryBook().need
    fsdp = job_config_from({**FULL, "parallel": "fsdp"}, {})
    assert workers_to_fit([fsdp], 24 * GiB, need) == 2
    assert workers_to_fit([fsdp], 80 * GiB, need) == 1
    assert workers_to_fit([job_config_from({**FULL, "parallel": "ddp"}, {})], 24 * GiB, need) is None
    # batch 1 splits over no count but 1, where it does not fit
    assert workers_to_fit([job_config_from({**FULL, "parallel": "fsdp", "batch_size": 1}, {})], 24 * GiB, need) \
        is None
    # every configuration must fit at the count, not most: a needs 100/n bytes per rank, b 300/n
    a, b = (job_config_from({**FIXED, "batch_size": 8, "lr": lr}, {}) for lr in (1e-5, 3e-5))
    per_rank = {a.lr: 100, b.lr: 300}
    assert workers_to_fit([a, b], 100, lambda c, n: per_rank[c.lr] // n) == 4
    assert workers_to_fit([a, b], 30, lambda c, n: per_rank[c.lr] // n) is None  # 300 // 8 = 37 at most


def _node(gpus: int) -> list[NodeInfo]:
    """One node as the cluster reports it, with logical GPUs: their memory is given by --node-gpu-memory."""
    return [NodeInfo("n1", "10.0.0.1", cpus=16, gpus=gpus, memory=128 * GiB)]


def _auto_sweep(tmp_path, **kw) -> SweepSettings:
    values = dict(name="autoworkers", storage=str(tmp_path / "s"), results=str(tmp_path / "r"),
                  fixed={**FULL, "parallel": "fsdp"}, workers_per_trial="auto", gpu_memory_per_trial="auto",
                  node_gpu_memory="24GiB")
    return SweepSettings(**{**values, **kw})


def test_auto_workers_resolves_to_a_count_and_a_fixed_share_per_worker(tmp_path):
    s = _auto_sweep(tmp_path)
    req, notes = resolve_resources(s, _node(4), [])
    share = MemoryBook(workers=2).need(job_config_from(s.fixed, {}))
    assert s.workers_per_trial == 2 == req.workers  # the saved settings resume at 2
    assert req.gpu_memory_bytes == share and req.max_gpu_memory == str(share) and req.auto_gpu_bytes is None
    assert req.gpus == pytest.approx(share / (24 * GiB), abs=1e-4) and req.capacity == 2
    assert any(n.startswith("--workers-per-trial auto: 2 worker(s) per trial") for n in notes)
    assert book_for("autoworkers").workers == 2  # the searcher rejects shapes by their per-rank need at 2

    # on an 80 GiB card one worker fits: today's per-trial auto shares
    s = _auto_sweep(tmp_path, node_gpu_memory="80GiB")
    req, _ = resolve_resources(s, _node(4), [])
    assert s.workers_per_trial == 1 and req.auto_gpu_bytes == 80 * GiB and req.max_gpu_memory == "auto"


def test_auto_workers_is_refused_in_one_line_without_gpus_or_auto_memory(tmp_path, captcha_parquet, capsys):
    from orchestrator.cli.main import main

    with pytest.raises(SweepError, match=r"^--workers-per-trial auto: the cluster has no GPUs"):
        resolve_resources(_auto_sweep(tmp_path), _node(0), [])
    with pytest.raises(SweepError, match=r"^--workers-per-trial auto: at none of 1, 2, 4, 8 workers"):
        resolve_resources(_auto_sweep(tmp_path, fixed={**FULL, "parallel": "ddp"}), _node(4), [])
    for memory in ([], ["--gpu-memory-per-trial", "16GiB"]):
        assert main(["run", "--name", "x", "--train-data", str(captcha_parquet), "--storage", str(tmp_path / "s"),
                     "--results", str(tmp_path / "r"), "--workers-per-trial", "auto", *memory, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mdsweep run: error: --workers-per-trial auto needs "
                                                   "--gpu-memory-per-trial auto"), err
