"""What this project knows of Ray's and Tune's insides, in one place: file and folder names, the experiment state's
layout, result keys, environment variables, message text and private imports that no public API offers.

A Ray upgrade may change any of them without notice; each is pinned against the installed Ray by
tests/test_tune_internals.py, whose failure names the Ray internal that moved and the function here to update.
Private Ray modules are imported inside the functions that need them, so that `mdsweep --help` stays fast.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# Tune's state files in the experiment folder (`str.format` templates, the session's stamp in the braces):
# the controller's (TuneController.CKPT_FILE_TMPL), the search generator's (SearchGenerator.CKPT_FILE_TMPL) and
# the searcher's (Searcher.CKPT_FILE_TMPL). A resume reads the newest of each kind.
EXPERIMENT_STATE_FILE = "experiment_state-{}.json"
SEARCH_GEN_STATE_FILE = "search_gen_state-{}.json"
SEARCHER_STATE_FILE = "searcher-state-{}.pkl"
STATE_FILE_PATTERNS = tuple(t.format("*") for t in (EXPERIMENT_STATE_FILE, SEARCH_GEN_STATE_FILE,
                                                     SEARCHER_STATE_FILE))

# A trial's files in its folder (ray.tune.result.EXPR_RESULT_FILE, EXPR_PARAM_FILE): every report it made, one
# JSON object a line (written by the JsonLoggerCallback), and its config.
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"

# Keys Tune adds to every report (ray.tune.result.AUTO_RESULT_KEYS): when it was made, the trial's time so far, the
# reports since the trial last (re)started, and the checkpoint folder it registered.
REPORT_TIMESTAMP = "timestamp"
REPORT_TIME_TOTAL_S = "time_total_s"
REPORT_ITERATIONS_SINCE_RESTORE = "iterations_since_restore"
REPORT_CHECKPOINT_DIR_NAME = "checkpoint_dir_name"

# A checkpoint's folder in the trial's folder, as Ray Train's StorageContext names it (`checkpoint_000003`)
CHECKPOINT_PREFIX = "checkpoint_"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d{{6}})$")

# A trial's folder in the experiment folder: Tune's default spells out the config; this project names it by the
# trial's id (Tune's `trial_dirname_creator`), which is how repair finds a trial's id again.
TRIAL_DIR_PREFIX = "trial_"

# The lines of the raylet's account of a worker its memory monitor killed (text compiled into the raylet binary,
# core/src/ray/raylet/raylet), and the header Tune writes above each failure in a trial's error file.
HOST_OOM_MARKER = "killed due to the node running low on memory"
RAYLET_OOM_LINES = ("Memory on the node", "OOM kill reason", "1 worker")
TUNE_FAILURE_LINE = "Failure #"

# The label every Ray node carries with its node id (ray._raylet.RAY_NODE_ID_KEY): a label selector on it places
# actors on one node, as Ray Train places its own controller on the node of the process that starts it
NODE_ID_LABEL = "ray.io/node-id"

# The environment variable in which Ray's job manager passes a submitted job's config (runtime env, metadata)
# to its driver (ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR)
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass
class TrialView:
    """The attributes of a Tune `Trial` the project's callbacks read (the sink, the progress table, the error
    text), standing in for Tune's trial where they are driven without Tune: the sink's benchmark and the tests.
    tests/test_tune_internals.py checks that a real Trial has each of them."""
    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)
    num_failures: int = 0
    checkpoint: Any = None  # Tune's Checkpoint of the trial's latest report, or None
    error_file: Optional[str] = None


def checkpoint_dir_name(index: int) -> str:
    """The folder name of a trial's checkpoint number `index`."""
    return f"{CHECKPOINT_PREFIX}{index:06d}"


def checkpoint_index(name: str) -> Optional[int]:
    """The number of the checkpoint folder `name`; None for any other name."""
    m = _CHECKPOINT_NAME.match(name)
    return int(m.group(1)) if m else None


def checkpoint_in_experiment(recorded: str) -> str:
    """`trial_<id>/checkpoint_<n>`: where a checkpoint path Tune recorded lies under the experiment folder. Tune
    records bucket paths without their scheme, so a reader rebuilds the URI from the experiment path and this."""
    return "/".join(Path(recorded).parts[-2:])


def trial_dirname(trial: Any) -> str:
    """Short trial folder names in the experiment directory (Tune's default spells out the config)."""
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}"


def trial_id_of_dir(name: str) -> str:
    """The trial id a folder named by `trial_dirname` belongs to."""
    return name.removeprefix(TRIAL_DIR_PREFIX)


def unfinished_trials(experiment_state: dict[str, Any]) -> dict[str, Optional[str]]:
    """Trial folder -> checkpoint folder a parsed experiment state restores it from (None when it does not say),
    for the trials it has not finished.

    Its `trial_data` holds one pair per trial, as `Trial.get_json_state` writes it: the trial's own state (JSON:
    its status and folder) and its run metadata (JSON: the last result, which names the checkpoint). Raises
    (KeyError, ValueError, TypeError...) on any other layout."""
    out: dict[str, Optional[str]] = {}
    for entry in experiment_state["trial_data"]:
        trial = json.loads(entry[0])
        if trial.get("status") == "TERMINATED":
            continue
        meta = json.loads(entry[1]) if len(entry) > 1 else {}
        last = meta.get("last_result") or {}
        out[trial.get("custom_dirname") or trial.get("relative_logdir")] = last.get(REPORT_CHECKPOINT_DIR_NAME)
    return out


def trial_error_file(trial: Any) -> Optional[str]:
    """The path of a trial's error file (Tune's `Trial.error_file`: error.txt in the trial's folder, every failure
    appended under a `Failure #` header); None when it has none."""
    return getattr(trial, "error_file", None)


def tune_callback_base() -> type:
    """Tune's Callback, the base of this project's callbacks (imported when a callback class is defined, not
    when the package is)."""
    from ray.tune import Callback

    return Callback


def replace_restored_callbacks(tuner: Any, callbacks: list) -> bool:
    """Give a Tuner from `Tuner.restore` this process's callbacks; False where it cannot.

    Tune restores the callbacks it pickled with the first run and `Tuner.restore` takes no others, so they are
    set on the local tuner's run config, the one `fit` reads. Under Ray Client the Tuner lives in the cluster
    (no local tuner) and keeps the saved ones."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None:
        return False
    local.get_run_config().callbacks = callbacks
    return True


def set_tune_environment(max_pending_trials: str) -> None:
    """Set the environment variables through which Tune is tuned (read when Tune starts, so before `Tuner.fit`);
    a value the user set is kept, except the pending trials, which the driver sizes."""
    # Tune's periodic experiment snapshot: frequent, so that a killed driver loses little.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    # Tune's CSV and TensorBoard loggers copy every result the Parquet tables hold (measured in bench/scale.py: a
    # tenth of the driver's time at a thousand trials); its JSON logger stays (the driver adds it): the rows
    # lost to a full disk are rebuilt from its result.json.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # A snapshot per reported checkpoint is intended (num_to_keep=1): keeps resume exact.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune starts trials of a custom searcher one at a time (one pending trial); let as many trials be pending
    # as can run at once, so that they start together.
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = max_pending_trials


def submitted_job_runtime_env() -> dict[str, Any]:
    """The runtime env of the `ray job submit` that started this driver (Ray's job manager passes it in an
    environment variable); empty outside a submitted job."""
    job_config = os.environ.get(JOB_CONFIG_ENV)
    return (json.loads(job_config).get("runtime_env") or {}) if job_config else {}


def token_auth_enabler() -> Optional[Callable[[], bool]]:
    """Ray's own helper that switches token authentication on when this machine has a token (it also refreshes
    Ray's cached config) and says whether it did; None for a Ray without token authentication."""
    try:
        from ray._private.authentication.authentication_token_setup import \
            maybe_enable_token_auth_if_token_available
    except ImportError:
        return None
    return lambda: maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def head_accepts(address: str) -> Optional[bool]:
    """True when the head at `address` answers a read, False when it refuses our (lack of a) token, None
    when it cannot be asked. One read of the head's key-value store through Ray's GCS client, well under a
    second (ray.init would retry for about 20 s)."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address).internal_kv_get(b"mdsweep-auth-probe", None, timeout=5)
        return True
    except AuthenticationError:
        return False
    except Exception:
        return None
