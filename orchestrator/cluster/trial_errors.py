"""What Ray says about a trial that failed: Tune's error file, and the kill of Ray's memory monitor in it.

Ray's account of a failure is pages long and in Ray's own words; the trials table keeps the end of it, or, for
a kill by the memory monitor (the node's host RAM ran low, outcome `host_oom`), a short account that says what
to change. Reading Ray's text is this layer's knowledge (its words are in orchestrator.cluster.tune_internals);
the sink only records the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from orchestrator.cluster.tune_internals import HOST_OOM_MARKER, RAYLET_OOM_LINES, TUNE_FAILURE_LINE, trial_error_file


def trial_error_text(trial: Any) -> Optional[str]:
    """The trial's error file (Tune's `trial.error_file`): every failure, the latest last; None without one."""
    path = trial_error_file(trial)
    try:
        if path and Path(path).is_file():
            return Path(path).read_text(errors="replace").strip()
    except OSError:
        pass
    return None


def host_oom_summary(error: Optional[str]) -> Optional[str]:
    """For a trial Ray's memory monitor killed (the node's host RAM, not the GPU's: outcome `host_oom`), a short
    account of it instead of Ray's page-long message; None for any other error."""
    if not error or HOST_OOM_MARKER not in error:
        return None
    lines = error.splitlines()
    detail = [line.strip() for line in lines
              if line.startswith(RAYLET_OOM_LINES + (TUNE_FAILURE_LINE,)) or HOST_OOM_MARKER in line]
    return ("killed by Ray's memory monitor: the node ran low on host memory. Give each trial more host memory "
            "(--memory-per-trial), run fewer at once (--max-concurrent) or raise RAY_memory_usage_threshold on the "
            "nodes.\n" + "\n".join(dict.fromkeys(detail)))


def trial_failure(trial: Any) -> tuple[str, Optional[str]]:
    """The outcome of a trial Tune reports failed, and what its row says of it: `host_oom` and the short account
    for a kill by Ray's memory monitor, else `error` and the end of Ray's text (None without an error file)."""
    text = trial_error_text(trial)
    host_oom = host_oom_summary(text)
    if host_oom:
        return "host_oom", host_oom
    return "error", text[-4000:] if text else None
