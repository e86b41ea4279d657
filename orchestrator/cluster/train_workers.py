"""One job on N Ray Train workers, called as `trainer.job.run_job` is called.

`run_job_on_workers(N, config, ...)` starts an embedded Ray of its own (its own temporary folder, ended with it)
and a Ray Train `TorchTrainer` of N workers on it. Ray Train initialises a torch.distributed process group (gloo
on CPUs) and each worker calls `run_job`, which reads the group and trains its share of every micro-batch
(trainer.parallel). Rank 0 alone evaluates, checkpoints and reports: it relays each call of the callbacks, and
its result or its error, through a Ray queue to this process, which makes the calls. So the callbacks (the files
and progress bar of `mdsweep train`) run where they would with one worker, and never need to be pickled.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.cluster.connect import start_embedded
from orchestrator.cluster.ray_logs import route_ray_logs
from trainer.job_config import JobConfig, JobResult

# how long the driver waits on the queue before it looks whether the workers ended without a word
POLL_S = 0.5


class WorkersFailed(RuntimeError):
    """The workers ended without rank 0's result: a worker died, or raised where rank 0 did not."""


def train_loop(settings: dict[str, Any]) -> None:
    """One worker: `run_job` in the process group Ray Train made, rank 0's callbacks, result and error relayed
    through the queue `settings["events"]` as (kind, payload)."""
    import ray.train

    from trainer.job import run_job

    events = settings["events"]
    main = ray.train.get_context().get_world_rank() == 0

    def relay(kind: str) -> Callable[..., None]:
        return lambda *args: events.put((kind, args))

    try:
        result = run_job(JobConfig.from_dict(settings["config"]), on_report=relay("report"),
                         on_step=relay("step"), on_resume=relay("resume"), checkpoint_dir=settings["checkpoint_dir"],
                         resume_from=settings["resume_from"], test_data=settings["test_data"])
    except Exception as exc:
        if main:
            events.put(("raised", exc))
        raise
    if main:
        events.put(("result", result))


def run_job_on_workers(workers: int, config: JobConfig, on_report: Optional[Callable[..., None]] = None,
                       checkpoint_dir: Optional[Path] = None, resume_from: Optional[Path] = None,
                       on_step: Optional[Callable[..., None]] = None, test_data: Optional[str] = None,
                       on_resume: Optional[Callable[..., None]] = None, *,
                       ray_log_file: Optional[Path] = None) -> JobResult:
    """`run_job(config, ...)` on `workers` CPU workers (DDP over gloo): the same outcome, callbacks and errors,
    rank 0's. `ray_log_file` takes Ray's own log lines off the terminal. Ray ends before this returns or raises."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    if ray_log_file is not None:
        route_ray_logs(ray_log_file)
    temp = Path(tempfile.mkdtemp(prefix="mdsw-"))  # short: Ray's socket paths live under it
    handle = start_embedded(num_cpus=workers, temp_dir=temp / "ray")
    try:
        events = Queue(actor_options={"num_cpus": 0})
        settings = {"events": events, "config": config.to_dict(), "test_data": test_data,
                    "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
                    "resume_from": str(resume_from) if resume_from is not None else None}
        trainer = TorchTrainer(train_loop, train_loop_config=settings,
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                               torch_config=TorchConfig(backend="gloo"),
                               # Ray Train's own records of the run; the job's files are where its callbacks put them
                               run_config=RunConfig(name="mdsweep-train", storage_path=str(temp / "train")))
        failure: list[BaseException] = []
        fitting = threading.Thread(target=_fit, args=(trainer, failure), daemon=True)
        fitting.start()
        callbacks = {"report": on_report, "step": on_step, "resume": on_resume}
        while True:
            try:
                kind, payload = events.get(timeout=POLL_S)
            except Empty:
                if not fitting.is_alive():
                    raise WorkersFailed(f"the {workers} workers ended without a result"
                                        + (f": {failure[0]}" if failure else "")) from None
                continue
            if kind == "result":
                fitting.join()
                return payload
            if kind == "raised":
                raise payload
            if callbacks[kind] is not None:
                callbacks[kind](*payload)
    finally:
        handle.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _fit(trainer: Any, failure: list[BaseException]) -> None:
    """Run the workers to their end; what stopped them, kept for the driver's message."""
    try:
        trainer.fit()
    except BaseException as exc:  # reported by the driver, which also sees the queue
        failure.append(exc)
