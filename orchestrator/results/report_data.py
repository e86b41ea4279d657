"""What `mdsweep report` shows, read from the Parquet results: one plain structure per section.

Kept apart from the HTML so that each section's numbers can be checked against
the tables directly (tests/test_report.py), and so that a sweep still running
reports what has landed. A section with nothing to show carries a note saying
why instead of data.
"""
from __future__ import annotations

import base64
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

from orchestrator.results.objectives import is_finite_number
from orchestrator.results.query import (PairedSpec, QueryError, UnreadableError, load_table, paired_comparison,
                                versus_baseline)
from orchestrator.results.study import StudyError, study_from_rows, sweep_objectives, sweep_record
from orchestrator.results.ranking import best_trial, ranked_trials

MAX_MISREAD = 24
MAX_CURVES = 50


class ReportError(ValueError):
    """No report can be made (unknown sweep, no results); the message says which."""


@dataclass
class Section:
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: Optional[str] = None  # why the section is empty or partial
    x_title: Optional[str] = None  # what a chart of the rows has on its x axis (`x` in each row)


@dataclass
class ReportData:
    sweep: str
    record: dict[str, Any]
    objectives: list[tuple[str, str]]
    summary: dict[str, Any]
    leaderboard: Section
    curves: Section  # one row per evaluation: trial_id, attention, x (samples seen or step), val metric, train_loss
    search: Section  # one row per trial: its parameters, objective and outcome
    paired: Section
    importance: Section
    cost: Section
    efficiency: Section  # trials ranked by MFU (by achieved TFLOP/s where no trial has one), objective beside
    misread: Section
    warnings: list[str] = field(default_factory=list)  # tables that could not be read

    @property
    def metric(self) -> str:
        return self.objectives[0][0]


def collect(results: str, sweep: str) -> ReportData:
    try:
        record = sweep_record(results, sweep)
        trials = load_table(results, "trials", [sweep]).to_pylist()
    except (QueryError, StudyError, FileNotFoundError) as e:
        raise ReportError(str(e)) from None
    warnings: list[str] = []
    steps = _rows(results, "steps", sweep, warnings)
    predictions = _rows(results, "predictions", sweep, warnings)
    objectives = sweep_objectives(record)
    metric, mode = objectives[0]
    best = best_trial(trials)
    return ReportData(
        sweep=sweep, record=record, objectives=objectives,
        summary={**summary(record, trials, best, metric), "vs_baseline": versus_baseline(trials, predictions)},
        leaderboard=leaderboard(trials, metric, mode),
        curves=curves(trials, steps, metric, in_samples=budget_in_samples(record, steps)),
        search=search_points(trials),
        paired=paired(trials, predictions),
        importance=importance(results, sweep, record, trials, steps),
        cost=cost(trials), efficiency=efficiency(trials),
        misread=misread(best, predictions, record), warnings=warnings)



def _rows(results: str, table: str, sweep: str, warnings: list[str]) -> list[dict[str, Any]]:
    """The sweep's rows of `table`; none when it has none yet, and none with a warning when its files cannot be
    read (the page and the command then say which parts are missing and why)."""
    try:
        return load_table(results, table, [sweep]).to_pylist()
    except UnreadableError as e:
        warnings.append(f"the {table} table could not be read, so what it holds is missing from this report: {e}")
        return []
    except (QueryError, FileNotFoundError):  # a table with nothing for this sweep yet
        return []


def summary(record: dict[str, Any], trials: list[dict[str, Any]], best: Optional[dict[str, Any]],
            metric: str) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.get("outcome") or "running"] = counts.get(t.get("outcome") or "running", 0) + 1
    return {
        "status": record.get("status"), "space": record.get("space"), "argv": record.get("argv"),
        "created_at": record.get("created_at"), "fixed": json.loads(record.get("fixed_json") or "{}"),
        "trials": len(trials), "outcomes": dict(sorted(counts.items())),
        "warm_start": json.loads(record.get("warm_start_json") or "[]"),
        "trial_hours": sum(t.get("wall_time_s") or 0.0 for t in trials) / 3600,
        "best": None if best is None else {
            "trial_id": best["trial_id"], "objective": best["objective"],
            "low": best.get(f"final_{metric}_low"), "high": best.get(f"final_{metric}_high"),
            "n": best.get("final_val_n"),
            "params": {k: best.get(k) for k in best.get("searched") or []},
            "test": None if best.get("test_n") is None else {
                k: best[f"test_{k}"] for k in ("exact_match", "exact_match_low", "exact_match_high", "cer", "n")}},
    }


def leaderboard(trials: list[dict[str, Any]], metric: str, mode: str) -> Section:
    if not trials:
        return Section(note="no trials have started yet")
    searched = _searched(trials)
    sign = -1 if mode == "max" else 1
    tested = any(t.get("test_n") is not None for t in trials)  # a sweep run with --test-data
    ordered = sorted(trials, key=lambda t: (not is_finite_number(t.get("objective")),
                                            sign * (t.get("objective") or 0), t["trial_id"]))
    rows = [{"trial_id": t["trial_id"], "outcome": t.get("outcome"), **{k: t.get(k) for k in searched},
             "objective": t.get("objective"), "low": t.get(f"final_{metric}_low"),
             "high": t.get(f"final_{metric}_high"),
             **({"test": t.get("test_exact_match")} if tested else {}), "steps": t.get("steps_completed"),
             "peak_gib": (t.get("peak_memory_bytes") or 0) / 2**30 or None,
             "minutes": (t.get("wall_time_s") or 0) / 60,
             "error": t.get("error")} for t in ordered]
    return Section(rows=rows)


def _searched(trials: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for t in trials:
        for n in t.get("searched") or []:
            if n not in names:
                names.append(n)
    for crossed in ("attention", "seed"):  # crossed factors are columns too, not searched
        if crossed not in names and len({t.get(crossed) for t in trials}) > 1:
            names.append(crossed)
    return names


def budget_in_samples(record: dict[str, Any], steps: list[dict[str, Any]]) -> bool:
    """Whether the sweep's trials were given samples (`max_samples`, `epochs`) rather than optimizer steps.

    Then curves are drawn against samples seen: trials with grad_accum 1 and 2 that saw the same data end at
    the same x, where in steps the second would stop halfway. Rows written before `samples_seen` existed
    fall back to steps."""
    fixed = json.loads(record.get("fixed_json") or "{}")
    return not fixed.get("max_steps") and all(s.get("samples_seen") is not None for s in steps)


def curves(trials: list[dict[str, Any]], steps: list[dict[str, Any]], metric: str, in_samples: bool) -> Section:
    """One line per trial; past MAX_CURVES trials, the MAX_CURVES best (then the unranked by id), and a note saying
    so: a thousand lines on one chart hide each other, and each is data the page carries."""
    attention = {t["trial_id"]: t.get("attention") for t in trials}
    reported = sorted({s["trial_id"] for s in steps})
    note = None if steps else "no evaluations have been reported yet"
    if len(reported) > MAX_CURVES:
        ranked = [t["trial_id"] for t in ranked_trials(trials)]
        unranked = sorted(set(reported) - set(ranked))
        order = ranked + unranked
        shown = set(order[:MAX_CURVES])
        steps = [s for s in steps if s["trial_id"] in shown]
        note = (f"the curves of the {MAX_CURVES} best of {len(reported)} trials (more lines would hide each other); "
                "every trial's evaluations: mdsweep query RESULTS --table steps --sweep NAME")
    x_key = "samples_seen" if in_samples else "step"
    rows = [{"trial_id": s["trial_id"], "attention": attention.get(s["trial_id"]), "x": s[x_key],
             "value": s.get(metric), "train_loss": s.get("train_loss")}
            for s in sorted(steps, key=lambda s: (s["trial_id"], s["step"]))]
    return Section(rows=rows, note=note, x_title="samples seen" if in_samples else "optimizer step")


def search_points(trials: list[dict[str, Any]]) -> Section:
    rows = [{"trial_id": t["trial_id"], "lr": t.get("lr"), "grad_accum": t.get("grad_accum"),
             "attention": t.get("attention"), "objective": t.get("objective"), "outcome": t.get("outcome"),
             "params": {k: t.get(k) for k in _searched(trials)}} for t in trials]
    return Section(rows=rows, note=None if rows else "no trials")


def paired(trials: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> Section:
    if len({t.get("attention") for t in trials if t.get("outcome") == "ok"}) < 2:
        return Section(note="no pairs: run with `--cross attention` (e.g. `--space captcha:paired`) to compare "
                            "the attention layouts on the same samples")
    try:
        table = paired_comparison(pa.Table.from_pylist(trials), pa.Table.from_pylist(predictions),
                                  PairedSpec("attention"))
    except QueryError as e:
        return Section(note=f"no pairs: {e}")
    rows = table.to_pylist()
    return Section(rows=rows, note=None if rows else "no finished pair of trials yet")


def importance(results: str, sweep: str, record: dict[str, Any], trials: list[dict[str, Any]],
               steps: list[dict[str, Any]]) -> Section:
    """Optuna's PED-ANOVA importances (its default evaluator; fANOVA would need scikit-learn) on the sweep as a
    study, for the first objective; it needs at least two completed proposals. PED-ANOVA asks which settings
    the best (lowest) values share, so a maximised metric is negated for it."""
    import optuna

    try:
        built = study_from_rows(results, sweep, record, trials, steps)
    except StudyError as e:
        return Section(note=str(e))
    complete = built.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return Section(note=f"{len(complete)} completed proposal(s): importances need at least two")
    sign = -1.0 if built.objectives[0][1] == "max" else 1.0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = optuna.importance.get_param_importances(
                built.study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                target=lambda t: sign * t.values[0])
    except (RuntimeError, ValueError) as e:
        return Section(note=f"importances could not be computed: {e}")
    notes = list(built.notes)
    if any("select the same set of trials" in str(w.message) for w in caught):
        notes.append(f"with {len(complete)} completed proposals PED-ANOVA cannot tell the settings apart (it "
                     "compares the best tenth with the rest): the importances are equal; the slices below show "
                     "the raw points")
    rows = [{"param": k, "importance": v, "proposals": len(complete)} for k, v in values.items()]
    return Section(rows=rows, note="; ".join(notes) or None)


def cost(trials: list[dict[str, Any]]) -> Section:
    rows = [{"trial_id": t["trial_id"], "attention": t.get("attention"), "outcome": t.get("outcome"),
             "peak_gib": t["peak_memory_bytes"] / 2**30 if t.get("peak_memory_bytes") else None,
             "predicted_gib": t["predicted_peak_bytes"] / 2**30 if t.get("predicted_peak_bytes") else None,
             "cap": t.get("max_gpu_memory"), "tokens_per_s": t.get("final_tokens_per_s"),
             "on_gpu": bool(t.get("gpu_ids"))} for t in trials]
    return Section(rows=rows, note=None if rows else "no trials")


def efficiency(trials: list[dict[str, Any]]) -> Section:
    """How well each trial used its hardware, best first, beside what it scored: a fast trial that learns
    nothing and a slow one that wins are both findings. MFU needs the device's peak, which a CPU has none of
    (trainer.devices), so without any MFU the ranking falls back to achieved TFLOP/s and says so."""
    if trials and all("final_achieved_tflops" not in t for t in trials):
        return Section(note="these results were written before trials recorded their FLOPs and kernel")
    measured = [t for t in trials if t.get("final_achieved_tflops") is not None]
    if not measured:
        return Section(note="no trial has finished a timed training step yet")
    by_mfu = any(t.get("final_mfu") is not None for t in measured)
    key = "final_mfu" if by_mfu else "final_achieved_tflops"
    ordered = sorted(measured, key=lambda t: (t.get(key) is None, -(t.get(key) or 0.0), t["trial_id"]))
    rows = [{"rank": i, "trial_id": t["trial_id"], "attention": t.get("attention"), "outcome": t.get("outcome"),
             "objective": t.get("objective"), "mfu": t.get("final_mfu"), "tflops": t["final_achieved_tflops"],
             "gflop_per_sample": (t.get("final_flops_per_sample") or 0.0) / 1e9 or None,
             "device": t.get("device_name"), "kernel": t.get("attention_kernel")}
            for i, t in enumerate(ordered, 1)]
    note = None if by_mfu else ("ranked by achieved TFLOP/s: MFU is blank because no trial ran on a GPU with a "
                                "known peak (on CPU, or give it with --set peak_tflops=N)")
    return Section(rows=rows, note=note)


def misread(best: Optional[dict[str, Any]], predictions: list[dict[str, Any]], record: dict[str, Any]) -> Section:
    """The best trial's wrong answers at its last evaluation, with their images (at most MAX_MISREAD)."""
    if best is None:
        return Section(note="no trial ended ok")
    preds = [p for p in predictions if p["trial_id"] == best["trial_id"]]
    if not preds:
        return Section(note=f"trial {best['trial_id']} saved no predictions")
    last = max(p["step"] or 0 for p in preds)
    wrong = sorted((p for p in preds if (p["step"] or 0) == last and not p["correct"]), key=lambda p: p["sample_id"])
    shown, total = wrong[:MAX_MISREAD], len(wrong)
    images, note = _images(record, [p["sample_id"] for p in shown])
    rows = [{"sample_id": p["sample_id"], "target": p["target"], "prediction": p["prediction"], "cer": p["cer"],
             "image": images.get(p["sample_id"])} for p in shown]
    more = f"{total} misread at step {last}; {len(shown)} shown" if total > len(shown) else None
    return Section(rows=rows, note="; ".join(n for n in (more, note) if n) or None)


def _images(record: dict[str, Any], sample_ids: list[str]) -> tuple[dict[str, str], Optional[str]]:
    """PNG data URLs of the samples, read from the sweep's data where this machine can still read it."""
    from trainer.data.dataset import DataError, load_samples

    fixed = json.loads(record.get("fixed_json") or "{}")
    path = fixed.get("val_data") or fixed.get("train_data")
    if not sample_ids or not path:
        return {}, None
    wanted = set(sample_ids)
    try:
        loaded = load_samples(path, text_column=fixed.get("text_column"), image_column=fixed.get("image_column"),
                              on_bad_sample="skip")
    except (DataError, OSError) as e:
        return {}, f"images not shown: {e}"
    out = {}
    for sample in loaded.samples:
        if sample.sample_id in wanted:
            buffer = io.BytesIO()
            sample.image.save(buffer, format="PNG")
            out[sample.sample_id] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return out, None
