"""`bench/scale.py` end to end (its mdsweep leg, small): the Parquet tables hold every report of the stand-in
job once, row for row, and the report renders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from trainer.job_config import JobConfig
from trainer.standin_job import VAL_N, predictions, report_at

ROOT = Path(__file__).resolve().parent.parent
TRIALS, REPORTS = 12, 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--legs", "mdsweep",
                           "--trials", str(TRIALS), "--reports", str(REPORTS), "--concurrent", "8", "--seconds",
                           "0.05", "--nodes", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| mdsweep |" in proc.stdout and "CPU ms / result" in proc.stdout
    return out


def test_every_report_of_every_trial_is_in_the_tables_once(scaled):
    results = scaled / "results"
    trials = pq.read_table(results / "trials").to_pylist()
    assert len(trials) == TRIALS and {t["outcome"] for t in trials} == {"ok"}
    assert sorted(t["attention"] for t in trials) == ["causal"] * (TRIALS // 2) + ["prefix"] * (TRIALS // 2)
    steps = pq.read_table(results / "steps").to_pylist()
    got = sorted((s["trial_id"], s["step"], s["val_exact_match"], s["samples_seen"]) for s in steps)
    expected = []
    for t in trials:
        job = JobConfig(train_data="x", lr=t["lr"], grad_accum=t["grad_accum"], attention=t["attention"],
                        seed=t["seed"], batch_size=t["batch_size"], max_steps=REPORTS, eval_every=1)
        rows = [report_at(job, k, REPORTS) for k in range(1, REPORTS + 1)]
        expected += [(t["trial_id"], r["step"], r["val_exact_match"], r["samples_seen"]) for r in rows]
        assert t["final_val_exact_match"] == rows[-1]["val_exact_match"] == t["objective"]
    assert got == sorted(expected)  # nothing lost, nothing doubled, every value as reported
    answers = pq.read_table(results / "predictions").to_pylist()
    assert len(answers) == TRIALS * VAL_N
    by_trial = {t["trial_id"]: t for t in trials}
    for a in answers[:: VAL_N // 10]:
        t = by_trial[a["trial_id"]]
        job = JobConfig(train_data="x", seed=t["seed"])
        assert predictions(job, t["final_val_exact_match"])[int(a["sample_id"])].prediction == a["prediction"]


def test_the_report_renders_and_the_figures_are_kept(scaled):
    figures = json.loads((scaled / "scale.json").read_text())
    assert figures["trials"] == TRIALS and figures["mdsweep"]["cpu_s"] > 0
    page = (scaled / "report.html").read_text()
    assert page.count('class="plotly-graph-div"') >= 5 and figures["report_mb"] < 15
    assert {"trials", "steps", "predictions", "sweeps"} <= set(figures["parquet"])
