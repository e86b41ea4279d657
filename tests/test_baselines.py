"""`--enqueue`: known-good settings run first as Optuna enqueued trials, and the sweep is judged against them."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from harness import mdsweep, mdsweep_here
from orchestrator.sweep.baselines import FINETUNE_TEXT_2025, NOTEBOOK_2024, BaselineError, plan_baselines
from orchestrator.results.spaces import validate_space



def _plan(spec, revision=None, space="smoke:paired", fixed=None, crossed=("attention",), num_samples=8):
    fixed = {"train_data": "x", **(fixed or {})}
    info = validate_space(space, fixed)
    return plan_baselines(spec, revision, distributions=info.distributions, searched=info.searched, fixed=fixed,
                          crossed=list(crossed), num_samples=num_samples)


def test_the_official_recipe_follows_the_revision_and_is_fitted_to_the_sweep():
    (notebook,) = _plan("official", fixed={"batch_size": 2})
    assert notebook.label == "official (notebook, 2024-05-08)"
    # searched by the space under the same names: enqueued for Optuna
    assert notebook.params == {"lr": NOTEBOOK_2024["lr"], "grad_accum": 2}
    # fixed by the sweep (its budget): the sweep's value, said; not searched, fixed or crossed: the baseline's own
    assert notebook.extra == {"optimizer": "adamw8bit", "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-6,
                              "train_scope": "text"}
    assert notebook.notes == ["batch_size=8: kept at the sweep's 2 (a fixed setting)"]

    (script,) = _plan("official", revision="2025-04-14", fixed={"batch_size": 2})
    assert script.label == "official (finetune_text.py, 2025)"
    assert script.params == {"lr": FINETUNE_TEXT_2025["lr"], "grad_accum": 2}  # 128 is not offered: nearest is 2
    assert "grad_accum=128: the space offers 1, 2; using 2" in script.notes


def test_values_outside_the_space_are_fitted_and_crossed_values_stay_the_sweeps(tmp_path):
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps([{"name": "hot", "lr": 5.0, "attention": "causal"}, {"lr": 1e-9}]))
    hot, cold = _plan(str(path))
    assert (hot.label, hot.params["lr"]) == ("hot", 1e-3)
    assert hot.notes == ["lr=5.0: outside the space's range [1e-06, 0.001]; using 0.001",
                         "attention=causal: not applied (--cross runs every value of attention)"]
    assert (cold.label, cold.params["lr"]) == ("recipes.json[1]", 1e-6)


@pytest.mark.parametrize("content, match", [
    (None, r"--enqueue .*nowhere.json: no such file"),
    ("{not json", r"--enqueue .*: not readable JSON"),
    ("[1, 2]", r"expected a list of objects of settings"),
    ('[{"name": "x", "lr": "fast"}]', r"--enqueue x: .*lr"),
    ('[{"name": "y", "learning_rate": 1e-4}]', r"--enqueue y: 'learning_rate' is not a JobConfig field"),
    ('[{"name": "z", "adam_beta2": 1.5}]', r"--enqueue z: adam_beta2 must be in \[0, 1\)"),
])
def test_a_bad_enqueue_file_is_one_line_naming_the_file_and_entry(tmp_path, content, match):
    path = tmp_path / "nowhere.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BaselineError, match=match):
        _plan(str(path))


def test_every_announced_baseline_runs_and_each_has_its_own_name(tmp_path):
    """Baselines are the sweep's first proposals: more of them than --num-samples were announced and never ran,
    and two of one name could not be told apart in the table or by --vs-baseline."""
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps([{"name": "a", "lr": 1e-4}, {"name": "b", "lr": 1e-5}, {"lr": 1e-6}]))
    assert len(_plan(str(path), num_samples=3)) == 3
    with pytest.raises(BaselineError, match=r"^--enqueue .*recipes.json: 3 baselines but --num-samples 2; each "
                                            r"baseline is one of the proposals: give --num-samples 3 or more$"):
        _plan(str(path), num_samples=2)
    path.write_text(json.dumps([{"name": "a", "lr": 1e-4}, {"name": "a", "lr": 1e-5}]))
    with pytest.raises(BaselineError, match=r"^--enqueue .*recipes.json: entries 0 and 1 are both named 'a'; "
                                            r"give each its own \"name\"$"):
        _plan(str(path))


@pytest.fixture(scope="module")
def baseline_sweep(tmp_path_factory, captcha_parquet):
    tmp = tmp_path_factory.mktemp("baseline")
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps([{"name": "recipe", "lr": 8e-4, "grad_accum": 2, "adam_beta2": 0.95}]))
    proc = mdsweep("run", "--name", "vs", "--space", "smoke:paired", "--cross", "attention", "--enqueue",
                    str(recipe), "--num-samples", "2", "--model", "tiny-reader", "--train-data", str(captcha_parquet),
                    "--max-steps", "3", "--batch-size", "4", "--max-val-samples", "16", "--set", "max_new_tokens=5",
                    "--num-cpus", "2", "--max-concurrent", "2", "--storage", str(tmp / "sweeps"),
                    "--results", str(tmp / "results"), "--progress-interval", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


@pytest.mark.slow
def test_the_baseline_is_the_first_proposal_of_a_crossed_sweep(baseline_sweep):
    tmp, proc = baseline_sweep
    assert "runs first, baseline recipe: lr=0.0008, grad_accum=2, adam_beta2=0.95" in proc.stderr
    rows = sorted(pq.read_table(tmp / "results" / "trials").to_pylist(), key=lambda r: (r["group_id"], r["member"]))
    first, rest = rows[:2], rows[2:]
    assert [r["group_id"] for r in first] == [0, 0] and {r["attention"] for r in first} == {"causal", "prefix"}
    for row in first:
        assert (row["baseline"], row["lr"], row["grad_accum"], row["adam_beta2"]) == ("recipe", 8e-4, 2, 0.95)
        assert json.loads(row["params_json"])["lr"] == 8e-4 and "adam_beta2" not in row["searched"]
    assert rest and all(r["baseline"] is None and r["adam_beta2"] == 0.999 for r in rest)
    assert all(r["outcome"] == "ok" for r in rows)


@pytest.mark.slow
def test_summary_report_and_query_say_the_same_vs_baseline(baseline_sweep, capsys):
    tmp, proc = baseline_sweep
    lines = [line for line in proc.stdout.splitlines() if line.startswith("vs baseline recipe")]
    assert len(lines) == 1, proc.stdout
    query = mdsweep_here(capsys, "query", str(tmp / "results"), "--sweep", "vs", "--vs-baseline")
    assert query.returncode == 0, query.stderr
    assert query.stdout.strip() == lines[0]
    as_json = json.loads(mdsweep_here(capsys, "query", str(tmp / "results"), "--sweep", "vs", "--vs-baseline",
                                      "--format", "json").stdout)[0]
    assert as_json["baseline"] == "recipe" and as_json["n"] == 10  # the validation split of 96 captchas
    assert as_json["em_best"] - as_json["em_baseline"] == pytest.approx(as_json["diff"])
    assert as_json["ci_low"] <= as_json["diff"] <= as_json["ci_high"]
    html = (tmp / "results" / "report-vs.html").read_text()
    assert lines[0].removeprefix("vs baseline ") in html.replace("&#x27;", "'")
