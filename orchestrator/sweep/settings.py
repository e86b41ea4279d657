"""A sweep's settings, and their file beside Ray Tune's experiment state (`STORAGE/NAME/mdsweep_sweep.json`),
from which `mdsweep resume` rebuilds the same sweep."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator.cluster import connect as cluster_mod
from orchestrator.cluster.resources import DRIVER_CPUS

MANIFEST = "mdsweep_sweep.json"
MANIFEST_VERSION = 1


class SweepError(RuntimeError):
    """A sweep that cannot start or resume; the message names the flag at fault."""


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


AUTO_WORKERS = "auto"  # --workers-per-trial auto: the fewest workers whose ranks fit the card (driver.py)


def workers_count(text: str) -> int | str:
    """--workers-per-trial: a count >= 1, or `auto` (resolved to a count once the cluster's GPUs are known)."""
    return AUTO_WORKERS if text.strip().lower() == AUTO_WORKERS else positive_int(text)


def nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def ray_address(text: str) -> str:
    """An --address, checked as it is parsed: a malformed one or a port outside 1-65535 would otherwise pass to
    Ray, which retries it for minutes."""
    if text.strip() in ("auto", "local"):
        return text
    try:
        cluster_mod.split_host_port(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; use auto, host:port or ray://host:port") from None
    return text


def nonneg_float(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _flag(default: Any, group: str, help: str, **argparse_kwargs: Any) -> Any:
    """A setting that is also a `mdsweep run` flag (`--field-name`): its group in the help, its help text and
    any argparse keywords live here, next to the setting, as JobConfig's do (orchestrator.cli.run reads them)."""
    return field(default=default, metadata={"group": group, "help": help, "argparse": argparse_kwargs})


@dataclass
class SweepSettings:
    """How a sweep runs. Saved beside Ray Tune's state (MANIFEST) so that `resume` rebuilds the same sweep."""

    name: str
    storage: str = _flag("./sweeps", "cluster",
                         "where Ray Tune keeps experiment state and checkpoints (default ./sweeps). Multi-node "
                         "clusters need shared storage: an NFS path mounted identically on every node, or "
                         "s3://..., gs://...")
    results: str = _flag("./results", "output", "Parquet results dataset directory (default ./results)")
    fixed: dict[str, Any] = field(default_factory=dict)  # JobConfig settings shared by every trial
    space: str = _flag("captcha", "search",
                       "search space: a module of search_spaces/ (captcha, captcha:paired, captcha_wide), "
                       "package.module:function, or path/to/file.py:function; an Optuna define-by-run function "
                       "returning a dict of JobConfig fields (default captcha)")
    metric: str = _flag("val_exact_match", "search",
                        "metric to optimise, as reported at each evaluation (default val_exact_match)")
    mode: Optional[str] = _flag(None, "search", "max or min (default: max, min for losses and error rates such "
                                "as val_cer)", choices=("max", "min"))
    objectives: list[tuple[str, str]] = field(default_factory=list)  # two or more: a multi-objective search
    num_samples: int = _flag(8, "search", "how many configurations Optuna proposes (each runs --replicates x "
                             "--cross times; default 8)", type=positive_int)
    replicates: int = _flag(1, "search", "run every proposal with K seeds (seed, seed+1, ...): the seed as a "
                            "replicate factor; Optuna learns from the mean (default 1)", type=positive_int)
    cross: list[tuple[str, list[Any]]] = field(default_factory=list)  # crossed factors, as parsed from --cross
    search_seed: int = _flag(0, "search", "seed of the TPE sampler (default 0)", type=int)
    enqueue: Optional[str] = _flag(
        None, "search", "known-good settings run first, as Optuna enqueued trials, so the sweep is judged against "
        "them: official (the official Moondream fine-tuning recipe for --revision: lr, batch, grad_accum, "
        "optimizer, betas) or FILE.json (a list of settings objects); values the space searches are fitted to it, "
        "fixed and crossed settings stay the sweep's", metavar="official|FILE.json")
    baselines: list[dict[str, Any]] = field(default_factory=list)  # --enqueue fitted to the sweep (baselines.py)
    warm_start: list[str] = field(default_factory=list)  # --warm-start RESULTS:SWEEP sources, as given
    log_to: list[str] = field(default_factory=list)  # --log-to mlflow[=URI]: trackers that mirror each trial
    max_concurrent: Optional[int] = _flag(None, "search", "at most this many trials at once (default: as many "
                                          "as the resources allow)", type=positive_int)
    early_stop: str = _flag("none", "search", "early stopping on --metric: asha (asynchronous successive "
                            "halving) or none (default)", choices=("none", "asha"))
    asha_grace: Optional[int] = _flag(None, "search", "ASHA: samples (with --max-samples) or steps (with "
                                      "--max-steps) a trial runs before it can be stopped (default: the trial "
                                      "length / 8)", type=positive_int)
    asha_reduction_factor: float = _flag(3.0, "search", "ASHA: keep the best 1/F at each rung (default 3)",
                                         type=float)
    test_data: Optional[str] = _flag(
        None, "output", "held-out test set (same formats as --train-data): the --test-top best trials are tested "
        "on it once when the sweep ends (test_* columns); it never steers the search", metavar="PATH")
    test_top: int = _flag(1, "output", "how many of the best trials to test on --test-data (default 1)",
                          type=positive_int)
    max_failures: int = _flag(2, "output", "retries of a trial lost to a worker or node failure, from its last "
                              "checkpoint (default 2); oom, diverged and error outcomes are never retried", type=int)
    workers_per_trial: int | str = _flag(
        1, "resources", "run each trial's job on N data-parallel Ray Train workers (--set parallel=ddp|fsdp; "
        "--batch-size stays the samples of one micro-step summed over them, so a trial trains on the samples and "
        "gives the losses of one worker), all on one node: --cpus-per-trial, --gpus-per-trial, "
        "--gpu-memory-per-trial and --memory-per-trial are then each worker's, and the trial's driver, which starts "
        f"the workers and reports for them, takes {DRIVER_CPUS:g} CPU more; as many trials run at once as the "
        "cluster holds whole. 1 (default): the job runs in the trial itself. auto (with --gpu-memory-per-trial "
        "auto): the fewest of 1, 2, 4, 8 at which every probed configuration's per-rank prediction (mdsweep plan) "
        "plus margin fits the cluster's smallest GPU. With --gpu-memory-per-trial auto and N > 1 (given or chosen) "
        "every worker gets the same share: the largest per-rank prediction plus margin among the probed "
        "configurations that fit", type=workers_count, metavar="N|auto")
    cpus_per_trial: Optional[float] = _flag(None, "resources", "CPUs per trial (default 1)", type=positive_float)
    gpus_per_trial: Optional[float] = _flag(
        None, "resources", "GPUs per trial; a fraction packs trials on one GPU (0.25: four per GPU) and caps each "
        "trial's allocator at that fraction (default: 1 if the cluster has GPUs, else 0)", type=nonneg_float)
    gpu_memory_per_trial: Optional[str] = _flag(
        None, "resources", "GPU memory per trial, e.g. 16GiB: sets the GPU fraction Ray schedules by (from the GPU "
        "memory of the cluster's nodes) and the job's allocator cap (max_gpu_memory); auto: each trial's "
        "predicted peak (mdsweep plan) plus margin", metavar="SIZE")
    memory_per_trial: Optional[str] = _flag(None, "resources", "host RAM per trial (Ray's memory resource, "
                                            "admission control), e.g. 24GiB", metavar="SIZE")
    node_gpu_memory: Optional[str] = _flag(None, "resources", "memory of one GPU in the cluster, e.g. 80GiB, for "
                                           "--gpu-memory-per-trial (default: measured with nvidia-smi on each "
                                           "GPU node); needed for logical GPUs", metavar="SIZE")
    skip_fit_check: bool = _flag(False, "resources", "do not fail when no current node can hold a trial "
                                 "(autoscaling clusters)")
    address: Optional[str] = _flag(None, "cluster",
                                   "Ray cluster to attach to: auto (a `ray start --head` on this machine), "
                                   "host:port (the head's GCS port) or ray://host:port (Ray Client). Default: "
                                   "$RAY_ADDRESS if set, else an embedded Ray on this machine", type=ray_address)
    num_cpus: Optional[int] = _flag(None, "cluster", "logical CPUs of the embedded Ray (default: all); not with "
                                    "--address", type=positive_int)
    num_gpus: Optional[int] = _flag(None, "cluster", "logical GPUs of the embedded Ray (default: detected); not "
                                    "with --address", type=nonneg_int)
    progress_interval: float = _flag(15.0, "output", "seconds between progress tables (0: none; default 15)",
                                     type=nonneg_float)
    worker_logs: bool = _flag(False, "output", "forward the trials' stdout/stderr to this terminal")
    ray_logs: bool = _flag(False, "output", "show Ray's own log lines on this terminal (default: they go to "
                           "RESULTS/logs/NAME.log)")
    job_fn: str = _flag("trainer.job:run_job", "search", "the job each trial runs, as module:function (default: "
                        "the fine-tuning job; trainer.standin_job:run_standin_job trains nothing and measures the "
                        "sweep machinery alone, see bench/scale.py)", metavar="MODULE:FUNCTION")
    argv: str = ""  # the command line that started the sweep

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["manifest_version"] = MANIFEST_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SweepSettings":
        d = dict(d)
        d.pop("manifest_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["cross"] = [(name, list(vals)) for name, vals in d.get("cross") or []]
        d["objectives"] = [tuple(o) for o in d.get("objectives") or []]
        return cls(**d)

    def experiment_path(self) -> str:
        return join_storage(self.storage, self.name)

    def ray_log_file(self) -> Optional[Path]:
        """Where Ray's own log lines go, or None when `--ray-logs` keeps them on the terminal."""
        return None if self.ray_logs else Path(self.results) / "logs" / f"{self.name}.log"


def normalize_storage(storage: str) -> str:
    if cluster_mod.is_remote_storage(storage):
        return storage.rstrip("/")
    cluster_mod.check_output_outlives_job("--storage", storage)
    return str(Path(storage).expanduser().resolve())


def join_storage(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def write_manifest(settings: SweepSettings) -> None:
    fs, path = cluster_mod.storage_filesystem(settings.experiment_path())
    fs.create_dir(path, recursive=True)
    data = json.dumps(settings.to_json(), indent=1, default=str).encode()
    cluster_mod.write_file_atomic(fs, f"{path}/{MANIFEST}", data)


def read_manifest(storage: str, name: str) -> SweepSettings:
    import pyarrow.fs as pafs

    fs, path = cluster_mod.storage_filesystem(join_storage(storage, name))
    target = f"{path}/{MANIFEST}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        raise SweepError(f"NAME: no sweep {name!r} in --storage {storage} (no {target})")
    with fs.open_input_stream(target) as f:
        return SweepSettings.from_json(json.loads(f.read().decode()))


def manifest_exists(storage: str, name: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = cluster_mod.storage_filesystem(join_storage(storage, name))
    return fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
