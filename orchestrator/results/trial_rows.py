"""What a trial's row in the trials table says, from what the trial was suggested and what it reported.

The row of a trial starts from its suggestion (the JobConfig it will run, which parameters were searched, its
group and member), follows its steps rows (how many reports, the best one by the objective, the last one while
it runs, the peak memory) and ends with its final report (the outcome, the final metrics, the objective). The
sink (orchestrator.sweep.sink) applies these as Tune's events arrive; the columns are in
orchestrator.results.schema.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from orchestrator.results.objectives import is_finite_number
from orchestrator.results.schema import METRICS, job_field_types, utc_now
from orchestrator.results.spaces import BASELINE_EXTRA_KEY, BASELINE_KEY, GROUP_KEY, MEMBER_KEY, split_suggestion
from trainer.job_config import HARDWARE_COLUMNS
from trainer.model.tokenizer_source import TOKENIZER_COLUMNS


def params_json(config: dict[str, Any]) -> str:
    """A trial's suggested parameters as the row keeps them (auxiliary `_` keys left out)."""
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, default=str, sort_keys=True)


def new_trial_row(trial_id: str, config: dict[str, Any], job: dict[str, Any], metric: str, mode: str,
                  max_gpu_memory: Optional[str], workers: int = 1) -> dict[str, Any]:
    """The row of a trial about to run its suggestion `config` on `workers` workers; `job` is the JobConfig it will
    run, as a dict (empty when the config is one JobConfig rejects: the trial fails and says why), until it reports
    the one it ran."""
    params, meta = split_suggestion(dict(config))
    row = {"trial_id": trial_id, "outcome": "running", "attempts": 0, "num_failures": 0, "workers": workers, **job}
    if max_gpu_memory and row.get("max_gpu_memory") is None:
        row["max_gpu_memory"] = max_gpu_memory
    types_ = job_field_types()
    row["searched"] = sorted(k for k in params if k in types_ and k not in (meta.get(BASELINE_EXTRA_KEY) or ()))
    row["baseline"] = meta.get(BASELINE_KEY)
    row["params_json"] = params_json(config)
    row["group_id"] = meta.get(GROUP_KEY)
    row["member"] = meta.get(MEMBER_KEY)
    row["objective_metric"], row["objective_mode"] = metric, mode
    return row


def start_attempt(row: dict[str, Any]) -> None:
    """The trial starts (again: a retry, a resume, a rerun): one attempt more, its first start kept, and nothing
    of how an earlier attempt ended."""
    row["attempts"] = int(row.get("attempts") or 0) + 1
    row["start_time"] = row.get("start_time") or utc_now()
    row.update(end_time=None, wall_time_s=None, outcome="running", error=None)


def steps_row(trial_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """The steps table's row of an evaluation the trial reported (`result` has its step)."""
    row = {m: result.get(m) for m in METRICS}
    row.update(trial_id=trial_id, step=int(result["step"]), training_iteration=result.get("training_iteration"),
               report_time=utc_now())
    return row


def record_report(row: dict[str, Any], result: dict[str, Any]) -> bool:
    """What any report says in the row: where the trial runs, what memory it was predicted, the cap it runs under
    (set in the trial with auto) and the step it restored from. True when it says the trial runs on a new node."""
    placed = result.get("node_id") not in (None, "", row.get("node_id"))
    for k in ("node_id", "node_ip", "hostname", "gpu_ids", "predicted_peak_bytes", "max_gpu_memory"):
        if result.get(k) not in (None, ""):
            row[k] = result[k]
    if result.get("restored_from_step") is not None:
        row["restored_from_step"] = result["restored_from_step"]
    return placed


def summarize_steps(row: dict[str, Any], steps: dict[int, dict[str, Any]], metric: str, mode: str) -> None:
    """Bring the row's summary of its steps rows (by step) up to date: the count, the best report by `metric`,
    the last report's metrics while the trial runs (its final report sets them after), and the peak memory."""
    row["n_reports"] = len(steps)
    if not steps:
        return
    ordered = [steps[s] for s in sorted(steps)]
    scored = [r for r in ordered if is_finite_number(r.get(metric))]
    if scored:
        best = scored[0]
        for r in scored[1:]:  # strictly better only: ties go to the earlier step
            if (r[metric] > best[metric]) if mode == "max" else (r[metric] < best[metric]):
                best = r
        for m in METRICS:
            row[f"best_{m}"] = best.get(m)
    last = ordered[-1]
    if row.get("outcome") == "running":
        for m in METRICS:
            row[f"final_{m}"] = last.get(m)
    row["steps_completed"] = max(row.get("steps_completed") or 0, last.get("step") or 0)
    peaks = [r.get("peak_memory_bytes") for r in ordered if r.get("peak_memory_bytes") is not None]
    if peaks:
        row["peak_memory_bytes"] = max([*peaks, row.get("peak_memory_bytes") or 0])


def record_final(row: dict[str, Any], result: dict[str, Any], metric: str, final_step: int) -> None:
    """What the trial's final report (the job's outcome, at `final_step`) says in its row."""
    row["outcome"] = result.get("outcome") or "error"
    row["error"] = result.get("job_error") or None
    row["steps_completed"] = final_step
    for m in METRICS:
        v = result.get(m)
        # NaN is kept where it is a measurement (a diverged loss), dropped where it
        # only stands for "never evaluated" (the trainable's placeholder)
        if v is not None and (is_finite_number(v) or m in ("train_loss", "grad_norm")):
            row[f"final_{m}"] = v
    value = result.get(metric)
    row["objective"] = float(value) if is_finite_number(value) and row["outcome"] == "ok" else None
    if result.get("peak_memory_bytes") is not None:
        row["peak_memory_bytes"] = max(int(result["peak_memory_bytes"]), int(row.get("peak_memory_bytes") or 0))
    # the ending attempt's, as its job gathered them: none where its ranks did not end together
    row["rank_peak_memory_bytes"] = list(result.get("rank_peak_memory_bytes") or []) or None
    row["job_wall_time_s"] = result.get("job_wall_time_s")
    row.update({k: result[k] for k in (*TOKENIZER_COLUMNS, *HARDWARE_COLUMNS) if result.get(k) is not None})


def prediction_rows(trial_id: str, step: int, predictions: dict[str, list]) -> list[dict[str, Any]]:
    """The predictions table's rows of a final evaluation, from the columns the trial reported."""
    return [{"trial_id": trial_id, "step": step, **{k: predictions[k][i] for k in predictions}}
            for i in range(len(predictions["sample_id"]))]
