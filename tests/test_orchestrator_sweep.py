"""The sweep driver's checks, settings manifest, CLI flag parsing and checkpoint repair (no Ray start)."""
from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest

from orchestrator.cli.main import build_parser
from orchestrator.cli.run import fixed_settings
from orchestrator.results.objectives import default_mode
from orchestrator.sweep.checks import check_settings, searched_columns
from orchestrator.sweep.settings import SweepError, SweepSettings, read_manifest, write_manifest
from orchestrator.cluster.tune_state import drop_repair_copies, repair_checkpoints


def _settings(tmp_path, **kw) -> SweepSettings:
    values = dict(name="demo", storage=str(tmp_path / "sweeps"), results=str(tmp_path / "results"),
                  fixed={"train_data": "/data/train.parquet"})
    values.update(kw)
    return SweepSettings(**values)


def test_every_flag_of_every_command_has_help():
    import argparse

    def commands(parser: argparse.ArgumentParser, path: str):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for sub in subs:
            for name, child in sub.choices.items():
                yield from commands(child, f"{path} {name}")

    found = list(commands(build_parser(), "mdsweep"))
    assert len(found) >= 12 and {"mdsweep run", "mdsweep data check", "mdsweep export"} <= {p for p, _ in found}
    for path, parser in found:
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{path} {action.option_strings or action.dest} has no help"


def test_default_modes():
    assert default_mode("val_exact_match") == "max" and default_mode("val_cer") == "min"
    assert default_mode("train_loss") == "min" and default_mode("token_accuracy") == "max"


@pytest.mark.parametrize("kw,match", [
    ({"name": "9lives"}, "--name"),
    ({"metric": "accuracy"}, "--metric 'accuracy'"),
    ({"mode": "up"}, "--mode"),
    ({"num_samples": 0}, "--num-samples"),
    ({"max_concurrent": 0}, "--max-concurrent"),
    ({"fixed": {}}, "--train-data is required"),
    ({"space": "captcha", "cross": [("attention", ["causal", "prefix"])]}, "--cross attention.*captcha:paired"),
    ({"space": "captcha:paired", "cross": [("attention", ["causal", "prefix"])],
      "fixed": {"train_data": "x", "attention": "causal"}}, "--cross attention: attention is also fixed"),
    ({"space": "no_such_space"}, "--space"),
    ({"fixed": {"train_data": "x", "lr": 1e-4}}, "searches lr, which is also fixed"),
    ({"early_stop": "hyperband"}, "--early-stop"),
    ({"search_seed": -1}, "--search-seed must be between 0 and 4294967295, got -1"),
    ({"fixed": {"train_data": "x", "lora_targets": "qproj"}}, "lora_targets qproj match no linear layer"),
    ({"gpu_memory_per_trial": "lots"}, "--gpu-memory-per-trial: cannot read 'lots'"),
    ({"node_gpu_memory": "80 bananas"}, "--node-gpu-memory"),
    ({"objectives": [("val_exact_match", "max"), ("accuracy", "min")]}, "--objective 'accuracy'"),
    ({"job_fn": "no_such_module:run"}, "--job-fn no_such_module:run: expected MODULE:FUNCTION"),
    ({"job_fn": "trainer.job"}, "--job-fn trainer.job: expected MODULE:FUNCTION"),
    # the held-out test may never steer the search
    ({"metric": "test_exact_match"}, "--metric 'test_exact_match'"),
    ({"objectives": [("test_exact_match", "max")]}, "--objective 'test_exact_match': not a reported metric"),
    ({"objectives": [("val_exact_match", "max"), ("elapsed_s", "min")], "early_stop": "asha"},
     "--early-stop with several --objective"),
    ({"log_to": ["comet"]}, r"--log-to comet: 'comet' is not a tracker mdsweep writes to; use mlflow\[=URI\], "
                             r"wandb\[=DIR\] or tensorboard\[=DIR\]"),
    ({"log_to": ["mlflow=a.db", "mlflow=a.db"]}, "--log-to: mlflow=a.db, mlflow=a.db name one place twice"),
    # mfu is null on CPU: a sweep whose trials surely train there cannot rank by it
    ({"metric": "mfu", "gpus_per_trial": 0}, r"--metric mfu: the trials train on CPU \(--gpus-per-trial 0\)"),
    ({"objectives": [("val_exact_match", "max"), ("mfu", "max")], "fixed": {"train_data": "x", "device": "cpu"}},
     r"--objective mfu: the trials train on CPU \(device=cpu\).*--set peak_tflops=N"),
    # each worker takes an equal share of a micro-batch; auto workers follow the auto memory's predictions
    ({"workers_per_trial": 2, "fixed": {"train_data": "x", "batch_size": 3}},
     "--batch-size 3 is not divisible by --workers-per-trial 2"),
    ({"workers_per_trial": "auto", "gpu_memory_per_trial": "16GiB"},
     "--workers-per-trial auto needs --gpu-memory-per-trial auto"),
])
def test_settings_are_checked_before_any_cluster(tmp_path, kw, match):
    with pytest.raises(SweepError, match=match):
        check_settings(_settings(tmp_path, **kw))


def test_mfu_on_cpu_is_taken_when_the_peak_is_given_or_gpus_may_be_there(tmp_path):
    check_settings(_settings(tmp_path, metric="mfu", gpus_per_trial=0,
                             fixed={"train_data": "x", "peak_tflops": 0.5}))
    check_settings(_settings(tmp_path, metric="mfu"))  # GPUs are known once the cluster is: checked then


def test_searched_columns_include_groups(tmp_path):
    s = _settings(tmp_path, space="captcha:paired", cross=[("attention", ["causal", "prefix"])], replicates=3)
    info = check_settings(s)
    assert searched_columns(s, info) == ["grad_accum", "lr", "attention", "seed"]
    assert s.mode == "max"  # filled in from the metric


def test_manifest_round_trip(tmp_path):
    s = _settings(tmp_path, cross=[("attention", ["causal", "prefix"])], gpus_per_trial=0.25, argv="mdsweep run")
    write_manifest(s)
    back = read_manifest(str(tmp_path / "sweeps"), "demo")
    assert back == s
    with pytest.raises(SweepError, match="no sweep 'other'"):
        read_manifest(str(tmp_path / "sweeps"), "other")


def _run_args(*extra: str):
    return build_parser().parse_args(["run", "--train-data", "data/train.parquet", *extra])


def test_fixed_settings_from_flags_and_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = fixed_settings(_run_args("--max-steps", "50", "--seed", "3", "--set", "attention=causal",
                                     "--set", "gradient_checkpointing=false", "--set", "max_val_samples=none"))
    assert fixed == {"train_data": str(tmp_path / "data" / "train.parquet"), "max_steps": 50, "seed": 3,
                     "attention": "causal", "gradient_checkpointing": False, "max_val_samples": None}
    assert fixed_settings(_run_args("--model", "tiny"))["model"] == "tiny"  # a preset name stays a name


@pytest.mark.parametrize("extra,match", [
    (["--max-steps", "5", "--set", "max_steps=6"], "--set max_steps: already given by --max-steps"),
    (["--gpu-memory-per-trial", "8GiB", "--set", "max_gpu_memory=4GiB"], "conflicts with --gpu-memory-per-trial"),
    (["--set", "grad_accum=two"], "--set: grad_accum='two' should be int"),
])
def test_fixed_setting_errors_name_the_flag(extra, match):
    with pytest.raises(ValueError, match=match):
        fixed_settings(_run_args(*extra))


def _experiment(tmp_path: Path, trials: dict[str, tuple[str, str | None, list[int]]]) -> Path:
    """An experiment folder: trial dir -> (status, checkpoint the state points at, checkpoints on disk)."""
    root = tmp_path / "exp"
    data = []
    for name, (status, ref, present) in trials.items():
        for i in present:
            ck = root / name / f"checkpoint_{i:06d}"
            ck.mkdir(parents=True)
            (ck / "state.pt").write_text(f"{name} state {i}")
        data.append([json.dumps({"trial_id": name, "status": status, "custom_dirname": name}),
                     json.dumps({"last_result": {"checkpoint_dir_name": ref}})])
    (root / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": data}))
    return root


def test_repair_recreates_the_checkpoint_a_killed_driver_left_pointing_at(tmp_path):
    root = _experiment(tmp_path, {
        "trial_race": ("RUNNING", "checkpoint_000001", [2]),   # state behind: points at a deleted one
        "trial_fine": ("RUNNING", "checkpoint_000002", [2]),   # state current
        "trial_done": ("TERMINATED", "checkpoint_000001", [3]),  # finished: never restored
        "trial_new": ("PENDING", None, []),
    })
    assert repair_checkpoints(str(root)) == ["trial_race"]
    assert (root / "trial_race" / "checkpoint_000001" / "state.pt").read_text() == "trial_race state 2"
    assert not (root / "trial_fine" / "checkpoint_000001").exists()
    assert not (root / "trial_done" / "checkpoint_000001").exists()
    drop_repair_copies(str(root), ["trial_race"])
    assert sorted(p.name for p in (root / "trial_race").iterdir()) == ["checkpoint_000002"]


@pytest.mark.parametrize("flag", ["--results", "--storage"])
def test_a_relative_output_is_refused_in_a_driver_started_by_ray_job_submit(tmp_path, captcha_parquet, flag, capsys,
                                                                           monkeypatch):
    """Under `ray job submit --working-dir`, Ray's job manager hands the driver its runtime env in this variable and
    runs it in a copy of the directory that Ray deletes: relative outputs would vanish with it. (A real submitted
    job: tests/test_orchestrator_ray_start.py.)"""
    from orchestrator.cli.main import main

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "."}}')
    monkeypatch.chdir(tmp_path)
    paths = {"--results": str(tmp_path / "r"), "--storage": str(tmp_path / "s")}
    paths[flag] = "relative-dir"
    argv = ["run", "--name", "x", "--train-data", str(captcha_parquet), "--dry-run"]
    for k, v in paths.items():
        argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} relative-dir: relative, and this driver runs in Ray's temporary copy" in err[0]
    assert not (tmp_path / "relative-dir").exists()


@pytest.mark.parametrize("flag", ["--results", "--storage", "--cache-dir"])
def test_an_output_path_that_is_a_file_is_one_line_before_anything_starts(tmp_path, captcha_parquet, flag, capsys):
    from orchestrator.cli.main import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    paths = {"--results": str(tmp_path / "r"), "--storage": str(tmp_path / "s"), "--cache-dir": str(tmp_path / "c")}
    paths[flag] = str(blocker / "sub")
    argv = ["run", "--name", "x", "--train-data", str(captcha_parquet)]
    for k, v in paths.items():
        argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mdsweep run: error: {flag} {blocker / 'sub'}: {blocker} is a file, not a directory"]
    assert not any((tmp_path / name).exists() for name in "rsc")


@pytest.mark.parametrize("store", ["{}/runs", "sqlite:///{}/mlflow.db"])
def test_an_mlflow_store_under_a_file_is_one_line_before_anything_starts(tmp_path, captcha_parquet, store, capsys):
    from orchestrator.cli.main import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "--name", "x", "--train-data", str(captcha_parquet), "--results", str(tmp_path / "r"),
                 "--storage", str(tmp_path / "s"), "--log-to", f"mlflow={store.format(blocker)}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdsweep run: error: --log-to ")
    assert err[0].endswith(f"{blocker} is a file, not a directory")
    assert not any((tmp_path / name).exists() for name in "rs")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """mount(tmpfs, 64 KiB) → a function making a read-only or a full filesystem at a path: the real errors a disk
    gives (as root, permission bits do not stop a write). Unmounted at the end."""
    import subprocess

    mounted = []

    def make(name: str, *, read_only: bool):
        point = tmp_path / name
        point.mkdir()
        options = "size=64k" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)]).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(point)
        if not read_only:
            with open(point / "filler", "wb") as f, contextlib.suppress(OSError):
                f.write(b"\0" * 128 * 1024)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)])


@pytest.mark.parametrize("flag", ["--results", "--storage", "--cache-dir"])
@pytest.mark.parametrize("read_only, reason", [(True, "Read-only file system"), (False, "No space left on device")])
def test_a_read_only_or_full_output_disk_is_one_line_before_anything_starts(tmp_path, captcha_parquet, flag,
                                                                            read_only, reason, tiny_filesystem,
                                                                            capsys):
    from orchestrator.cli.main import main

    disk = tiny_filesystem("disk", read_only=read_only)
    paths = {"--results": str(tmp_path / "r"), "--storage": str(tmp_path / "s"), "--cache-dir": str(tmp_path / "c")}
    paths[flag] = str(disk / "out")
    argv = ["run", "--name", "x", "--train-data", str(captcha_parquet), "--dry-run"]
    for k, v in paths.items():
        argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mdsweep run: error: {flag} {disk / 'out'}: cannot write in {disk} "
                                               f"({reason}); ")


def test_a_sweep_that_failed_before_tune_saved_state_does_not_burn_its_name(tmp_path):
    from orchestrator.sweep.driver import _forget_unstarted
    from orchestrator.sweep.settings import SweepSettings, manifest_exists, write_manifest

    s = SweepSettings(name="burnt", storage=str(tmp_path / "s"), results=str(tmp_path / "r"),
                      fixed={"train_data": "x"})
    write_manifest(s)
    assert manifest_exists(s.storage, "burnt")
    _forget_unstarted(s)
    assert not manifest_exists(s.storage, "burnt")


@pytest.mark.parametrize("flag", ["--train-data", "--val-data"])
def test_a_missing_data_path_fails_before_anything_starts(tmp_path, captcha_parquet, flag, capsys):
    from orchestrator.cli.main import main

    paths = {"--train-data": str(captcha_parquet), "--val-data": str(captcha_parquet)}
    paths[flag] = str(tmp_path / "nowhere.parquet")
    argv = ["run", "--name", "x", "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r")]
    for k, v in paths.items():
        argv += [k, v]
    assert main(argv) == 2
    assert f"{flag}: {tmp_path / 'nowhere.parquet'}: path does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_resume_names_a_bad_sweep_name_before_anything_else(tmp_path):
    from orchestrator.sweep.driver import resume_sweep

    with pytest.raises(SweepError, match="NAME: sweep name '9lives'"):
        resume_sweep("9lives", str(tmp_path / "sweeps"))


def test_corrupt_training_data_fails_before_ray_starts(tmp_path):
    import ray

    from orchestrator.sweep.driver import run_sweep

    data = tmp_path / "labels.csv"
    data.write_text("image,text\nmissing.png,123\n")
    with pytest.raises(SweepError, match="--train-data: .*missing.png"):
        run_sweep(_settings(tmp_path, fixed={"train_data": str(data)}), quiet=True)
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps" / "demo").exists()


def test_the_held_out_test_takes_the_best_ok_trials_once_per_test_set():
    """--test-top 2: the two best ok trials by the validation objective, never a failed one listed before them
    nor one already tested on the same data (a resumed sweep); one tested on other data is tested again."""
    from orchestrator.sweep.held_out import trials_to_test

    rows = [{"trial_id": "oom", "outcome": "oom", "objective": None},
            {"trial_id": "low", "outcome": "ok", "objective": 0.25},
            {"trial_id": "top", "outcome": "ok", "objective": 0.75},
            {"trial_id": "mid", "outcome": "ok", "objective": 0.5}]
    assert [r["trial_id"] for r in trials_to_test(rows, 2, "test.parquet")] == ["top", "mid"]
    rows[2] |= {"test_n": 24, "test_data": "test.parquet"}
    assert [r["trial_id"] for r in trials_to_test(rows, 2, "test.parquet")] == ["mid"]
    assert [r["trial_id"] for r in trials_to_test(rows, 2, "other.parquet")] == ["top", "mid"]


def _model_case(tmp_path: Path, case: str) -> tuple[str, list[str]]:
    """(--model value, extra flags) of a model a sweep cannot use, as the probe of issue 29 wrote them."""
    from conftest import write_bpe_model
    from trainer.model.synth_tokenizer import write_bpe_tokenizer

    model = tmp_path / "model"
    if case == "empty":
        model.mkdir()
        return str(model), []
    write_bpe_model(model, vocab_size=128 if case == "ids past the vocabulary" else 320)
    write_bpe_tokenizer(model)
    config = json.loads((model / "mdsweep_config.json").read_text())
    if case in ("wrong shapes", "zero heads"):
        config["text"] |= {"ff_dim": 100} if case == "wrong shapes" else {"n_heads": 0}
        (model / "mdsweep_config.json").write_text(json.dumps(config))
    extra = {"tokenizer /nonexistent": ["--set", "tokenizer=/nonexistent"],
             "revision no date": ["--set", "revision=2024-13-99"]}.get(case, [])
    return str(model), extra


@pytest.mark.parametrize("case, says", [
    ("empty", "no model.safetensors"),
    ("wrong shapes", "has shape (192, 96), the model config expects (100, 96)"),
    ("zero heads", "text.n_heads must be ≥ 1, got 0"),
    ("ids past the vocabulary", "300 ids, but the model's vocabulary has 128 rows"),
    ("tokenizer /nonexistent", "tokenizer /nonexistent: no tokenizer.json in /nonexistent"),
    ("revision no date", "revision 2024-13-99: not a date"),
])
def test_a_model_no_trial_could_load_is_one_line_before_ray_starts(tmp_path, captcha_parquet, case, says, capsys):
    """`run` and its --dry-run read the model's header, config and tokenizer as `predict` does, before Ray."""
    import ray

    from orchestrator.cli.main import main

    model, extra = _model_case(tmp_path, case)
    for dry_run in (["--dry-run"], []):
        argv = ["run", "--name", "x", "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"),
                "--train-data", str(captcha_parquet), "--model", model, *extra, *dry_run]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mdsweep run: error: --model {model}: ") and says in err[0], err
        assert not ray.is_initialized() and not (tmp_path / "s").exists()


def test_the_model_check_passes_the_shipped_bases_and_a_good_checkpoint(tmp_path, captcha_parquet):
    from orchestrator.sweep.checks import check_model
    from trainer.job_config import JobConfig

    model, _ = _model_case(tmp_path, "good")
    for spec in ("tiny", "tiny-reader-v2", model):
        check_model(JobConfig(train_data=str(captcha_parquet), model=spec))


def test_the_model_check_loads_neither_torch_nor_the_network(tmp_path, captcha_parquet):
    """Every `mdsweep run` checks its model before Ray starts. Through the network's module that loaded torch and
    transformers, seconds of every sweep's start (a dry run: 16 s, of which the imports were 6). A fresh
    interpreter, as a user's `mdsweep run` is, checks a checkpoint on disk and a shipped base."""
    import subprocess
    import sys

    from harness import ROOT, mdsweep_env

    model, _ = _model_case(tmp_path, "good")
    code = ("import sys\n"
            "from orchestrator.sweep.checks import check_model\n"
            "from trainer.job_config import JobConfig\n"
            f"for spec in ('tiny-reader-v2', {str(model)!r}):\n"
            f"    check_model(JobConfig(train_data={str(captcha_parquet)!r}, model=spec))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'trainer.model.network') "
            "if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mdsweep_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _safetensors(entries: object, data: bytes, *, encode=lambda text: text.encode()) -> bytes:
    header = encode(json.dumps(entries))
    return struct.pack("<Q", len(header)) + header + data


F32_PAIR = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("content, why", [
    (_safetensors(F32_PAIR, bytes(12)), None),
    (_safetensors({**F32_PAIR, "__metadata__": {"format": "pt"}}, bytes(12)), None),
    (b"\x01\x02", "2 bytes, shorter than"),
    (_safetensors(F32_PAIR, bytes(8)), "the tensors' data is 12 bytes, the file holds 8 after its header \\(the file is cut"),
    (_safetensors(F32_PAIR, bytes(16)), "the file holds 16"),
    (_safetensors({**F32_PAIR, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
     "'b' starts at byte 4 of the data, where the tensor before it ends at byte 8: overlapping"),
    (_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "uncovered bytes"),
    (_safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     "'a': 8 bytes for a F32 tensor of shape \\(3,\\)"),
    (_safetensors({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, bytes(8)),
     "shape \\[True, 2\\] is not a list of whole numbers"),
    (_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)), "is not \\[start, end\\]"),
    (_safetensors({"a": {"dtype": "XYZ", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "unknown dtype 'XYZ'"),
    (_safetensors({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "needs a dtype, a shape and data_offsets"),
    (_safetensors({**F32_PAIR, "__metadata__": [1]}, bytes(12)), "__metadata__ is not a map of strings"),
    (_safetensors([1, 2], b""), "not a JSON object"),
    (_safetensors(F32_PAIR, bytes(12), encode=lambda text: b"\xef\xbb\xbf" + text.encode()), "BOM"),
    (_safetensors(F32_PAIR, bytes(12), encode=lambda text: text.encode("utf-16")), "codec can't decode"),
    (struct.pack("<Q", 10**6) + b"[" * 10**6, "its header nests too deep"),
    (struct.pack("<Q", 2 * 10**8) + b"{}", "its header length 200000000 is over the format's limit"),
], ids=["valid", "metadata", "short", "cut", "trailing", "overlap", "uncovered", "span", "bool-size",
        "offsets", "dtype", "fields", "metadata-list", "list", "bom", "utf-16", "deep", "huge"])
def test_a_header_that_does_not_hold_together_is_one_line_naming_the_file(tmp_path, content, why):
    """The header is read without the safetensors library now, so its own checks stand in for the library's,
    each case a file the library refuses (found by a probe of the first version, which accepted overlapping and
    uncovered bytes, sizes of `true`, and raised on a deep nesting or a 4 GiB length)."""
    from trainer.model.layouts import CheckpointError, read_header

    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    if why is None:
        header = read_header(path)
        assert header.tensors == F32_PAIR and header.data_start == len(content) - 12
        return
    with pytest.raises(CheckpointError, match=f"^{path}: not a readable safetensors file \\(.*{why}"):
        read_header(path)


@pytest.mark.parametrize("quiet", [False, True])
def test_an_interrupted_sweep_says_how_to_resume_even_when_quiet(tmp_path, capsys, quiet):
    """Ctrl-C on `mdsweep run --quiet` printed "nothing to recommend" and never how to resume."""
    from orchestrator.results.schema import rows_to_table, schema_for
    from orchestrator.cli.run import print_outcome
    from orchestrator.sweep.driver import _finish
    from orchestrator.results.store import partition_dir, write_atomic

    s = _settings(tmp_path, num_samples=2)
    s.results = str(tmp_path / "results")
    row = {"trial_id": "t0", "group_id": 0, "member": 0, "status": "running", "outcome": "running"}
    write_atomic(rows_to_table([row], schema_for("trials")),
                 partition_dir(s.results, "trials", s.name) / "trials.parquet")
    outcome = _finish(s, 0.0, None, quiet=quiet)
    print_outcome(outcome, quiet)
    assert outcome.status == "interrupted"
    captured = capsys.readouterr()
    said = (captured.err if quiet else captured.out).strip().splitlines()
    assert f"sweep demo is interrupted: continue it with `mdsweep resume demo --storage {s.storage}`" in said
