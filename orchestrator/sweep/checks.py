"""What `mdsweep run` checks before Ray starts: the settings, the space, the output paths and the data, each
failing with a message that names its flag, so that nothing is scheduled that cannot work."""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from orchestrator.cluster import connect as cluster_mod
from orchestrator.cluster.resources import ResourceError, is_auto, parse_size
from orchestrator.results.objectives import default_mode
from orchestrator.results.schema import METRICS, validate_sweep_name
from orchestrator.results.spaces import SpaceError, SpaceInfo, validate_space
from orchestrator.sweep.settings import AUTO_WORKERS, SweepError, SweepSettings
from orchestrator.tracking.trackers import TrackerError, parse_trackers
from trainer.budget import worker_split_problem
from trainer.job_config import JobConfig
from trainer.model.config import PRESETS
from trainer.model.loading import local_model_directory, model_text
from trainer.model.tokenizer_source import check_revision

def check_settings(s: SweepSettings) -> SpaceInfo:
    """Everything that needs no cluster. Returns the validated space."""
    try:
        validate_sweep_name(s.name)
    except ValueError as e:
        raise SweepError(str(e)) from None
    if s.metric not in METRICS:
        raise SweepError(f"--metric {s.metric!r}: not a reported metric; choose from {', '.join(METRICS)}")
    s.mode = s.mode or default_mode(s.metric)
    if s.mode not in ("max", "min"):
        raise SweepError(f"--mode {s.mode!r}: choose max or min")
    for metric, mode in s.objectives:
        if metric not in METRICS:
            raise SweepError(f"--objective {metric!r}: not a reported metric; choose from {', '.join(METRICS)}")
        if mode not in ("max", "min"):
            raise SweepError(f"--objective {metric}:{mode}: choose max or min")
    if len({m for m, _ in s.objectives}) < len(s.objectives):
        raise SweepError("--objective: a metric is given twice")
    if len(s.objectives) > 1 and s.early_stop != "none":
        raise SweepError("--early-stop with several --objective: early stopping judges one metric; drop one")
    if s.num_samples < 1:
        raise SweepError("--num-samples must be >= 1")
    if s.max_concurrent is not None and s.max_concurrent < 1:
        raise SweepError("--max-concurrent must be >= 1")
    if s.max_failures < 0:
        raise SweepError("--max-failures must be >= 0")
    check_job_fn(s.job_fn)
    for flag, size in (("--gpu-memory-per-trial", s.gpu_memory_per_trial), ("--node-gpu-memory", s.node_gpu_memory),
                       ("--memory-per-trial", s.memory_per_trial)):
        if size and not (flag == "--gpu-memory-per-trial" and is_auto(size)):
            try:
                parse_size(size, flag)
            except ResourceError as e:
                raise SweepError(str(e)) from None
    if not s.fixed.get("train_data"):
        raise SweepError("--train-data is required (a Parquet file/dir, image folder or JSONL/CSV manifest)")
    if not 0 <= s.search_seed < 2 ** 32:
        raise SweepError(f"--search-seed must be between 0 and {2 ** 32 - 1}, got {s.search_seed}")
    job = check_fixed_settings(s.fixed)
    for flag, value in (("--results", s.results), ("--storage", s.storage), ("--cache-dir", s.fixed.get("cache_dir"))):
        if value:
            check_writable_directory(flag, value)
    try:
        info = validate_space(s.space, s.fixed, seed=s.search_seed)
    except SpaceError as e:
        raise SweepError(str(e)) from None
    for name, _vals in s.cross:
        if name in info.searched:
            raise SweepError(f"--cross {name}: the space {s.space!r} also searches {name}; use a space without it "
                             f"(e.g. captcha:paired for attention)")
        if name in s.fixed:
            raise SweepError(f"--cross {name}: {name} is also fixed by a flag")
    check_worker_split(s, job, info)
    if s.replicates > 1 and "seed" in info.searched:
        raise SweepError("--replicates: the space already searches seed")
    if s.replicates > 1 and any(n == "seed" for n, _ in s.cross):
        raise SweepError("--replicates and --cross seed both vary the seed; use one")
    if s.early_stop not in ("none", "asha"):
        raise SweepError(f"--early-stop {s.early_stop!r}: choose none or asha")
    try:
        from orchestrator.sweep.early_stopping import make_scheduler

        make_scheduler(s.early_stop, s.metric, s.mode, s.fixed, s.asha_grace,
                       s.asha_reduction_factor)
    except ValueError as e:
        raise SweepError(str(e)) from None
    check_model(job)
    try:
        trackers = parse_trackers(s.log_to)
    except TrackerError as e:
        raise SweepError(str(e)) from None
    for tracker in trackers:  # a local store (a folder, or SQLite's file) must be writable, as the outputs must
        if (folder := tracker.local_folder()) is not None:
            check_writable_directory("--log-to", folder)
    if s.gpus_per_trial == 0 or str(s.fixed.get("device") or "").startswith("cpu"):
        check_mfu_objective(s, "--gpus-per-trial 0" if s.gpus_per_trial == 0 else "device=cpu")
    return info


def check_mfu_objective(s: SweepSettings, why_cpu: str) -> None:
    """A sweep whose trials train on CPU cannot rank by `mfu`: it is null there (no data-sheet peak), so every
    trial would end without an objective. Called before Ray starts when a flag says CPU, and again once the
    cluster is known to have no GPUs."""
    if s.fixed.get("peak_tflops") is not None:
        return  # the user gave the peak that mfu divides by
    for flag, metric in [("--metric", s.metric), *(("--objective", m) for m, _ in s.objectives)]:
        if metric == "mfu":
            raise SweepError(f"{flag} mfu: the trials train on CPU ({why_cpu}), where mfu is null; rank by "
                             f"achieved_tflops instead, or give the CPU's peak with --set peak_tflops=N")


def check_writable_directory(flag: str, value: str) -> None:
    """A local output path must be (or be creatable as) a directory this process can write: a file there, a
    read-only or full filesystem is one line up front, not a traceback halfway through the sweep. The write is
    real (root ignores permission bits), in the directory or, if it does not exist yet, its nearest parent."""
    if cluster_mod.is_remote_storage(value):
        return
    path = Path(value).expanduser()
    existing = next((c for c in (path, *path.parents) if c.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise SweepError(f"{flag} {value}: {existing} is a file, not a directory")
    probe = existing / f".mdsweep-write-check-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"\0" * 4096)
    except OSError as e:
        raise SweepError(f"{flag} {value}: cannot write in {existing} ({e.strerror}); "
                         f"{DISK_HINTS.get(e.errno, 'choose a directory you can write')}") from None
    finally:
        with contextlib.suppress(OSError):  # never written, on a read-only or full disk
            probe.unlink()


# what to do about the errors a full or read-only disk gives, for one-line messages
DISK_HINTS = {errno.ENOSPC: "the disk is full: free space or choose another directory",
              errno.EDQUOT: "the disk quota is used up: free space or choose another directory",
              errno.EROFS: "the filesystem is read-only: choose a writable directory",
              errno.EACCES: "permission denied: choose a directory you can write"}


def check_data(fixed: dict[str, Any], test_data: Optional[str] = None) -> Optional[str]:
    """Load the training and validation data once on the driver, as a trial will (same columns, same handling
    of bad rows), so that a missing, corrupt or empty dataset fails before Ray starts instead of in every trial.
    The driver must see the data where the trials do (local runs, or shared storage on a cluster); URIs are left
    to the trials. Returns a line for the user."""
    from trainer.data.dataset import DataError, load_samples

    read = {"text_column": fixed.get("text_column"), "image_column": fixed.get("image_column"),
            "on_bad_sample": fixed.get("on_bad_sample") or "error"}
    counts = []
    started = time.time()
    for flag, value in (("--train-data", fixed.get("train_data")), ("--val-data", fixed.get("val_data")),
                        ("--test-data", test_data)):
        if not value or "://" in str(value):
            continue
        try:
            loaded = load_samples(value, **read)
        except DataError as e:
            raise SweepError(f"{flag}: {e}") from None
        skipped = f" ({loaded.skipped} bad rows skipped)" if loaded.skipped else ""
        counts.append(f"{flag.removeprefix('--')} {len(loaded.samples)} samples{skipped}")
    return f"data checked in {time.time() - started:.1f} s: {', '.join(counts)}" if counts else None


def check_model(job: JobConfig) -> None:
    """Read the model as every trial will load it, through the check `predict` and `train` use (its revision,
    config, tokenizer with its ids against the vocabulary, and the checkpoint's names, shapes and dtypes from the
    header; no tensor is read), so that a model no trial could load fails before Ray starts instead of in every
    trial. A hub id is fetched by the trials, not downloaded here; its revision is still checked."""
    try:
        if job.model not in PRESETS and local_model_directory(job.model) is None:
            check_revision(job.revision)
        else:
            model_text(job.model, revision=job.revision, tokenizer=job.tokenizer, check_weights=True)
    except ValueError as e:  # CheckpointError is one
        raise SweepError(f"--model {job.model}: {e}") from None


def check_fixed_settings(fixed: dict[str, Any]) -> JobConfig:
    """Fixed settings that cannot work (a zero batch, lr 0, an unknown fault, max_samples with max_steps)
    fail here, before Ray starts, naming the setting: JobConfig checks its own values. Returns the job they make,
    for the checks that read it."""
    try:
        return JobConfig.from_dict(fixed)
    except (ValueError, TypeError) as e:
        raise SweepError(f"job settings: {e}") from None


def check_worker_split(s: SweepSettings, job: JobConfig, info: SpaceInfo) -> None:
    """With --workers-per-trial N > 1: every batch size a trial may get (fixed, or drawn by the space's probe) must
    split evenly over the workers. `auto` chooses only counts that split them, and needs `--gpu-memory-per-trial
    auto`: the count follows the per-rank prediction, which a fixed size or share does not change."""
    if s.workers_per_trial == AUTO_WORKERS:
        if not is_auto(s.gpu_memory_per_trial):
            raise SweepError("--workers-per-trial auto needs --gpu-memory-per-trial auto (it picks the fewest "
                             "workers whose per-rank prediction fits the card); or give --workers-per-trial N")
        return
    if s.workers_per_trial == 1:
        return
    searched = "batch_size" in info.searched
    sizes = sorted({int(sample["batch_size"]) for sample in info.samples} if searched else {job.batch_size})
    flag = f"batch_size (searched by --space {s.space})" if searched else "--batch-size"
    for size in sizes:
        problem = worker_split_problem(size, s.workers_per_trial, names=(flag, "--workers-per-trial"))
        if problem:
            raise SweepError(problem)


def searched_columns(s: SweepSettings, info: SpaceInfo) -> list[str]:
    cols = list(info.searched)
    cols += [n for n, _ in s.cross if n not in cols]
    if s.replicates > 1 and "seed" not in cols:
        cols.append("seed")
    return cols


def check_job_fn(job_fn: str) -> None:
    """`--job-fn MODULE:FUNCTION` names a module this machine can import, found without importing it (the real
    job's module loads torch); a wrong function name is the trial's one-line error."""
    module, _, function = job_fn.partition(":")
    try:
        found = bool(module) and function.isidentifier() and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise SweepError(f"--job-fn {job_fn}: expected MODULE:FUNCTION of an importable module "
                         "(default trainer.job:run_job)")
