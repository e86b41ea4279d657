"""`mdsweep report` and `mdsweep study` on a real sweep: each section's data against the Parquet tables, the
page in a real headless Chromium, the study through Optuna's own loader, and bad input."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from harness import mdsweep, mdsweep_here
from orchestrator.results.query import PairedSpec, load_table, paired_comparison
from orchestrator.results.ranking import best_trial


# two proposals that train, and a third whose runs both run out of memory
SPACE = """
def space(trial):
    return {"lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
            "grad_accum": trial.suggest_categorical("grad_accum", [1, 2]),
            "fault": "oom@1" if trial.number == 2 else None}
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory, captcha_parquet):
    """Results of a sweep `report` has something to show for: every proposal under both attention layouts
    (paired), evaluations along the way, an out-of-memory proposal; and of one where every trial failed."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "space.py").write_text(textwrap.dedent(SPACE))
    common = ["--train-data", str(captcha_parquet), "--model", "tiny-reader", "--max-steps", "4", "--eval-every",
              "2", "--batch-size", "4", "--max-val-samples", "16", "--set", "max_new_tokens=5",
              "--storage", str(tmp / "sweeps"), "--results", str(tmp / "results"), "--num-cpus", "2", "--quiet"]
    proc = mdsweep("run", "--name", "rep", "--space", f"{tmp / 'space.py'}:space", "--cross", "attention",
                   "--num-samples", "3", "--search-seed", "1", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # warm-started from the first: its two finished proposals are told to the search, never run or ranked here
    failed = mdsweep("run", "--name", "allfail", "--space", "smoke:space", "--num-samples", "1",
                     "--set", "fault=oom@1", "--warm-start", f"{tmp / 'results'}:rep", *common[:-1])
    assert failed.returncode == 3, failed.stderr[-3000:]
    source = f"{tmp / 'results'}:rep"
    assert f"warm start: 2 finished trial(s) carried from {source}" in failed.stderr
    assert f"warm start: 1 proposal(s) of {source} skipped: they did not finish with a value" in failed.stderr
    return tmp / "results"


@pytest.mark.slow
def test_each_section_matches_the_tables(swept):
    from orchestrator.results.report_data import MAX_MISREAD, collect

    data = collect(str(swept), "rep")
    trials = load_table(swept, "trials", ["rep"]).to_pylist()
    steps = load_table(swept, "steps", ["rep"]).to_pylist()
    outcomes = sorted(t["outcome"] for t in trials)
    assert outcomes == ["ok"] * 4 + ["oom"] * 2
    assert data.summary["outcomes"] == {"ok": 4, "oom": 2} and data.summary["trials"] == 6
    best = best_trial(trials)
    assert data.summary["best"]["trial_id"] == best["trial_id"]
    low, high = data.summary["best"]["low"], data.summary["best"]["high"]
    assert (low, high) == (best["final_val_exact_match_low"], best["final_val_exact_match_high"])
    assert low <= best["objective"] <= high and 0 <= low < high <= 1  # a Wilson interval, also around 0
    assert data.summary["best"]["n"] == best["final_val_n"] == 10  # a tenth of the 96 captchas
    assert data.leaderboard.rows[0]["trial_id"] == best["trial_id"]
    assert [r["outcome"] for r in data.leaderboard.rows[-2:]] == ["oom", "oom"]  # no objective: last
    assert len(data.curves.rows) == len(steps) and {r["attention"] for r in data.curves.rows} == {"causal", "prefix"}
    assert sorted(r["objective"] for r in data.search.rows if r["objective"] is not None) == \
        sorted(t["objective"] for t in trials if t["objective"] is not None)
    expected_pairs = paired_comparison(load_table(swept, "trials", ["rep"]), load_table(swept, "predictions", ["rep"]),
                                       PairedSpec("attention")).to_pylist()
    assert len(data.paired.rows) == len(expected_pairs) == 2
    assert {(r["trial_a"], r["trial_b"], r["mcnemar_p"]) for r in data.paired.rows} == \
        {(r["trial_a"], r["trial_b"], r["mcnemar_p"]) for r in expected_pairs}
    assert {r["param"] for r in data.importance.rows} == {"lr", "grad_accum"}
    assert sum(r["importance"] for r in data.importance.rows) == pytest.approx(1.0)
    by_id = {t["trial_id"]: t for t in trials}
    assert {r["trial_id"] for r in data.cost.rows} == set(by_id)
    for r in data.cost.rows:  # each cost row is its trial's measurement, its cap and its throughput
        t = by_id[r["trial_id"]]
        assert r["peak_gib"] == t["peak_memory_bytes"] / 2**30 > 0
        assert r["cap"] == t["max_gpu_memory"] and r["on_gpu"] is False and r["outcome"] == t["outcome"]
        assert r["tokens_per_s"] == t["final_tokens_per_s"]
        assert (r["tokens_per_s"] or 0) > 0 if t["outcome"] == "ok" else True
        assert r["predicted_gib"] == (t["predicted_peak_bytes"] / 2**30 if t["predicted_peak_bytes"] else None)
    # efficiency: the trials that timed a training step, ranked by achieved TFLOP/s (no MFU on CPU)
    timed = {tid for tid, t in by_id.items() if t["final_achieved_tflops"] is not None}
    assert timed == {tid for tid, t in by_id.items() if t["outcome"] == "ok"}
    assert [r["trial_id"] for r in data.efficiency.rows] == sorted(
        timed, key=lambda tid: (-by_id[tid]["final_achieved_tflops"], tid))
    for r in data.efficiency.rows:
        t = by_id[r["trial_id"]]
        assert (r["tflops"], r["objective"], r["mfu"]) == (t["final_achieved_tflops"], t["objective"], None)
        assert r["gflop_per_sample"] == t["final_flops_per_sample"] / 1e9 > 0
        assert (r["device"], r["kernel"]) == ("cpu", t["attention_kernel"]) and r["kernel"]
    assert "ranked by achieved TFLOP/s: MFU is blank" in data.efficiency.note
    # the search section (the slices' points): every trial with its searched values and outcome
    assert {(r["trial_id"], r["lr"], r["grad_accum"], r["outcome"]) for r in data.search.rows} == \
        {(t["trial_id"], t["lr"], t["grad_accum"], t["outcome"]) for t in trials}
    assert data.curves.x_title == "optimizer step"  # a --max-steps budget
    assert sorted((r["trial_id"], r["x"]) for r in data.curves.rows) == sorted((s["trial_id"], s["step"]) for s in steps)
    predictions = [p for p in load_table(swept, "predictions", ["rep"]).to_pylist() if p["trial_id"] == best["trial_id"]]
    last = max(p["step"] for p in predictions)
    wrong = sorted(p["sample_id"] for p in predictions if p["step"] == last and not p["correct"])
    assert [r["sample_id"] for r in data.misread.rows] == wrong[:MAX_MISREAD]
    assert all(r["image"].startswith("data:image/png;base64,") for r in data.misread.rows)


@pytest.mark.slow
def test_predict_on_the_export_gives_the_answers_the_sweep_recorded(swept, captcha_parquet, tmp_path, capsys):
    """`mdsweep predict --model EXPORT` with no settings but the card's (attention, question, template, batch,
    max_new_tokens) answers the trial's validation captchas as the sweep recorded them, per sample_id; the
    base model answers some of them otherwise, so the export is the trained model and not its base."""
    import pyarrow.parquet as pq

    export = tmp_path / "best"
    assert mdsweep_here(capsys, "export", str(swept), "--sweep", "rep", "--best", "--out", str(export)).returncode == 0
    card = json.loads((export / "model_card.json").read_text())
    recorded = load_table(swept, "predictions", ["rep"]).to_pylist()
    last = max(r["step"] for r in recorded if r["trial_id"] == card["trial_id"])
    recorded = {r["sample_id"]: r["prediction"] for r in recorded
                if r["trial_id"] == card["trial_id"] and r["step"] == last}
    answers = {}
    base_settings = ["--attention", card["job_config"]["attention"], "--max-new-tokens",
                     str(card["job_config"]["max_new_tokens"])]  # the base asked as the trial was
    for model, out, settings in ((str(export), tmp_path / "export.parquet", []),
                                 ("tiny-reader", tmp_path / "base.parquet", base_settings)):
        proc = mdsweep_here(capsys, "predict", "--model", model, "--data", str(captcha_parquet), "--show", "0",
                            "--out", str(out), *settings)
        assert proc.returncode == 0, proc.stderr
        answers[model] = {r["sample_id"]: r["prediction"] for r in pq.read_table(out).to_pylist()}
    assert len(recorded) == card["final_metrics"]["val_n"] == 10 and set(recorded) <= set(answers[str(export)])
    assert {i: answers[str(export)][i] for i in recorded} == recorded
    assert any(answers["tiny-reader"][i] != recorded[i] for i in recorded)


def test_curves_are_drawn_in_samples_when_the_budget_is_in_samples():
    """grad_accum 1 and 2 trials that saw the same 40 samples end at the same x, not at steps 10 and 5."""
    from orchestrator.results.report_data import budget_in_samples, curves

    trials = [{"trial_id": "a", "attention": "causal"}, {"trial_id": "b", "attention": "prefix"}]
    steps = [{"trial_id": "a", "step": 5, "samples_seen": 20, "val_exact_match": 0.1, "train_loss": 2.0},
             {"trial_id": "a", "step": 10, "samples_seen": 40, "val_exact_match": 0.2, "train_loss": 1.0},
             {"trial_id": "b", "step": 3, "samples_seen": 20, "val_exact_match": 0.1, "train_loss": 2.1},
             {"trial_id": "b", "step": 5, "samples_seen": 40, "val_exact_match": 0.3, "train_loss": 1.1}]
    samples = {"fixed_json": json.dumps({"max_samples": 40})}
    assert budget_in_samples(samples, steps)
    drawn = curves(trials, steps, "val_exact_match", in_samples=True)
    assert drawn.x_title == "samples seen"
    assert [(r["trial_id"], r["x"]) for r in drawn.rows] == [("a", 20), ("a", 40), ("b", 20), ("b", 40)]
    assert not budget_in_samples({"fixed_json": json.dumps({"max_steps": 10})}, steps)
    assert not budget_in_samples(samples, [{**steps[0], "samples_seen": None}])  # rows from before the column
    assert curves(trials, steps, "val_exact_match", in_samples=False).x_title == "optimizer step"


REQUIRE_BROWSER = "MDSWEEP_REQUIRE_BROWSER"


def _chromium() -> str:
    """The browser to open the report in. Without one the test is skipped with a reason that says how to get one,
    unless MDSWEEP_REQUIRE_BROWSER=1 (.ci/run sets it, having installed Chromium): there a missing browser fails,
    so a failed install cannot pass as a skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        why = ("no Chromium on PATH, so the report was not opened in a browser; install it (Debian and Ubuntu: "
               "`apt-get install chromium`, as .ci/run does)")
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{why}; {REQUIRE_BROWSER}=1 requires it")
        pytest.skip(why)
    return found


@pytest.mark.slow
def test_the_page_renders_every_chart_in_headless_chromium_offline(swept, tmp_path, capsys):
    chromium = _chromium()
    out = tmp_path / "report.html"
    proc = mdsweep_here(capsys, "report", str(swept), "--sweep", "rep", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert "cdn" not in page.lower().split("<script>", 1)[0] and 'src="http' not in page  # nothing fetched
    charts = page.count('class="plotly-graph-div"')
    assert charts == 6  # curves, search, paired, importance, slices, cost
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*browser, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    errors = [line for line in dom.stderr.splitlines() if "Uncaught" in line or "CONSOLE" in line and "rror" in line]
    assert not errors, errors
    assert f'data-plots="{charts}"' in dom.stdout  # every chart was drawn by plotly.js
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, "--window-size=1280,3000", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # charts and images, not a blank page


@pytest.mark.slow
def test_study_opens_in_optuna_with_the_best_proposal_and_is_idempotent(swept, tmp_path, capsys):
    import optuna

    db = f"sqlite:///{tmp_path / 'sweeps.db'}"
    for _ in range(2):  # a re-run replaces the study: same trials, not twice as many
        proc = mdsweep_here(capsys, "study", str(swept), "--sweep", "rep", "--storage", db)
        assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="rep", storage=db)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
    assert set(study.trials[0].distributions) == {"lr", "grad_accum"}
    assert isinstance(study.trials[0].distributions["lr"], optuna.distributions.FloatDistribution)
    assert study.trials[0].distributions["lr"].log
    # the best proposal: the best mean over its two runs (causal and prefix), as the searcher was told
    trials = load_table(swept, "trials", ["rep"]).to_pylist()
    means: dict[int, list[float]] = {}
    for t in trials:
        if t["outcome"] == "ok":
            means.setdefault(t["group_id"], []).append(t["objective"])
    best_group = max(sorted(means), key=lambda g: sum(means[g]) / len(means[g]))
    assert study.best_trial.user_attrs["group_id"] == best_group
    assert study.best_value == pytest.approx(sum(means[best_group]) / 2)
    assert len(study.best_trial.intermediate_values) >= 2  # the dashboard's learning curve


@pytest.mark.slow
@pytest.mark.parametrize("name", ["study.log", "study.jsonl"])
def test_a_study_written_to_a_journal_file_holds_what_the_sqlite_one_holds(swept, tmp_path, capsys, name):
    """A path ending in .log or .jsonl is an Optuna journal file (fast for large sweeps); it holds the same trials,
    values and curves as the SQLite study, and the printed command opens it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    db = f"sqlite:///{tmp_path / 'sweeps.db'}"
    assert mdsweep_here(capsys, "study", str(swept), "--sweep", "rep", "--storage", db).returncode == 0
    for _ in range(2):  # replaced on a re-run, as in SQLite
        proc = mdsweep_here(capsys, "study", str(swept), "--sweep", "rep", "--storage", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
    assert f"open it: optuna-dashboard {tmp_path / name}" in proc.stdout

    def summary(storage):
        study = optuna.load_study(study_name="rep", storage=storage)
        return [(t.state.name, t.values, t.params, t.intermediate_values, t.user_attrs["trial_ids"])
                for t in study.trials]

    journal = JournalStorage(JournalFileBackend(str(tmp_path / name)))
    assert summary(journal) == summary(db) and len(summary(db)) == 3
    assert (tmp_path / name).read_text().startswith("{")  # JSON lines, not a SQLite file under another name


@pytest.mark.slow
def test_the_best_trial_of_a_study_without_repeats_is_the_querys(tmp_path, captcha_parquet, capsys):
    """Without --cross or --replicates, a proposal is one trial: the study's best is `mdsweep query`'s."""
    results = tmp_path / "results"
    proc = mdsweep("run", "--name", "plain", "--space", "smoke:space", "--num-samples", "3", "--search-seed", "2",
                   "--train-data", str(captcha_parquet), "--max-steps", "2", "--eval-every", "2",
                   "--batch-size", "4", "--max-val-samples", "16", "--set", "max_new_tokens=5",
                   "--storage", str(tmp_path / "s"), "--results", str(results), "--num-cpus", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from orchestrator.results.study import build_study

    study = build_study(str(results), "plain").study
    query = json.loads(mdsweep_here(capsys, "query", str(results), "--sweep", "plain", "--where", "outcome == 'ok'",
                                    "--sort", "objective:desc,trial_id", "--top", "1", "--format", "json").stdout)
    # the same best value; on a tie (short runs often score alike) Optuna names the earliest proposal, the query
    # the lowest trial id: either way the query's best is one of the study's best proposals
    assert study.best_value == query[0]["objective"]
    tied = [t.user_attrs["trial_ids"][0] for t in study.trials if t.value == study.best_value]
    assert query[0]["trial_id"] in tied


@pytest.mark.slow
def test_bad_input_is_a_message_not_a_traceback(swept, tmp_path, capsys):
    proc = mdsweep_here(capsys, "report", str(swept), "--sweep", "nosuch")
    assert proc.returncode == 2 and "no such sweep" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = mdsweep_here(capsys, "report", str(tmp_path / "empty"), "--sweep", "rep")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "empty" in proc.stderr
    proc = mdsweep_here(capsys, "study", str(swept), "--sweep", "nosuch", "--storage", str(tmp_path / "x.db"))
    assert proc.returncode == 2 and "no such sweep" in proc.stderr
    out = tmp_path / "failed.html"
    proc = mdsweep_here(capsys, "report", str(swept), "--sweep", "allfail", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert "none: no trial has ended ok yet" in page and "no trial ended ok" in page
    # the carried trials are named in the summary, and none of them is this sweep's best or its export
    assert f"2 trial(s) carried from {swept}:rep (told to the search, never this sweep&#x27;s results)" in page
    proc = mdsweep_here(capsys, "export", str(swept), "--sweep", "allfail", "--best", "--out", str(tmp_path / "best"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "best").exists()


@pytest.mark.slow
@pytest.mark.parametrize("table", ["steps", "predictions"])
def test_a_table_that_cannot_be_read_is_warned_on_the_terminal_and_on_the_page(swept, tmp_path, capsys, table):
    """It used to drop the curves or the misread samples without a word."""
    results = tmp_path / "results"
    shutil.copytree(swept, results)
    sorted((results / table / "sweep=rep").glob("*.parquet"))[0].write_bytes(b"not parquet")
    out = tmp_path / "page.html"
    proc = mdsweep_here(capsys, "report", str(results), "--sweep", "rep", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    warning = f"the {table} table could not be read, so what it holds is missing from this report"
    assert f"mdsweep report: warning: {warning}" in proc.stderr
    assert f'<p class="warning">Warning: {warning}' in out.read_text()


def test_past_fifty_trials_the_curves_are_the_best_fifty_and_the_page_says_so():
    from orchestrator.results.report_data import MAX_CURVES, curves

    trials = [{"trial_id": f"t{i:03d}", "attention": "causal", "outcome": "ok", "objective": i / 100,
               "objective_mode": "max"} for i in range(80)]
    steps = [{"trial_id": t["trial_id"], "step": s, "samples_seen": s, "val_exact_match": t["objective"],
              "train_loss": 1.0} for t in trials for s in (1, 2)]
    drawn = curves(trials, steps, "val_exact_match", in_samples=True)
    assert {r["trial_id"] for r in drawn.rows} == {f"t{i:03d}" for i in range(80 - MAX_CURVES, 80)}
    assert f"the curves of the {MAX_CURVES} best of 80 trials" in drawn.note
    few = [s for s in steps if s["trial_id"] < f"t{MAX_CURVES:03d}"]
    assert curves(trials, few, "val_exact_match", in_samples=True).note is None


@pytest.mark.slow
def test_efficiency_ranks_by_mfu_beside_the_objective_and_the_query_shows_it(swept, capsys):
    from orchestrator.cli.main import main
    from orchestrator.results.report_data import efficiency

    trials = [{"trial_id": tid, "objective": obj, "final_achieved_tflops": tflops, "final_mfu": mfu,
               "final_flops_per_sample": 2e9} for tid, obj, tflops, mfu in
              [("a", 0.9, 300.0, 0.30), ("b", 0.1, 400.0, 0.40), ("c", 0.5, 500.0, None), ("d", 0.7, None, None)]]
    ranked = efficiency(trials)
    assert [(r["rank"], r["trial_id"], r["objective"]) for r in ranked.rows] == [(1, "b", 0.1), (2, "a", 0.9),
                                                                                (3, "c", 0.5)]
    assert ranked.note is None and ranked.rows[0]["gflop_per_sample"] == 2.0
    old = [{"trial_id": "x", "objective": 0.5}]  # rows written before the efficiency columns
    assert efficiency(old).note == "these results were written before trials recorded their FLOPs and kernel"
    # `mdsweep query`'s default columns carry the efficiency of each trial; MFU only where a trial has one
    assert main(["query", str(swept), "--sweep", "rep", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert {"final_achieved_tflops", "attention_kernel"} <= set(row) and "final_mfu" not in row


@pytest.mark.parametrize("where", ["missing/study.log", "a-file/study.jsonl"])
def test_a_journal_file_that_cannot_be_opened_is_one_line_naming_the_flag(tmp_path, capsys, where):
    from orchestrator.cli.main import main

    (tmp_path / "a-file").write_text("")
    storage = str(tmp_path / where)
    assert main(["study", str(tmp_path / "results"), "--sweep", "demo", "--storage", storage]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mdsweep study: error: --storage {storage}: ")
    assert err[0].endswith("give a file in a writable directory") and not (tmp_path / "results").exists()


@pytest.fixture
def tiny_sweep(tmp_path) -> Path:
    """A sweep's results written directly (no Ray): its record and two ok proposals of the smoke space."""
    from orchestrator.results.schema import rows_to_table, schema_for
    from orchestrator.results.store import partition_dir, write_atomic, write_sweep_row

    root = tmp_path / "results"
    write_sweep_row(root, "demo", {"name": "demo", "space": "smoke", "metric": "val_exact_match", "mode": "max",
                                   "fixed_json": json.dumps({"train_data": "x"})})
    rows = [{"trial_id": f"t{i}", "group_id": i, "member": 0, "outcome": "ok", "status": "terminated",
             "searched": ["lr"], "params_json": json.dumps({"lr": lr}), "lr": lr, "final_val_exact_match": value,
             "objective": value, "objective_metric": "val_exact_match", "objective_mode": "max"}
            for i, (lr, value) in enumerate([(1e-4, 0.5), (1e-5, 0.25)])]
    write_atomic(rows_to_table(rows, schema_for("trials")), partition_dir(root, "trials", "demo") / "trials.parquet")
    for row in rows:
        step = {"trial_id": row["trial_id"], "step": 1, "val_exact_match": row["objective"]}
        write_atomic(rows_to_table([step], schema_for("steps")),
                     partition_dir(root, "steps", "demo") / f"{row['trial_id']}.parquet")
    return root


def main_study(results: Path, storage: Path | str) -> int:
    from orchestrator.cli.main import main

    return main(["study", str(results), "--sweep", "demo", "--storage", str(storage)])


def _sqlite_file(path: Path, table: str) -> bytes:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"create table {table} (x)")
        db.commit()
    return path.read_bytes()


@pytest.mark.parametrize("name, content", [
    ("notes.jsonl", b'{"note": "mine"}\n'), ("notes.log", b"2026-12-01 started the run\n"),
    ("notes.db", b"my notes, not a database\n"), ("other.db", None)])
def test_study_never_writes_to_a_file_that_is_not_an_optuna_storage(tiny_sweep, tmp_path, capsys, name, content):
    """`--storage notes.jsonl` appended a journal line to the user's file before failing; an existing .log was a
    traceback; another program's SQLite file would get Optuna's tables. Each is one line, the file untouched."""
    path = tmp_path / name
    if content is None:
        content = _sqlite_file(path, "customers")
    else:
        path.write_bytes(content)
    assert main_study(tiny_sweep, path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mdsweep study: error: --storage {path}: "), err
    assert "not an Optuna" in err[0] and path.read_bytes() == content


@pytest.mark.parametrize("name", ["study.jsonl", "study.db"])
def test_a_storage_the_study_wrote_is_taken_again(tiny_sweep, tmp_path, name):
    """The refusal above must not refuse the study's own journal or database: a re-run replaces the study there
    (end to end on SQLite in test_study_opens_in_optuna_with_the_best_proposal_and_is_idempotent)."""
    from orchestrator.results.study import check_storage_file

    storage = tmp_path / name
    assert main_study(tiny_sweep, storage) == 0 and storage.stat().st_size > 0
    check_storage_file(storage, journal=name.endswith(".jsonl"))
    if name.endswith(".jsonl"):
        assert main_study(tiny_sweep, storage) == 0


def test_a_storage_url_that_fails_is_one_line_naming_the_flag(tiny_sweep, tmp_path, capsys):
    """SQLAlchemy's errors run over several lines (the statement, a link to its docs)."""
    url = f"sqlite:///{tmp_path / 'missing' / 'x.db'}"
    assert main_study(tiny_sweep, url) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mdsweep study: error: --storage {url}: "), err
