"""Each of Ray's and Tune's insides that orchestrator.cluster.tune_internals knows, pinned against the installed Ray.

A Ray upgrade that renames a file, a key, an environment variable or a private function fails here, one test per
kind, with a message naming what moved in Ray and the name to update in tune_internals.py. No Ray cluster is
started: Ray's constants, a stub Trial, its storage context and Ray's installed files are read.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from functools import cache
from pathlib import Path

import pytest
import ray

from orchestrator.cluster import tune_internals as ti

RAY_DIR = Path(ray.__file__).parent
ADAPTER = "orchestrator/cluster/tune_internals.py"
# The raylet's own binary holds its account of an out-of-memory kill (the text is C++, compiled in)
RAYLET = RAY_DIR / "core" / "src" / "ray" / "raylet" / "raylet"
# What the raylet's format string says where the adapter expects the text the raylet prints from it
RAYLET_FORMATS = {"1 worker": b"%d worker(s) were killed due to the node running low on memory"}


def moved(what: str, update: str) -> str:
    return f"Ray {ray.__version__}: {what}; update {update} in {ADAPTER}"


@cache
def ray_python_source() -> str:
    """Every Python file of the Ray packages that read the variables the adapter sets or reads."""
    return "\n".join(path.read_text(errors="replace") for part in ("tune", "air", "train", "_private")
                     for path in sorted((RAY_DIR / part).rglob("*.py")))


def stub_trial(storage_path: Path, checkpoint_index: int):
    """A Tune trial as the driver makes one (named by trial_dirname), not started, with one registered checkpoint."""
    from ray.train._internal.storage import StorageContext
    from ray.train.constants import CHECKPOINT_DIR_NAME
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path=str(storage_path), experiment_dir_name="exp",
                             current_checkpoint_index=checkpoint_index)
    trial = Trial("mdsweep_trial", stub=True, trial_id="abc12_00003", trial_dirname_creator=ti.trial_dirname,
                  storage=storage)
    storage.trial_dir_name = trial.custom_dirname
    trial.run_metadata.last_result = {CHECKPOINT_DIR_NAME: storage.checkpoint_dir_name}  # as Ray's session reports
    return trial, storage


def test_the_state_file_names_are_tunes_own():
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search.search_generator import SearchGenerator

    from orchestrator.sweep.search import SweepSearcher

    assert TuneController.CKPT_FILE_TMPL == ti.EXPERIMENT_STATE_FILE, moved(
        f"TuneController.CKPT_FILE_TMPL is now {TuneController.CKPT_FILE_TMPL!r}", "EXPERIMENT_STATE_FILE")
    assert SearchGenerator.CKPT_FILE_TMPL == ti.SEARCH_GEN_STATE_FILE, moved(
        f"SearchGenerator.CKPT_FILE_TMPL is now {SearchGenerator.CKPT_FILE_TMPL!r}", "SEARCH_GEN_STATE_FILE")
    assert SweepSearcher.CKPT_FILE_TMPL == ti.SEARCHER_STATE_FILE, moved(
        f"Searcher.CKPT_FILE_TMPL (the sweep's searcher's state file) is now {SweepSearcher.CKPT_FILE_TMPL!r}",
        "SEARCHER_STATE_FILE")


def test_the_trial_files_and_report_keys_are_tunes_own():
    from ray.tune import result

    assert result.EXPR_RESULT_FILE == ti.RESULT_FILE, moved(
        f"ray.tune.result.EXPR_RESULT_FILE is now {result.EXPR_RESULT_FILE!r}", "RESULT_FILE")
    assert result.EXPR_PARAM_FILE == ti.PARAMS_FILE, moved(
        f"ray.tune.result.EXPR_PARAM_FILE is now {result.EXPR_PARAM_FILE!r}", "PARAMS_FILE")
    assert (result.TIMESTAMP, result.TIME_TOTAL_S) == (ti.REPORT_TIMESTAMP, ti.REPORT_TIME_TOTAL_S), moved(
        f"ray.tune.result.TIMESTAMP, TIME_TOTAL_S are now {result.TIMESTAMP!r}, {result.TIME_TOTAL_S!r}",
        "REPORT_TIMESTAMP, REPORT_TIME_TOTAL_S")
    for name in ("REPORT_TIMESTAMP", "REPORT_TIME_TOTAL_S", "REPORT_ITERATIONS_SINCE_RESTORE",
                 "REPORT_CHECKPOINT_DIR_NAME"):
        assert getattr(ti, name) in result.AUTO_RESULT_KEYS, moved(
            f"Tune no longer adds {getattr(ti, name)!r} to every report (ray.tune.result.AUTO_RESULT_KEYS)", name)


def test_checkpoint_folders_are_named_and_found_as_ray_names_them(tmp_path):
    from ray.train._internal.storage import StorageContext

    for index in (0, 7, 123456):
        name = StorageContext._make_checkpoint_dir_name(index)
        assert (ti.checkpoint_dir_name(index), ti.checkpoint_index(name)) == (name, index), moved(
            f"StorageContext._make_checkpoint_dir_name({index}) is now {name!r}",
            "CHECKPOINT_PREFIX, checkpoint_dir_name and checkpoint_index")
    _, storage = stub_trial(tmp_path, 3)
    relative = ti.checkpoint_in_experiment(storage.checkpoint_fs_path)
    assert f"{tmp_path}/exp/{relative}" == storage.checkpoint_fs_path, moved(
        f"a checkpoint is now stored at {storage.checkpoint_fs_path} (not <experiment>/<trial>/<checkpoint>)",
        "checkpoint_in_experiment")


def test_trial_folders_are_named_by_the_driver_and_read_back_to_the_trial_id(tmp_path):
    trial, _ = stub_trial(tmp_path, 0)
    assert trial.custom_dirname == ti.trial_dirname(trial), moved(
        "Trial no longer takes its folder name from `trial_dirname_creator`", "trial_dirname")
    assert ti.trial_id_of_dir(trial.custom_dirname) == trial.trial_id


def test_the_experiment_state_is_read_as_tune_writes_it(tmp_path):
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    assert '"trial_data": list(self._get_trial_checkpoints().values())' in inspect.getsource(
        TuneController.save_to_dir) and "trial.get_json_state()" in inspect.getsource(
        TuneController._get_trial_checkpoints), moved(
        "TuneController.save_to_dir no longer writes `trial_data` as each trial's get_json_state()",
        "unfinished_trials")
    trial, storage = stub_trial(tmp_path, 3)
    state = json.loads(json.dumps({"trial_data": [trial.get_json_state()]}))  # as read back from the file
    assert ti.unfinished_trials(state) == {trial.custom_dirname: storage.checkpoint_dir_name}, moved(
        "Trial.get_json_state() no longer holds the trial's folder (custom_dirname) and, in its run metadata, "
        "the last result's checkpoint_dir_name", "unfinished_trials")
    trial.set_status(Trial.TERMINATED)
    trial.invalidate_json_state()
    assert ti.unfinished_trials({"trial_data": [trial.get_json_state()]}) == {}, moved(
        "a finished trial's state no longer says status TERMINATED", "unfinished_trials")


def test_a_failed_trials_error_file_is_where_tune_writes_it():
    from ray.tune.experiment import Trial

    assert isinstance(inspect.getattr_static(Trial, "error_file", None), property), moved(
        "Trial.error_file is gone", "trial_error_file")
    assert f'"{ti.TUNE_FAILURE_LINE} {{}} (occurred at {{}})' in inspect.getsource(Trial.handle_error), moved(
        "Trial.handle_error no longer heads each failure with 'Failure # N'", "TUNE_FAILURE_LINE")


def test_the_host_oom_text_is_the_raylets():
    """The raylet writes its out-of-memory account from C++, so its text is searched in the compiled binary."""
    assert RAYLET.is_file(), moved(f"the raylet binary is no longer at {RAYLET}; find the file holding "
                                   f"{ti.HOST_OOM_MARKER!r} and point this test at it", "HOST_OOM_MARKER")
    binary = RAYLET.read_bytes()
    for text in (ti.HOST_OOM_MARKER,) + ti.RAYLET_OOM_LINES:
        assert RAYLET_FORMATS.get(text, text.encode()) in binary, moved(
            f"the raylet no longer writes {text!r} when its memory monitor kills a worker",
            "HOST_OOM_MARKER and RAYLET_OOM_LINES")


def test_every_environment_variable_set_or_read_is_one_ray_reads(monkeypatch: pytest.MonkeyPatch):
    from ray._private.runtime_env import constants

    environ: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", environ)
    ti.set_tune_environment("3")
    assert environ, "set_tune_environment sets nothing"
    for name in environ:
        assert name in ray_python_source(), moved(f"no Python file of Ray reads {name} any more",
                                                  "set_tune_environment")
    assert constants.RAY_JOB_CONFIG_JSON_ENV_VAR == ti.JOB_CONFIG_ENV, moved(
        "ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR is now "
        f"{constants.RAY_JOB_CONFIG_JSON_ENV_VAR!r}", "JOB_CONFIG_ENV")
    supervisor = (RAY_DIR / "dashboard" / "modules" / "job" / "job_supervisor.py").read_text()
    assert re.search(r'RAY_JOB_CONFIG_JSON_ENV_VAR:\s*json\.dumps\(\s*\{\s*"runtime_env":', supervisor), moved(
        "the job supervisor no longer passes the job's runtime_env in RAY_JOB_CONFIG_JSON_ENV_VAR",
        "submitted_job_runtime_env")


def test_the_private_functions_used_still_import():
    enable = ti.token_auth_enabler()
    assert enable is not None, moved(
        "ray._private.authentication.authentication_token_setup.maybe_enable_token_auth_if_token_available "
        "no longer imports", "token_auth_enabler")
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    assert "warn_if_disabled" in inspect.signature(maybe_enable_token_auth_if_token_available).parameters, moved(
        "maybe_enable_token_auth_if_token_available lost its warn_if_disabled parameter", "token_auth_enabler")
    try:
        from ray._raylet import GcsClient, InnerGcsClient  # GcsClient forwards its reads to InnerGcsClient
        from ray.exceptions import AuthenticationError  # noqa: F401
    except ImportError as e:
        pytest.fail(moved(f"ray._raylet.GcsClient or ray.exceptions.AuthenticationError no longer imports ({e})",
                          "head_accepts"))
    assert callable(getattr(GcsClient, "internal_kv_get", None) or getattr(InnerGcsClient, "internal_kv_get", None)), \
        moved("ray._raylet.GcsClient (and the InnerGcsClient it forwards to) no longer has internal_kv_get",
              "head_accepts")


def test_the_node_id_label_is_the_one_ray_gives_every_node():
    from ray._raylet import RAY_NODE_ID_KEY

    assert RAY_NODE_ID_KEY == ti.NODE_ID_LABEL, moved(f"ray._raylet.RAY_NODE_ID_KEY is now {RAY_NODE_ID_KEY!r}",
                                                      "NODE_ID_LABEL")


def test_every_callback_hook_the_project_defines_is_one_tune_calls():
    """A hook Tune renamed would never be called, silently: no rows written, no state backed up."""
    from ray.tune import Callback

    from orchestrator.cluster.tune_state import StateBackup
    from orchestrator.sweep.progress import ProgressTable
    from orchestrator.sweep.sink import ParquetSink

    base = ti.tune_callback_base()
    assert base is Callback
    for callback in (ParquetSink, StateBackup, ProgressTable):
        hooks = [name for name in vars(callback) if name.startswith("on_") or name == "setup"]
        assert hooks and all(callable(getattr(base, name, None)) for name in hooks), moved(
            f"ray.tune.Callback no longer has {[n for n in hooks if not hasattr(base, n)]} ({callback.__name__})",
            f"tune_callback_base (and {callback.__module__})")


def test_a_restored_tuner_takes_this_processs_callbacks_on_the_run_config_fit_reads(tmp_path):
    from ray import tune

    assert "run_config" not in inspect.signature(tune.Tuner.restore).parameters, moved(
        "Tuner.restore takes a run_config now", "replace_restored_callbacks (pass the callbacks to restore instead)")
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(storage_path=str(tmp_path), name="exp"))
    local = getattr(tuner, "_local_tuner", None)
    assert local is not None and local.get_run_config() is local._run_config, moved(
        "a local Tuner no longer keeps the run config fit reads on _local_tuner", "replace_restored_callbacks")
    callbacks = [tune.Callback()]
    assert ti.replace_restored_callbacks(tuner, callbacks)
    assert local._run_config.callbacks == callbacks
    source = inspect.getsource(type(local))  # fit hands Tune the callbacks from the run config it keeps
    assert "callbacks=self._run_config.callbacks" in source, moved(
        "TunerInternal no longer hands Tune the callbacks of self._run_config", "replace_restored_callbacks")


def test_the_stand_in_trial_has_only_attributes_a_real_trial_has(tmp_path):
    import dataclasses

    trial, _ = stub_trial(tmp_path, checkpoint_index=1)
    # a property (error_file, checkpoint) on the class, a plain attribute on the instance; not read: some need storage
    missing = [f.name for f in dataclasses.fields(ti.TrialView)
               if not (hasattr(type(trial), f.name) or f.name in vars(trial))]
    assert not missing, moved(f"a Tune Trial no longer has {missing}", "TrialView and the callbacks that read them")
