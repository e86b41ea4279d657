"""The Parquet sink, driven like Ray Tune drives it (stand-in trials, no cluster)."""
from __future__ import annotations

import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cluster.tune_internals import TrialView
from orchestrator.results.schema import METADATA_KEY, METRICS, SCHEMA_VERSION, TABLES, schema_for
from orchestrator.results.spaces import GROUP_KEY, MEMBER_KEY
from orchestrator.results.store import read_partition, write_atomic, write_sweep_row
from orchestrator.sweep.sink import ParquetSink
from orchestrator.sweep.trainable import JOB_CONFIG_KEY, KIND_KEY, PREDICTIONS_KEY, job_config_from

@pytest.fixture(autouse=True)
def every_change_written(monkeypatch):
    """These tests read the tables right after each hook: the trials file is written on every change, as it is
    when its interval has passed (the interval's own test sets a clock)."""
    import orchestrator.results.store as sink_module

    monkeypatch.setattr(sink_module, "ROW_INTERVAL_S", 0.0)
    monkeypatch.setattr(sink_module, "WRITE_SHARE", 0)


FIXED = {"train_data": "/data/train.parquet", "model": "tiny", "max_steps": 4, "eval_every": 2}


def _eval(step: int, em: float, **extra) -> dict:
    r = {"step": step, "train_loss": 1.0 / step, "val_exact_match": em, "val_exact_match_low": max(0, em - 0.1),
         "val_exact_match_high": min(1, em + 0.1), "val_n": 4, "peak_memory_bytes": 1000 * step,
         "outcome": "running", KIND_KEY: "eval", "node_id": "node-a", "node_ip": "10.0.0.1", "gpu_ids": "0",
         "training_iteration": step // 2}
    r.update(extra)
    return r


def _final(step: int, em: float, outcome: str = "ok", predictions: bool = True, **extra) -> dict:
    r = {"step": step, "val_exact_match": em, "outcome": outcome, KIND_KEY: "final", "peak_memory_bytes": 9999,
         "job_wall_time_s": 1.5, "job_error": ""}
    if predictions:
        r[PREDICTIONS_KEY] = {"sample_id": ["s0", "s1", "s2", "s3"], "target": ["1234", "5678", "0000", "1111"],
                              "prediction": ["1234", "5670", "0000", "1"], "correct": [True, False, True, False],
                              "cer": [0.0, 0.25, 0.0, 0.75]}
    r.update(extra)
    return r


def _sink(tmp_path: Path, name: str = "demo") -> ParquetSink:
    return ParquetSink(str(tmp_path / "results"), name, FIXED, ["lr", "attention"], "val_exact_match", "max")


def _trial(tid: str = "t1", lr: float = 1e-4, attention: str = "prefix", group: int = 0) -> TrialView:
    return TrialView(tid, {"lr": lr, "attention": attention, "lr_aux": 3, "_drop": ["lr_aux"], GROUP_KEY: group,
                           MEMBER_KEY: 0})


def _run_one(sink: ParquetSink, trial: TrialView, ems=(0.25, 0.5), final_em=0.5, **final_kw) -> None:
    sink.on_trial_start(0, [], trial)
    for i, em in enumerate(ems):
        sink.on_trial_result(0, [], trial, _eval(2 * (i + 1), em))
    result = _final(2 * len(ems), final_em, **final_kw)
    sink.on_trial_result(0, [], trial, result)
    sink.on_trial_complete(0, [], trial)


def _read(tmp_path: Path, table: str) -> pa.Table:
    return pq.read_table(tmp_path / "results" / table)


def test_a_finished_trial_lands_in_three_tables(tmp_path):
    sink = _sink(tmp_path)
    sink.setup()
    _run_one(sink, _trial())
    trials = _read(tmp_path, "trials").to_pylist()
    assert len(trials) == 1
    t = trials[0]
    assert t["sweep"] == "demo" and t["trial_id"] == "t1" and t["outcome"] == "ok" and t["status"] == "terminated"
    assert t["lr"] == 1e-4 and t["attention"] == "prefix" and t["train_data"] == "/data/train.parquet"
    assert t["grad_accum"] == 1  # JobConfig default, spelled out
    assert t["searched"] == ["attention", "lr"] and '"lr_aux"' in t["params_json"]
    assert t["best_val_exact_match"] == 0.5 and t["final_val_exact_match"] == 0.5 and t["objective"] == 0.5
    assert t["best_step"] == 4 and t["final_val_exact_match_low"] == pytest.approx(0.4)
    assert t["peak_memory_bytes"] == 9999 and t["node_ip"] == "10.0.0.1" and t["gpu_ids"] == "0"
    assert t["attempts"] == 1 and t["num_failures"] == 0 and t["group_id"] == 0
    assert t["start_time"] is not None and t["end_time"] >= t["start_time"] and t["wall_time_s"] >= 0
    assert t["schema_version"] == SCHEMA_VERSION
    steps = _read(tmp_path, "steps").to_pylist()
    assert [(s["trial_id"], s["step"], s["val_exact_match"]) for s in steps] == [("t1", 2, 0.25), ("t1", 4, 0.5)]
    preds = _read(tmp_path, "predictions").to_pylist()
    assert [p["sample_id"] for p in preds] == ["s0", "s1", "s2", "s3"]
    assert [p["correct"] for p in preds] == [True, False, True, False] and preds[0]["step"] == 4


def test_predictions_are_taken_out_of_the_result(tmp_path):
    sink = _sink(tmp_path)
    trial = _trial()
    sink.on_trial_start(0, [], trial)
    result = _final(4, 0.5)
    sink.on_trial_result(0, [], trial, result)
    assert PREDICTIONS_KEY not in result  # Tune's loggers and experiment state never see them


def test_files_carry_the_schema_version_and_declared_types(tmp_path):
    sink = _sink(tmp_path)
    _run_one(sink, _trial())
    for table in ("trials", "steps", "predictions"):
        f = next((tmp_path / "results" / table / "sweep=demo").glob("*.parquet"))
        file_schema = pq.read_schema(f)
        assert file_schema.metadata[METADATA_KEY] == str(SCHEMA_VERSION).encode()
        assert file_schema.remove_metadata().equals(schema_for(table).remove_metadata())
        assert "sweep" not in file_schema.names  # only in the folder name


def test_the_documented_schema_names_every_column():
    """The schema section of docs/results.md is written for people; this keeps it from drifting from results_schema."""
    from trainer.job_config import field_types

    page = (Path(__file__).resolve().parent.parent / "docs" / "results.md").read_text()
    section = page.split("## Parquet schema", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", section))
    by_pattern = set(field_types()) | {f"{kind}_{m}" for kind in ("best", "final") for m in METRICS}
    for table in TABLES:
        missing = [f.name for f in schema_for(table) if f.name not in named and f.name not in by_pattern]
        assert not missing, f"docs/results.md schema section lacks {table} columns {missing}"


def test_a_retried_trial_neither_duplicates_nor_loses_rows(tmp_path):
    sink = _sink(tmp_path)
    trial = _trial()
    sink.on_trial_start(0, [], trial)
    sink.on_trial_result(0, [], trial, _eval(2, 0.25))
    sink.on_trial_result(0, [], trial, _eval(4, 0.3))
    # the worker dies; Tune restarts the trial from its step-2 checkpoint
    trial.num_failures = 1
    sink.on_trial_recover(0, [], trial)
    sink.on_trial_start(0, [], trial)
    sink.on_trial_result(0, [], trial, _eval(4, 0.5, restored_from_step=2))
    sink.on_trial_result(0, [], trial, _final(4, 0.5, restored_from_step=2))
    sink.on_trial_complete(0, [], trial)
    steps = _read(tmp_path, "steps").to_pylist()
    assert [(s["step"], s["val_exact_match"]) for s in steps] == [(2, 0.25), (4, 0.5)]
    t = _read(tmp_path, "trials").to_pylist()[0]
    assert t["attempts"] == 2 and t["num_failures"] == 1 and t["restored_from_step"] == 2 and t["outcome"] == "ok"


def test_a_resumed_sweep_reads_back_what_was_written(tmp_path):
    sink = _sink(tmp_path)
    sink.setup()
    _run_one(sink, _trial("done"))
    running = _trial("half", lr=2e-4)
    sink.on_trial_start(0, [], running)
    sink.on_trial_result(0, [], running, _eval(2, 0.25))
    first_start = _read(tmp_path, "trials").to_pylist()
    first_start = {r["trial_id"]: r["start_time"] for r in first_start}["half"]

    # the driver dies; Tune pickled the callback at the start of the sweep
    revived = pickle.loads(pickle.dumps(sink))
    assert revived._trials == {}
    revived.setup()
    revived.on_trial_start(0, [], running)
    revived.on_trial_result(0, [], running, _eval(2, 0.25))  # reported again after restoring a checkpoint
    revived.on_trial_result(0, [], running, _eval(4, 0.75))
    revived.on_trial_result(0, [], running, _final(4, 0.75))
    revived.on_trial_complete(0, [], running)

    trials = {r["trial_id"]: r for r in _read(tmp_path, "trials").to_pylist()}
    assert set(trials) == {"done", "half"}
    assert trials["half"]["start_time"] == first_start and trials["half"]["attempts"] == 2
    assert trials["done"]["attempts"] == 1 and trials["done"]["outcome"] == "ok"
    steps = [(s["trial_id"], s["step"]) for s in _read(tmp_path, "steps").to_pylist()]
    assert sorted(steps) == [("done", 2), ("done", 4), ("half", 2), ("half", 4)]


def test_rows_of_an_earlier_attempt_beyond_the_final_step_are_dropped(tmp_path):
    sink = _sink(tmp_path)
    trial = _trial()
    sink.on_trial_start(0, [], trial)
    for step in (2, 4, 6):
        sink.on_trial_result(0, [], trial, _eval(step, 0.1))
    sink.on_trial_start(0, [], trial)
    sink.on_trial_result(0, [], trial, _final(4, 0.1, outcome="oom", predictions=False))
    assert [s["step"] for s in _read(tmp_path, "steps").to_pylist()] == [2, 4]


def test_outcomes_oom_stopped_and_error(tmp_path):
    sink = _sink(tmp_path)
    oom = _trial("oom")
    sink.on_trial_start(0, [], oom)
    sink.on_trial_result(0, [], oom, _final(1, float("nan"), outcome="oom", predictions=False,
                                            job_error="out of memory at step 2"))
    sink.on_trial_complete(0, [], oom)
    stopped = _trial("stopped")
    sink.on_trial_start(0, [], stopped)
    sink.on_trial_result(0, [], stopped, _eval(2, 0.0))
    sink.on_trial_complete(0, [], stopped)  # ASHA stopped it: no final report
    err_file = tmp_path / "error.txt"
    err_file.write_text("Traceback ...\nRuntimeError: worker lost three times\n")
    errored = TrialView("err", {"lr": 1e-5, "attention": "causal"}, num_failures=3, error_file=str(err_file))
    sink.on_trial_start(0, [], errored)
    sink.on_trial_error(0, [], errored)
    trials = {r["trial_id"]: r for r in _read(tmp_path, "trials").to_pylist()}
    assert trials["oom"]["outcome"] == "oom" and trials["oom"]["peak_memory_bytes"] == 9999
    assert trials["oom"]["error"] == "out of memory at step 2" and trials["oom"]["objective"] is None
    assert trials["oom"]["final_val_exact_match"] is None  # never evaluated: null, not NaN
    assert trials["stopped"]["outcome"] == "stopped" and trials["stopped"]["steps_completed"] == 2
    assert trials["err"]["outcome"] == "error" and "worker lost" in trials["err"]["error"]
    assert trials["err"]["status"] == "error" and trials["err"]["num_failures"] == 3


def test_atomic_writes_leave_no_torn_or_temporary_files(tmp_path):
    """A reader in a loop while a writer alternates two versions: the writer goes on until the reader has read
    many times and seen both versions, so the two surely overlapped; every read is whole."""
    path = tmp_path / "t" / "x.parquet"
    stop = threading.Event()
    errors, seen = [], []

    def reader():
        while not stop.is_set():
            if path.exists():
                try:  # one open handle: a path-based read may open the file twice and mix two versions
                    with open(path, "rb") as handle:
                        seen.append(pq.read_table(handle).num_rows)
                except Exception as e:  # pragma: no cover - the failure being tested for
                    errors.append(e)

    th = threading.Thread(target=reader)
    th.start()
    writes = 0
    try:
        while writes < 40 or len(seen) < 200 or not {100, 200} <= set(seen):
            assert writes < 20000, f"the reader read {len(seen)} times in {writes} writes"
            write_atomic(pa.table({"a": list(range(100 if writes % 2 else 200))}), path)
            writes += 1
    finally:
        stop.set()
        th.join()
    assert not errors
    assert set(seen) == {100, 200}  # whole versions only, and both
    assert [p.name for p in path.parent.iterdir()] == ["x.parquet"]


def test_query_reads_while_the_sink_writes(tmp_path):
    # pyarrow's dataset reader notes file sizes when it lists a folder and reads later;
    # load_table retries a file replaced in between from a fresh listing
    from orchestrator.results.query import load_table

    sink = _sink(tmp_path)
    trial = _trial()
    sink.on_trial_start(0, [], trial)
    sink.on_trial_result(0, [], trial, _eval(2, 0.1))
    stop = threading.Event()
    errors, reads = [], [0]

    def reader():
        while not stop.is_set():
            try:
                t = load_table(tmp_path / "results", "steps")
                assert t.num_rows >= 1 and len(set(t["step"].to_pylist())) == t.num_rows
                reads[0] += 1
            except Exception as e:  # pragma: no cover - the failure being tested for
                errors.append(e)

    th = threading.Thread(target=reader)
    th.start()
    try:
        for step in range(4, 404, 2):
            sink.on_trial_result(0, [], trial, _eval(step, 0.1))
    finally:
        stop.set()
        th.join()
    assert not errors and reads[0] > 0


def test_temporary_files_are_invisible_to_readers(tmp_path):
    sink = _sink(tmp_path)
    _run_one(sink, _trial())
    part = tmp_path / "results" / "trials" / "sweep=demo"
    (part / ".t2.parquet.abcd.tmp").write_bytes(b"PAR1 half a file")
    assert _read(tmp_path, "trials").num_rows == 1
    assert len(read_partition(tmp_path / "results", "trials", "demo")) == 1


def test_sweeps_table(tmp_path):
    root = tmp_path / "results"
    write_sweep_row(root, "demo", {"status": "running", "metric": "val_exact_match", "num_samples": 4})
    write_sweep_row(root, "demo", {"status": "finished"})
    rows = pq.read_table(root / "sweeps").to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "finished" and rows[0]["num_samples"] == 4
    assert rows[0]["updated_at"] >= rows[0]["created_at"]


def test_bad_sweep_names_are_refused(tmp_path):
    for bad in ("2024", "a/b", "", "x y", "-x"):
        with pytest.raises(ValueError, match="--name"):
            _sink(tmp_path, bad)


def _two_sweeps(tmp_path):
    a, b = _sink(tmp_path, "alpha"), _sink(tmp_path, "beta")
    _run_one(a, _trial("a1"))
    _run_one(a, _trial("a2", attention="causal"), final_em=0.25)
    _run_one(b, _trial("b1"), final_em=0.75)
    return tmp_path / "results"


def test_readable_by_pyarrow_dataset_and_pandas_without_this_package(tmp_path):
    root = _two_sweeps(tmp_path)
    import pandas as pd
    import pyarrow.dataset as ds

    t = ds.dataset(root / "trials", format="parquet", partitioning="hive").to_table()
    assert sorted(zip(t["sweep"].to_pylist(), t["trial_id"].to_pylist())) == [
        ("alpha", "a1"), ("alpha", "a2"), ("beta", "b1")]
    df = pd.read_parquet(root / "trials")
    assert len(df) == 3 and set(df["sweep"].astype(str)) == {"alpha", "beta"}
    steps = pd.read_parquet(root / "steps", filters=[("sweep", "==", "alpha")])
    assert len(steps) == 4 and not steps.duplicated(["trial_id", "step"]).any()


def test_readable_by_polars(tmp_path):
    pl = pytest.importorskip("polars")
    root = _two_sweeps(tmp_path)
    df = pl.read_parquet(str(root / "trials" / "**" / "*.parquet"), hive_partitioning=True)
    assert df.height == 3 and set(df["sweep"].to_list()) == {"alpha", "beta"}
    preds = pl.scan_parquet(str(root / "predictions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert preds.height == 12 and preds["correct"].dtype == pl.Boolean


def test_readable_by_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    root = _two_sweeps(tmp_path)
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT sweep, attention, count(*) AS n, avg(objective) AS em FROM "
        f"read_parquet('{root}/trials/*/*.parquet', hive_partitioning = true) "
        f"GROUP BY ALL ORDER BY sweep, attention").fetchall()
    assert rows == [("alpha", "causal", 1, 0.25), ("alpha", "prefix", 1, 0.5), ("beta", "prefix", 1, 0.75)]
    n = con.execute(f"SELECT count(*) FROM read_parquet('{root}/steps/*/*.parquet', hive_partitioning = true)"
                    ).fetchone()[0]
    assert n == 6


def test_the_trials_row_records_the_config_the_trial_reports_it_ran(tmp_path):
    """The trial's own JobConfig (JOB_CONFIG_KEY) is what lands in the config columns, e.g. the GPU share an
    `auto` trial was given, not the sink's guess from the suggestion; and it stays out of Tune's result."""
    sink = ParquetSink(str(tmp_path / "results"), "demo", FIXED, ["lr", "attention"], "val_exact_match", "max",
                       max_gpu_memory="auto")
    trial = _trial()
    sink.on_trial_start(0, [], trial)
    assert read_partition(tmp_path / "results", "trials", "demo")[0]["max_gpu_memory"] == "auto"
    ran = job_config_from(FIXED, trial.config).to_dict() | {"max_gpu_memory": "0.3125", "seed": 7}
    result = _eval(2, 0.25, **{JOB_CONFIG_KEY: ran})
    sink.on_trial_result(0, [], trial, result)
    assert JOB_CONFIG_KEY not in result
    row = read_partition(tmp_path / "results", "trials", "demo")[0]
    assert row["max_gpu_memory"] == "0.3125" and row["lr"] == 1e-4 and row["attention"] == "prefix"
    assert row["model"] == "tiny" and row["max_steps"] == 4 and row["seed"] == 7  # as reported, not guessed


def test_the_trials_file_is_rewritten_at_most_every_interval_and_every_step_row_at_once(tmp_path, monkeypatch):
    """At scale, rewriting the wide trials rows per report was most of the driver's time: reports land in `steps`
    at once; the sweep's one trials file follows by the interval (longer when its write is slow) or at the end."""
    import orchestrator.results.store as sink_module

    clock = [100.0]
    monkeypatch.setattr(sink_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sink_module, "ROW_INTERVAL_S", 10.0)
    monkeypatch.setattr(sink_module, "WRITE_SHARE", 50)
    writes: list[float] = []
    real_write = sink_module.write_trials_file

    def slow_write(*args):  # a write that takes 0.1 s: the interval stays 10 s (50 x 0.1 = 5)
        writes.append(clock[0])
        real_write(*args)
        clock[0] += 0.1

    monkeypatch.setattr(sink_module, "write_trials_file", slow_write)
    sink, first, second = _sink(tmp_path), _trial("t1"), _trial("t2", lr=2e-4)
    sink.on_trial_start(0, [], first)
    sink.on_trial_start(0, [], second)
    assert len(writes) == 1  # the first change at once; the second waits for the interval
    for step in (2, 4, 6, 8):
        for trial in (first, second):  # no placement in these reports: a new one is written at once (next test)
            sink.on_trial_result(0, [], trial, _eval(step, step / 10, node_id=None))
        clock[0] += 1
    assert [s["step"] for s in read_partition(tmp_path / "results", "steps", "demo")] == [2, 4, 6, 8] * 2
    assert len(writes) == 1 and [r["trial_id"] for r in read_partition(tmp_path / "results", "trials", "demo")] == ["t1"]
    clock[0] += 6
    sink.on_step_end(0, [])  # 10.1 s after the last write: due, even with no report
    rows = {r["trial_id"]: r for r in read_partition(tmp_path / "results", "trials", "demo")}
    assert len(writes) == 2 and {t: (r["n_reports"], r["final_val_exact_match"]) for t, r in rows.items()} == {
        "t1": (4, 0.8), "t2": (4, 0.8)}
    sink.on_trial_result(0, [], first, _final(8, 0.8))
    sink.on_trial_complete(0, [], first)
    assert read_partition(tmp_path / "results", "trials", "demo")[0]["outcome"] == "running"  # not yet due
    assert "t1" not in sink._trials and "t1" not in sink._steps  # an ended trial's rows leave memory
    sink.on_experiment_end([])
    rows = {r["trial_id"]: r for r in read_partition(tmp_path / "results", "trials", "demo")}
    assert len(writes) == 3 and rows["t1"]["outcome"] == "ok" and rows["t2"]["outcome"] == "running"
    assert sorted(p.name for p in (tmp_path / "results" / "trials" / "sweep=demo").iterdir()) == ["trials.parquet"]

    clock[0] += 1  # a slow write (2 s) stretches the interval to 50 x 2 = 100 s
    monkeypatch.setattr(sink_module, "write_trials_file", lambda *args: (writes.append(clock[0]), real_write(*args),
                                                                        clock.__setitem__(0, clock[0] + 2)))
    sink.on_trial_result(0, [], second, _eval(10, 0.9))
    sink.on_experiment_end([])
    clock[0] += 60
    sink.on_trial_result(0, [], second, _eval(12, 0.9))
    assert len(writes) == 4  # 60 s later: not yet
    clock[0] += 40
    sink.on_step_end(0, [])
    assert len(writes) == 5


@pytest.mark.parametrize("end", ["complete", "error"])
def test_a_trial_ended_between_row_writes_keeps_its_last_reports_metrics(tmp_path, end):
    """Stopped by ASHA (or lost) right after reports the row had not caught up with: its final metrics are the
    last report's, not those of the last row written."""
    sink, trial = _sink(tmp_path), _trial()
    sink.on_trial_start(0, [], trial)
    for step in (2, 4, 6):
        sink.on_trial_result(0, [], trial, _eval(step, step / 10))
    getattr(sink, f"on_trial_{end}")(0, [], trial)
    row = read_partition(tmp_path / "results", "trials", "demo")[0]
    assert row["outcome"] == ("stopped" if end == "complete" else "error")
    assert row["final_val_exact_match"] == 0.6 and row["steps_completed"] == 6 and row["n_reports"] == 3


def test_rows_in_the_one_file_per_trial_layout_move_into_the_trials_file(tmp_path):
    """A sweep written before the one trials file per sweep: resumed, its rows move into `trials.parquet`, each
    once, and only the per-trial files whose rows moved are removed."""
    from orchestrator.results.schema import rows_to_table

    old = _sink(tmp_path)
    _run_one(old, _trial("done"))
    folder = tmp_path / "results" / "trials" / "sweep=demo"
    (row,) = read_partition(tmp_path / "results", "trials", "demo")
    (folder / "trials.parquet").unlink()
    write_atomic(rows_to_table([row], schema_for("trials")), folder / "done.parquet")
    (folder / "notes.txt").write_text("the user's")
    resumed = pickle.loads(pickle.dumps(old))
    resumed.setup()
    _run_one(resumed, _trial("new", lr=3e-4))
    rows = read_partition(tmp_path / "results", "trials", "demo")
    assert sorted(r["trial_id"] for r in rows) == ["done", "new"]
    assert next(r for r in rows if r["trial_id"] == "done") == row
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "trials.parquet"]


def test_an_ended_trial_that_runs_again_takes_its_row_back(tmp_path):
    """`resume --restart-errored`: the errored trial runs again; one row, its attempts counted, first start kept."""
    sink = _sink(tmp_path)
    trial = _trial()
    sink.on_trial_start(0, [], trial)
    sink.on_trial_result(0, [], trial, _eval(2, 0.25))
    sink.on_trial_error(0, [], trial)
    first = read_partition(tmp_path / "results", "trials", "demo")[0]
    assert first["outcome"] == "error" and "t1" not in sink._trials
    sink.on_trial_start(0, [], trial)
    sink.on_trial_result(0, [], trial, _eval(4, 0.5))
    sink.on_trial_result(0, [], trial, _final(4, 0.5))
    sink.on_trial_complete(0, [], trial)
    (row,) = read_partition(tmp_path / "results", "trials", "demo")
    assert row["outcome"] == "ok" and row["attempts"] == 2 and row["start_time"] == first["start_time"]
    assert row["n_reports"] == 2 and row["best_val_exact_match"] == 0.5  # the steps of both runs


def test_a_trial_tune_restarts_under_a_new_id_keeps_one_row(tmp_path):
    """What Tune really does on `resume --restart-errored`: the errored trial comes back as a new trial (a new id,
    the same config) and the old id leaves its list. One row and one steps file per trial, under the new id;
    an errored trial of other settings, and one Tune still lists, keep their own rows."""
    sink = _sink(tmp_path)
    errored, other, listed = _trial("t1"), _trial("t2", lr=3e-4), _trial("t3")
    for trial in (errored, other, listed):
        sink.on_trial_start(0, [errored, other, listed], trial)
        sink.on_trial_result(0, [], trial, _eval(2, 0.25))
        sink.on_trial_error(0, [], trial)
    first = {r["trial_id"]: r for r in read_partition(tmp_path / "results", "trials", "demo")}
    sink = _sink(tmp_path)  # the resumed driver's sink
    restarted = _trial("t9")
    sink.on_trial_start(0, [restarted, other, listed], restarted)
    sink.on_trial_result(0, [], restarted, _eval(4, 0.5))
    sink.on_trial_result(0, [], restarted, _final(4, 0.5))
    sink.on_trial_complete(0, [], restarted)
    rows = {r["trial_id"]: r for r in read_partition(tmp_path / "results", "trials", "demo")}
    assert sorted(rows) == ["t2", "t3", "t9"]
    assert rows["t9"]["outcome"] == "ok" and rows["t9"]["attempts"] == 2
    assert rows["t9"]["start_time"] == first["t1"]["start_time"] and rows["t9"]["n_reports"] == 2
    steps = read_partition(tmp_path / "results", "steps", "demo")
    assert sorted((r["trial_id"], r["step"]) for r in steps) == [("t2", 2), ("t3", 2), ("t9", 2), ("t9", 4)]
    assert {r["trial_id"] for r in read_partition(tmp_path / "results", "predictions", "demo")} == {"t9"}


def _tune_record(experiment: Path, trial: TrialView, reports: list[dict]) -> None:
    """What Tune keeps of a trial in its folder: every report (result.json) and its suggestion (params.json)."""
    import json

    folder = experiment / f"trial_{trial.trial_id}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != PREDICTIONS_KEY} | {"timestamp": 1.7e9 + i,
                                                                          "time_total_s": 1.0}) + "\n"
        for i, r in enumerate(reports)))
    (folder / "params.json").write_text(json.dumps(trial.config))


def _frozen_clock(monkeypatch) -> list[float]:
    import orchestrator.results.store as sink_module

    clock = [100.0]
    monkeypatch.setattr(sink_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sink_module, "ROW_INTERVAL_S", 1.0)
    monkeypatch.setattr(sink_module, "WRITE_SHARE", 50)
    return clock


def test_the_resumes_repair_writes_every_row_it_puts_back(tmp_path, monkeypatch):
    """A driver killed -9 after two trials finished in Tune but before the sink wrote their ends: the resume's
    repair replays both within the interval, and both rows reach disk (its sink is thrown away afterwards)."""
    from orchestrator.sweep.repair import repair_missing_rows

    _frozen_clock(monkeypatch)
    sink = _sink(tmp_path)
    tuners_copy = pickle.dumps(sink)  # what tuner.pkl keeps
    trials = [_trial("a"), _trial("b", lr=2e-4)]
    for trial in trials:
        sink.on_trial_start(0, [], trial)
    sink.on_experiment_end([])
    for trial in trials:
        _tune_record(tmp_path / "exp", trial, [_eval(2, 0.25), _eval(4, 0.5), _final(4, 0.5, predictions=False)])
    assert repair_missing_rows(_sink(tmp_path), str(tmp_path / "exp")) == ["a", "b"]
    restored = pickle.loads(tuners_copy)  # Tune fires no hook for trials it restores as ended
    restored.setup()
    restored.on_experiment_end([])
    rows = {r["trial_id"]: (r["status"], r["outcome"]) for r in read_partition(tmp_path / "results", "trials", "demo")}
    assert rows == {"a": ("terminated", "ok"), "b": ("terminated", "ok")}


def test_the_resumes_repair_puts_back_missing_step_rows_finished_or_not(tmp_path):
    """A finished trial whose trials row and predictions landed but whose step-2 row did not (a full disk) is
    replayed: the repair looks at every table, not only the trials row. A trial Tune has not finished (no final
    report in its record) is not recorded as ended: Tune runs it again from its checkpoint and the sink writes its
    later rows then. But the rows of its evaluations before that checkpoint are never reported again: its step-4
    row, which the disk refused before the sweep was interrupted, is put back from Tune's record (it was lost)."""
    from orchestrator.results.schema import rows_to_table
    from orchestrator.sweep.repair import repair_interrupted_steps, repair_missing_rows

    sink, done, unfinished = _sink(tmp_path), _trial("done"), _trial("half", lr=2e-4)
    _run_one(sink, done)
    _tune_record(tmp_path / "exp", done, [_eval(2, 0.25), _eval(4, 0.5), _final(4, 0.5)])
    sink.on_trial_start(0, [], unfinished)
    sink.on_trial_result(0, [], unfinished, _eval(2, 0.25))
    _tune_record(tmp_path / "exp", unfinished, [_eval(2, 0.25), _eval(4, 0.375)])  # step 4's row never landed
    steps_file = tmp_path / "results" / "steps" / "sweep=demo" / "done.parquet"
    kept = [r for r in read_partition(tmp_path / "results", "steps", "demo") if r["trial_id"] == "done"][1:]
    write_atomic(rows_to_table(kept, schema_for("steps")), steps_file)  # the step-2 row never landed

    assert repair_missing_rows(_sink(tmp_path), str(tmp_path / "exp")) == ["done"]
    assert repair_interrupted_steps(_sink(tmp_path), str(tmp_path / "exp")) == {"half": 1}
    steps = {(r["trial_id"], r["step"]): r for r in read_partition(tmp_path / "results", "steps", "demo")}
    assert sorted(steps) == [("done", 2), ("done", 4), ("half", 2), ("half", 4)]
    assert steps[("half", 4)]["val_exact_match"] == 0.375
    rows = {r["trial_id"]: (r["status"], r["outcome"]) for r in read_partition(tmp_path / "results", "trials", "demo")}
    assert rows == {"done": ("terminated", "ok"), "half": ("running", "running")}
    assert repair_missing_rows(_sink(tmp_path), str(tmp_path / "exp")) == []  # nothing missing any more
    assert repair_interrupted_steps(_sink(tmp_path), str(tmp_path / "exp")) == {}


def test_rows_the_repair_rebuilds_carry_the_trials_starts(tmp_path):
    """A trial whose rows never reached the disk (it filled up before its first write) was rebuilt with
    `attempts = 0`. Tune's record shows every start that reported (`iterations_since_restore` back at 1): here
    a first run cut after step 2, then a retry from that checkpoint to the end; and a trial that ran once."""
    from orchestrator.sweep.repair import repair_missing_rows

    retried, once = _trial("retried"), _trial("once", lr=2e-4)
    _tune_record(tmp_path / "exp", retried, [
        _eval(2, 0.25, iterations_since_restore=1),
        _eval(4, 0.5, iterations_since_restore=1, restored_from_step=2),
        _final(4, 0.5, predictions=False, iterations_since_restore=2, restored_from_step=2)])
    _tune_record(tmp_path / "exp", once, [_eval(2, 0.25, iterations_since_restore=1),
                                         _final(2, 0.25, predictions=False, iterations_since_restore=2)])
    assert repair_missing_rows(_sink(tmp_path), str(tmp_path / "exp")) == ["once", "retried"]
    rows = {r["trial_id"]: r for r in read_partition(tmp_path / "results", "trials", "demo")}
    assert (rows["retried"]["attempts"], rows["retried"]["restored_from_step"]) == (2, 2)
    assert rows["once"]["attempts"] == 1


@pytest.mark.parametrize("end", ["complete", "error"])
def test_an_end_without_a_final_report_is_written_at_once(tmp_path, monkeypatch, end):
    """Stopped by the scheduler or errored: Tune's record has no final report, so the repair cannot see that the
    trial ended; a driver killed -9 right after must already have written it."""
    clock = _frozen_clock(monkeypatch)
    sink, trial = _sink(tmp_path), _trial()
    sink.on_trial_start(0, [], trial)
    clock[0] += 0.5
    sink.on_trial_result(0, [], trial, _eval(2, 0.25))
    getattr(sink, f"on_trial_{end}")(0, [], trial)  # half a second after the last write; then kill -9
    (row,) = read_partition(tmp_path / "results", "trials", "demo")
    assert row["status"] == ("terminated" if end == "complete" else "error")
    assert row["outcome"] == ("stopped" if end == "complete" else "error") and row["n_reports"] == 1


def test_updating_a_row_keeps_one_row_per_trial_when_a_migration_was_cut(tmp_path):
    """Killed while moving rows out of the per-trial layout, a trial's row is in both files; the held-out test's
    update leaves one."""
    from orchestrator.results.schema import rows_to_table
    from orchestrator.results.store import update_trial_row

    sink = _sink(tmp_path)
    _run_one(sink, _trial("t1"))
    folder = tmp_path / "results" / "trials" / "sweep=demo"
    (row,) = read_partition(tmp_path / "results", "trials", "demo")
    write_atomic(rows_to_table([row], schema_for("trials")), folder / "t1.parquet")
    update_trial_row(tmp_path / "results", "demo", "t1", {"test_exact_match": 0.75})
    (updated,) = read_partition(tmp_path / "results", "trials", "demo")
    assert updated["test_exact_match"] == 0.75 and sorted(p.name for p in folder.iterdir()) == ["trials.parquet"]
    # and so does a resumed sink that finds the same cut migration
    write_atomic(rows_to_table([updated], schema_for("trials")), folder / "t1.parquet")
    resumed = _sink(tmp_path)
    resumed.setup()
    resumed.on_experiment_end([])
    assert [r["trial_id"] for r in read_partition(tmp_path / "results", "trials", "demo")] == ["t1"]
    assert sorted(p.name for p in folder.iterdir()) == ["trials.parquet"]


def test_where_a_trial_runs_is_written_as_soon_as_it_reports(tmp_path, monkeypatch):
    """A new placement goes to disk at once, whatever the interval: a user (or a test killing that node) reads
    where each trial runs from the table."""
    _frozen_clock(monkeypatch)
    sink, trial = _sink(tmp_path), _trial()
    sink.on_trial_start(0, [], trial)
    sink.on_trial_result(0, [], trial, _eval(2, 0.25))
    (row,) = read_partition(tmp_path / "results", "trials", "demo")
    assert row["node_id"] == "node-a" and row["n_reports"] == 1


def test_a_process_that_read_the_tables_exits_cleanly(tmp_path):
    """Arrow's reader threads, reading through an open Python file, could outlive the command and abort the
    interpreter at exit ("terminate called without an active exception", rc -6) in about one run in six: CI
    once saw `mdsweep export` print its one-line error and then die so. Each reader here is its own process,
    because the abort happens only at interpreter exit."""
    sink = _sink(tmp_path)
    sink.setup()
    for tid in ("t1", "t2", "t3"):
        _run_one(sink, _trial(tid))
    program = ("import sys\nfrom orchestrator.results.store import read_partition\n"
               "for table in ('trials', 'steps', 'predictions', 'sweeps'):\n"
               f"    read_partition({str(tmp_path / 'results')!r}, table, 'demo')\n"
               "sys.exit(2)\n")
    ends = []
    for _ in range(12):  # two at a time: one per core
        readers = [subprocess.Popen([sys.executable, "-c", program], stderr=subprocess.PIPE, text=True,
                                    cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
        ends += [(p.wait(timeout=60), p.stderr.read()) for p in readers]
    assert [rc for rc, _ in ends] == [2] * len(ends), [err for rc, err in ends if rc != 2][:1]
