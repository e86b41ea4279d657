"""The Ray Tune function trainable: one trial = one `run_job`.

- Resumes from `tune.get_checkpoint()` when Tune restarts the trial (worker or
  node lost, or a resumed sweep), so a retried trial continues where it stopped.
- Reports at every evaluation, with the checkpoint the job has just written:
  `tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(dir))`.
- The job's outcomes are results, not exceptions: `oom`, `diverged` and `error`
  end the trial normally with a final report carrying `outcome`, so Tune does not
  retry them (only a lost worker, which raises at the driver, is retried).
- The final report also carries the per-sample predictions, which the Parquet
  sink takes out of the result before anything else logs it.
- With several workers (--workers-per-trial N > 1) the trial is their driver: the
  job runs on N Ray Train workers on this trial's node (train_workers.run_on_workers),
  rank 0's reports come back here, and the checkpoint rank 0 wrote is the one
  reported to Tune, so a retry or a resumed sweep continues from it as with one
  worker. Workers lost without rank 0's word raise here: a lost worker, retried.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.cluster.scratch import trial_scratch
from orchestrator.cluster.train_workers import WorkersFailed, load_callable, run_on_workers
from orchestrator.results.job_values import normalize_value
from orchestrator.results.schema import METRICS
from orchestrator.results.spaces import split_suggestion
from trainer.job_config import JobConfig
from trainer.memory.estimate import estimate_memory

PREDICTIONS_KEY = "mdsweep_predictions"
KIND_KEY = "mdsweep_kind"  # "eval" for a report at an evaluation, "final" for the trial's last one
JOB_CONFIG_KEY = "mdsweep_job_config"  # the JobConfig the trial ran, as a dict: the trials table records it
SIDECAR = "mdsweep_report.json"  # written into each checkpoint: the report it belongs to


@dataclass
class TrialSpec:
    """Everything a trial needs besides its suggested parameters (same for every trial)."""

    fixed: dict[str, Any]
    metric: str
    max_gpu_memory: Optional[str]  # from --gpu-memory-per-trial or a GPU fraction
    cpus: float
    job_fn: str  # "module:function", SweepSettings.job_fn
    workers: int = 1  # Ray Train workers of the job; with more than one, `cpus` is each worker's
    worker_resources: dict[str, float] = field(default_factory=dict)  # each worker's request (TrialResources)


def job_config_from(fixed: dict[str, Any], config: dict[str, Any]):
    """JobConfig from the fixed settings and a trial's suggestion (bookkeeping keys dropped, values normalised):
    the one reading of a trial's settings, for the trial itself, its GPU share and the searcher."""
    params, _meta = split_suggestion(config)
    return JobConfig.from_dict({**fixed, **{k: normalize_value(k, v) for k, v in params.items()}})


def build_job_config(spec: TrialSpec, config: dict[str, Any]):
    """The trial's JobConfig with its GPU cap (under `auto`: the GPU share Ray gave this trial, which came from
    its predicted memory)."""
    job_config = job_config_from(spec.fixed, config)
    if spec.max_gpu_memory and job_config.max_gpu_memory is None:
        cap = assigned_gpu_share() if spec.max_gpu_memory == "auto" else spec.max_gpu_memory
        job_config = replace(job_config, max_gpu_memory=cap)
    return job_config


def assigned_gpu_share() -> Optional[str]:
    import ray

    share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    return f"{share:g}" if share and share < 1 else None


def predicted_peak(job_config: Any, workers: int = 1) -> Optional[int]:
    """The memory model's GPU peak for this trial, one rank's on `workers` workers, reported next to the measured
    one (rank 0's, and every rank's in rank_peak_memory_bytes)."""
    try:
        return estimate_memory(job_config, workers=workers).allocator_peak
    except Exception:  # a model whose sizes cannot be read without loading it: nothing to predict
        return None


def placement() -> dict[str, Any]:
    """Where this trial runs: node, host, GPUs."""
    import ray

    info: dict[str, Any] = {"hostname": socket.gethostname()}
    try:
        info["node_id"] = ray.get_runtime_context().get_node_id()
        info["node_ip"] = ray.util.get_node_ip_address()
        info["gpu_ids"] = ",".join(str(g) for g in ray.get_gpu_ids())
    except Exception:
        pass
    return info


def _scalar(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        try:
            v = v.item()
        except Exception:
            return None
    return v if isinstance(v, (int, float, str, bool)) or v is None else None


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: _scalar(v) for k, v in metrics.items() if _scalar(v) is not None}


def predictions_columns(predictions: list[Any]) -> dict[str, list]:
    cols: dict[str, list] = {"sample_id": [], "target": [], "prediction": [], "correct": [], "cer": []}
    for p in predictions:
        cols["sample_id"].append(str(p.sample_id))
        cols["target"].append(p.target)
        cols["prediction"].append(p.prediction)
        cols["correct"].append(bool(p.correct))
        cols["cer"].append(float(p.cer))
    return cols


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def run_trial(spec: TrialSpec, config: dict[str, Any]) -> None:
    from ray import tune

    started = time.time()
    job_config = build_job_config(spec, config)
    where = placement()
    # a GPU peak is predicted only for a trial holding a GPU (its workers, with several): on CPU the measured peak
    # is the process's RSS
    on_gpus = spec.worker_resources.get("GPU") if spec.workers > 1 else where.get("gpu_ids")
    where.update(predicted_peak_bytes=predicted_peak(job_config, spec.workers) if on_gpus else None,
                 max_gpu_memory=job_config.max_gpu_memory)
    where[JOB_CONFIG_KEY] = job_config.to_dict()
    if spec.workers == 1:
        job = load_callable(spec.job_fn)  # imports torch for the real job
        if spec.cpus >= 1 and "torch" in sys.modules:
            with contextlib.suppress(Exception):
                sys.modules["torch"].set_num_threads(int(spec.cpus))
    state: dict[str, Any] = {"last": None, "restored_from_step": 0}
    checkpoint = tune.get_checkpoint()

    def eval_row(metrics: dict[str, Any]) -> dict[str, Any]:
        row = {**metrics, **where, "outcome": "running", "restored_from_step": state["restored_from_step"]}
        row[KIND_KEY] = "eval"
        return row

    def on_report(metrics: dict[str, Any], ckpt_dir: Optional[Path]) -> None:
        metrics = clean_metrics(metrics)
        metrics.setdefault(spec.metric, float("nan"))
        state["last"] = dict(metrics)
        row = eval_row(metrics)
        if ckpt_dir is not None and Path(ckpt_dir).is_dir():
            (Path(ckpt_dir) / SIDECAR).write_text(json.dumps({"last": state["last"]}))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
        else:
            tune.report(row)

    result = None
    error: Optional[str] = None
    outcome = "error"
    # checkpoints are written here before Tune takes them; the folder goes when the trial ends, or, if its
    # worker is killed, when the next trial on this node starts
    with trial_scratch() as work:
        checkpoint_dir = work / "checkpoint"
        if spec.workers > 1:  # the workers import the job; this process only starts them
            job = functools.partial(run_on_workers, spec.workers, job=spec.job_fn, storage=work / "workers",
                                    resources=spec.worker_resources,
                                    node_id=where.get("node_id"))  # on this node, whose folder `checkpoint_dir` is
        try:
            with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume_dir:
                if resume_dir is not None:
                    side = Path(resume_dir) / SIDECAR
                    if side.is_file():
                        state["last"] = json.loads(side.read_text()).get("last")
                        state["restored_from_step"] = int((state["last"] or {}).get("step") or 0)
                        if state["last"]:
                            # the report this checkpoint belongs to may never have reached the results: a
                            # driver killed after Tune registered the checkpoint but before the sink wrote the
                            # report. Send it again; the sink keeps one row per step, so a report it already
                            # has is not duplicated.
                            tune.report(eval_row(state["last"]))
                result = job(job_config, on_report=on_report, checkpoint_dir=checkpoint_dir,
                             resume_from=Path(resume_dir) if resume_dir is not None else None)
            outcome = result.outcome
            error = result.error
        except WorkersFailed:  # a worker lost, as a lost trial is: Tune retries it from its last checkpoint
            raise
        except Exception as exc:  # the job's own failure: an outcome, not a retry
            from trainer.data.dataset import DataError

            outcome = "oom" if _is_oom(exc) else "error"
            if isinstance(exc, DataError):
                # the data as this node sees it (a path another node reads may be missing here): one line, naming it
                error = f"on node {where.get('hostname')} ({where.get('node_ip')}): {exc}"
            else:
                error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                error += "\n" + "".join(traceback.format_tb(exc.__traceback__)[-5:])

    final: dict[str, Any] = {}
    if result is not None and result.final_metrics:
        final = clean_metrics(result.final_metrics)
    report = {m: final.get(m) for m in METRICS if final.get(m) is not None}
    report[spec.metric] = final.get(spec.metric, float("nan"))
    if result is not None:
        report["step"] = int(result.step)
        report["peak_memory_bytes"] = max(int(result.peak_memory_bytes or 0),
                                          int(final.get("peak_memory_bytes") or 0))
        report["job_wall_time_s"] = float(result.wall_time_s or 0.0)
        report.update(result.tokenizer)
        report.update(result.hardware)
        report["rank_peak_memory_bytes"] = result.rank_peak_memory_bytes or None
        if result.predictions:
            report[PREDICTIONS_KEY] = predictions_columns(result.predictions)
    else:
        report.setdefault("step", int((state["last"] or {}).get("step") or 0))
        report["job_wall_time_s"] = time.time() - started
    report.update(where)
    report.update(outcome=outcome, job_error=error or "", restored_from_step=state["restored_from_step"])
    report[KIND_KEY] = "final"
    if isinstance(report.get(spec.metric), float) and math.isnan(report[spec.metric]) and outcome == "ok":
        report["job_error"] = report["job_error"] or f"the job reported no {spec.metric}"
    tune.report(report)


def make_trainable(spec: TrialSpec) -> Callable[[dict[str, Any]], None]:
    """A Tune function trainable bound to `spec` (a closure: Tune pickles it by value)."""

    def mdsweep_trial(config: dict[str, Any]) -> None:
        run_trial(spec, config)

    return mdsweep_trial
