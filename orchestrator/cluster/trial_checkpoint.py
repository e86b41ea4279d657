"""A trial's checkpoint where this process can read it, and the job config it ran: for `mdsweep export` and the
end-of-sweep test on held-out data."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from orchestrator.cluster.connect import is_remote_storage
from orchestrator.cluster.tune_internals import checkpoint_in_experiment
from trainer.job_config import JobConfig


def job_config_of(row: dict[str, Any]) -> JobConfig:
    """The JobConfig a trial ran, from its row in the trials table (one column per field)."""
    return JobConfig.from_dict({name: row[name] for name in JobConfig().to_dict() if name in row})


@contextlib.contextmanager
def local_checkpoint(row: dict[str, Any], experiment_path: str | None) -> Iterator[Path]:
    """The trial's checkpoint as a local directory (copied from s3://, gs://, ... storage)."""
    recorded = row.get("checkpoint_path")
    if not recorded:
        raise FileNotFoundError(f"trial {row['trial_id']} has no checkpoint recorded in the trials table")
    if Path(recorded).is_dir():
        yield Path(recorded)
        return
    if not (experiment_path and is_remote_storage(experiment_path)):
        raise FileNotFoundError(f"checkpoint {recorded} of trial {row['trial_id']} is missing: was the sweep's "
                                "--storage moved or deleted?")
    import pyarrow.fs as pafs

    # Tune records bucket paths without the scheme: rebuild the URI from the experiment path
    uri = f"{experiment_path.rstrip('/')}/{checkpoint_in_experiment(recorded)}"
    with tempfile.TemporaryDirectory(prefix="mdsweep-export-") as tmp:
        fs, path = pafs.FileSystem.from_uri(uri)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"checkpoint {uri} of trial {row['trial_id']} is missing from storage")
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)
