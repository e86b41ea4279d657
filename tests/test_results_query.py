"""`mdsweep query`: safe filters, grouping, paired comparisons, formats (no Ray)."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from orchestrator.results import intervals, where
from orchestrator.results import query as Q
from orchestrator.cli.main import main
from orchestrator.results.schema import rows_to_table, schema_for
from orchestrator.results.store import partition_dir, write_atomic


def _table():
    return pa.table({
        "attention": ["prefix", "causal", "prefix", "causal", None],
        "lr": [1e-5, 1e-5, 5e-4, 5e-4, 1e-4],
        "grad_accum": [1, 1, 8, 8, 2],
        "outcome": ["ok", "ok", "oom", "ok", "diverged"],
        "error": [None, None, "out of memory", None, "nan"],
        "gradient_checkpointing": [True, True, False, True, True],
        "peak_memory_bytes": [2**30, 2**31, 3 * 2**30, 2**29, 2**30],
    })


@pytest.mark.parametrize("expr,expected", [
    ("attention == 'prefix' and lr < 1e-4", [0]),
    ("attention == 'prefix' or lr > 1e-4", [0, 2, 3]),
    ("not attention == 'prefix'", [1, 3]),
    ("outcome in ['ok', 'diverged']", [0, 1, 3, 4]),
    ("outcome not in ('ok',)", [2, 4]),
    ("error is None", [0, 1, 3]),
    ("error is not None and grad_accum >= 2", [2, 4]),
    ("attention == None", [4]),
    ("1e-5 < lr <= 5e-4", [2, 3, 4]),
    ("peak_memory_bytes / 2**30 > 1.5", [1, 2]),
    ("lr * grad_accum > 1e-3", [2, 3]),
    ("gradient_checkpointing", [0, 1, 3, 4]),
    ("not gradient_checkpointing", [2]),
    ("grad_accum == -1 or grad_accum == 2", [4]),
])
def test_where_expressions(expr, expected):
    t = _table().append_column("i", pa.array(range(5)))
    assert where.apply_where(t, expr)["i"].to_pylist() == expected


@pytest.mark.parametrize("expr,match", [
    ("__import__('os').system('true')", "unsupported expression"),
    ("attention.upper() == 'X'", "unsupported expression"),
    ("learning_rate < 1", "unknown column 'learning_rate'"),
    ("lr <", "cannot parse"),
    ("outcome in 'ok'", "needs a list"),
    ("lr is 3", "only compares with None"),
    ("[x for x in lr]", "unsupported expression"),
    ("lambda: 1", "unsupported expression"),
])
def test_where_rejects_anything_but_the_small_language(expr, match):
    with pytest.raises(Q.QueryError, match=f"--where.*{match}"):
        where.apply_where(_table(), expr)


def test_t_quantiles_match_tables():
    for df, t in [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042),
                  (100, 1.984)]:
        assert intervals.t_quantile(0.975, df) == pytest.approx(t, abs=0.01 if df > 2 else 1e-3)


def test_mean_interval():
    mean, sd, low, high = intervals.mean_interval([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and sd == pytest.approx(0.2)
    assert (low, high) == pytest.approx((0.4 - 4.303 * 0.2 / math.sqrt(3), 0.4 + 4.303 * 0.2 / math.sqrt(3)),
                                        abs=1e-3)
    assert math.isnan(intervals.mean_interval([0.5])[2])


def test_exact_mcnemar():
    assert intervals.mcnemar_exact(0, 0) == 1.0
    assert intervals.mcnemar_exact(3, 3) == 1.0
    assert intervals.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert intervals.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert intervals.mcnemar_exact(9, 1) == intervals.mcnemar_exact(1, 9)
    assert intervals.mcnemar_exact(200, 300) < 1e-5  # big counts stay exact (no float overflow)


def test_paired_interval_contains_the_difference_and_shrinks_with_n():
    low, high = intervals.paired_difference_ci(10, 8, 2, 10)
    assert low < 6 / 30 < high
    low2, high2 = intervals.paired_difference_ci(100, 80, 20, 100)
    assert high2 - low2 < high - low
    assert -1 <= intervals.paired_difference_ci(0, 0, 5, 0)[0] and intervals.paired_difference_ci(0, 5, 0, 0)[1] <= 1


def test_group_summary():
    t = pa.table({"attention": ["a", "a", "a", "b"], "objective": [0.2, 0.4, None, 0.9],
                  "outcome": ["ok", "ok", "oom", "ok"]})
    rows = {r["attention"]: r for r in Q.group_summary(t, ["attention"], "objective").to_pylist()}
    assert rows["a"]["count"] == 3 and rows["a"]["ok"] == 2 and rows["a"]["n_values"] == 2
    assert rows["a"]["mean"] == pytest.approx(0.3) and rows["a"]["best"] == 0.4
    assert rows["a"]["ci_low"] < 0.3 < rows["a"]["ci_high"]
    assert rows["b"]["ci_low"] is None and rows["b"]["best"] == 0.9
    assert Q.value_mode("final_val_cer") == "min" and Q.value_mode("best_val_exact_match") == "max"
    assert Q.value_mode("objective", "min") == "min"


# ---------------------------------------------------------------- a small dataset on disk


def _trial_row(tid, attention, lr, seed=0, outcome="ok", objective=0.5, sweep_searched=("attention", "lr")):
    return {"trial_id": tid, "attention": attention, "lr": lr, "seed": seed, "outcome": outcome,
            "objective": objective, "searched": list(sweep_searched), "train_data": "/d.parquet", "model": "tiny",
            "objective_metric": "val_exact_match", "objective_mode": "max", "final_val_exact_match": objective}


def _pred_rows(tid, correct):
    return [{"trial_id": tid, "sample_id": f"s{i}", "target": "1", "prediction": "1" if c else "2", "correct": c,
             "cer": 0.0 if c else 1.0, "step": 4} for i, c in enumerate(correct)]


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    trials = [
        _trial_row("p1", "prefix", 1e-4), _trial_row("c1", "causal", 1e-4, objective=0.25),
        _trial_row("p2", "prefix", 3e-4, objective=0.75), _trial_row("c2", "causal", 3e-4, objective=0.5),
        _trial_row("p3", "prefix", 9e-4, objective=None, outcome="oom"),  # no partner: oom
        _trial_row("c4", "causal", 5e-5, objective=0.1),  # no partner: no prefix run at this lr
    ]
    for r in trials:
        write_atomic(rows_to_table([r], schema_for("trials")), partition_dir(root, "trials", "s1") / f"{r['trial_id']}.parquet")
    correct = {
        "p1": [True] * 10 + [False] * 10 + [True] * 0,
        "c1": [True] * 5 + [False] * 15,
        "p2": [True] * 15 + [False] * 5,
        "c2": [True] * 10 + [False] * 10,
        "c4": [False] * 20,
    }
    for tid, c in correct.items():
        write_atomic(rows_to_table(_pred_rows(tid, c), schema_for("predictions")),
                     partition_dir(root, "predictions", "s1") / f"{tid}.parquet")
    return root


def test_paired_comparison_pairs_trials_that_differ_only_in_the_factor(results):
    trials = Q.load_table(results, "trials")
    preds = Q.load_table(results, "predictions")
    out = Q.paired_comparison(trials, preds, Q.parse_paired("attention")).to_pylist()
    assert len(out) == 2
    by_lr = {r["lr"]: r for r in out}
    r = by_lr[1e-4]
    assert (r["a"], r["b"]) == ("causal", "prefix") and (r["trial_a"], r["trial_b"]) == ("c1", "p1")
    assert (r["n"], r["both_correct"], r["a_only"], r["b_only"], r["both_wrong"]) == (20, 5, 0, 5, 10)
    assert r["em_a"] == 0.25 and r["em_b"] == 0.5 and r["diff"] == -0.25
    assert r["mcnemar_p"] == pytest.approx(2 / 32)
    assert r["ci_low"] < -0.25 < r["ci_high"] < 0


def test_the_best_trial_is_paired_with_the_baseline_run_of_its_own_member():
    """A crossed sweep (attention): the baseline ran as member 0 (causal) and member 1 (prefix). The best trial is
    a proposal's prefix run, so it is compared with the baseline's prefix run, on their shared samples, even
    though the baseline's causal run scored higher."""
    trials = [_trial_row("base-c", "causal", 1e-5, objective=0.6) | {"baseline": "recipe", "member": 0},
              _trial_row("base-p", "prefix", 1e-5, objective=0.4) | {"baseline": "recipe", "member": 1},
              _trial_row("prop-c", "causal", 3e-4, objective=0.5) | {"member": 0},
              _trial_row("prop-p", "prefix", 3e-4, objective=0.8) | {"member": 1}]
    predictions = (_pred_rows("base-c", [True] * 6 + [False] * 4) + _pred_rows("base-p", [True] * 4 + [False] * 6)
                   + _pred_rows("prop-p", [True] * 8 + [False] * 2))
    record = Q.versus_baseline(trials, predictions)
    assert (record["best_trial"], record["baseline_trial"], record["baseline"]) == ("prop-p", "base-p", "recipe")
    assert (record["em_best"], record["em_baseline"], record["n"]) == (0.8, 0.4, 10)
    assert Q.describe_versus_baseline(record).startswith("vs baseline recipe (trial base-p): exact match +0.400 ")


def test_paired_levels_can_be_ordered(results):
    out = Q.paired_comparison(Q.load_table(results), Q.load_table(results, "predictions"),
                              Q.parse_paired("attention=prefix,causal")).to_pylist()
    assert {(r["a"], r["b"]) for r in out} == {("prefix", "causal")} and all(r["diff"] > 0 for r in out)
    with pytest.raises(Q.QueryError, match="--paired"):
        Q.parse_paired("attention=prefix")
    with pytest.raises(Q.QueryError, match="--paired"):
        Q.parse_paired("flavour")


def test_query_cli_formats(results, capsys):
    assert main(["query", str(results), "--where", "outcome == 'ok'", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["trial_id"] for r in rows] == ["p2", "c2", "p1", "c1", "c4"]  # objective, best first; ties by id
    assert main(["query", str(results), "--columns", "trial_id,lr", "--sort", "lr:desc,trial_id", "--top", "2",
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["trial_id,lr", "p3,0.0009", "c2,0.0003"]
    assert main(["query", str(results), "--group-by", "attention"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:4] == ["attention", "count", "ok", "n_values"]
    assert main(["query", str(results), "--paired", "attention"]) == 0
    assert "mcnemar_p" in capsys.readouterr().out
    assert main(["query", str(results), "--table", "predictions", "--where", "trial_id == 'c1' and correct",
                 "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6


def test_query_cli_errors_name_the_flag(results, tmp_path, capsys):
    assert main(["query", str(results), "--where", "nope > 1"]) == 2
    assert "--where" in capsys.readouterr().err
    assert main(["query", str(results), "--sort", "nope"]) == 2
    assert "--sort" in capsys.readouterr().err
    assert main(["query", str(results), "--columns", "nope"]) == 2
    assert "--columns" in capsys.readouterr().err
    assert main(["query", str(tmp_path / "missing")]) == 2
    assert "RESULTS" in capsys.readouterr().err
    assert main(["query", str(results), "--paired", "attention", "--where", "lr > 1"]) == 1
    assert "--cross attention" in capsys.readouterr().err


def test_query_reads_files_of_different_schema_versions(results):
    # a file written before a column existed still reads, with nulls there
    old = pa.table({"schema_version": pa.array([0], pa.int32()), "trial_id": ["old"], "lr": [1e-3]})
    write_atomic(old, partition_dir(results, "trials", "s0") / "old.parquet")
    t = Q.load_table(results, "trials")
    assert t.num_rows == 7
    row = t.filter(where.compile_where("trial_id == 'old'", t.column_names)).to_pylist()[0]
    assert row["sweep"] == "s0" and row["lr"] == 1e-3 and row["attention"] is None


@pytest.mark.parametrize("text, message", [
    ("lr < 'a' - 1", "arithmetic needs numbers"),
    ("lr < 10.0**400", "too large a number"),
    ("lr < 2**100 * 10.0**300", "not a finite real number"),
    ("lr < (-8)**0.5", "not a finite real number"),
    ("lr < 9**9**9", "too large a number"),  # hung before: an unbounded integer power
    ("lr < 1 / 0", "division by zero"),
])
def test_bad_constant_arithmetic_is_a_message_not_a_traceback_or_a_hang(text, message):
    with pytest.raises(Q.QueryError, match=message):
        where.compile_where(text, ["lr", "attention"])


def test_large_integer_powers_compare_as_floats():
    table = pa.table({"lr": [1e-4, 1e40]})
    assert where.apply_where(table, "lr < 2**100").column("lr").to_pylist() == [1e-4]


def test_an_unknown_sweep_is_an_error_naming_the_sweeps(tmp_path, capsys):
    write_atomic(rows_to_table([{"trial_id": "t1", "outcome": "ok"}], schema_for("trials")),
                 partition_dir(tmp_path, "trials", "real") / "t1.parquet")
    assert main(["query", str(tmp_path), "--sweep", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "--sweep nosuch: no such sweep" in err and "sweeps: real" in err
    assert main(["query", str(tmp_path), "--top=-1"]) == 2


def test_a_stray_file_in_a_partition_does_not_break_queries(tmp_path, capsys):
    folder = partition_dir(tmp_path, "trials", "real")
    write_atomic(rows_to_table([{"trial_id": "t1", "outcome": "ok"}], schema_for("trials")), folder / "t1.parquet")
    (folder / "notes.txt").write_text("not parquet")
    (folder / ".t2.parquet.tmp.parquet").write_bytes(b"half a file")
    assert main(["query", str(tmp_path), "--format", "csv"]) == 0
    assert "t1" in capsys.readouterr().out
