"""A sweep's settings, and their file beside Ray Tune's experiment state (`STORAGE/NAME/mdsweep_sweep.json`),
from which `mdsweep resume` rebuilds the same sweep."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator import cluster as cluster_mod

MANIFEST = "mdsweep_sweep.json"
MANIFEST_VERSION = 1


class SweepError(RuntimeError):
    """A sweep that cannot start or resume; the message names the flag at fault."""


@dataclass
class SweepSettings:
    name: str
    storage: str
    results: str
    fixed: dict[str, Any]
    space: str = "captcha"
    metric: str = "val_exact_match"
    mode: Optional[str] = None
    objectives: list[tuple[str, str]] = field(default_factory=list)  # two or more: a multi-objective search
    num_samples: int = 8
    replicates: int = 1
    cross: list[tuple[str, list[Any]]] = field(default_factory=list)
    search_seed: int = 0
    max_concurrent: Optional[int] = None
    early_stop: str = "none"
    asha_grace: Optional[int] = None
    asha_reduction_factor: float = 3.0
    max_failures: int = 2
    cpus_per_trial: Optional[float] = None
    gpus_per_trial: Optional[float] = None
    gpu_memory_per_trial: Optional[str] = None
    memory_per_trial: Optional[str] = None
    node_gpu_memory: Optional[str] = None
    skip_fit_check: bool = False
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    progress_interval: float = 15.0
    worker_logs: bool = False
    job_fn: str = "trainer.job:run_job"
    argv: str = ""

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
