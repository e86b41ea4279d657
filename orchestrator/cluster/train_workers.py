"""One job on N Ray Train workers, called as `trainer.job.run_job` is called.

`run_on_workers(N, config, ...)` starts a Ray Train `TorchTrainer` of N workers on the Ray this process is attached
to; `run_job_on_workers` (mdsweep train) first starts an embedded Ray of its own (its own temporary folder, ended
with it), while a sweep's trial (orchestrator.sweep.trainable) is the small driver of its own workers inside the
sweep's Ray. Ray Train initialises a torch.distributed process group (gloo on CPUs) and each worker calls the job,
which reads the group and trains its share of every micro-batch (trainer.parallel). Rank 0 alone evaluates,
checkpoints and reports: it relays each call of the callbacks, and its result or its error, through a Ray queue to
this process, which makes the calls. So the callbacks (the files and progress bar of `mdsweep train`, the
`tune.report` of a trial) run where they would with one worker, and never need to be pickled. A report waits until
this process has handled it: the checkpoint it names must not change under a `tune.report` still copying it.
"""
from __future__ import annotations

import importlib
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.cluster.connect import start_embedded
from orchestrator.cluster.ray_logs import route_ray_logs
from orchestrator.cluster.tune_internals import NODE_ID_LABEL
from trainer.job_config import JobConfig, JobResult

# how long the driver waits on the queue before it looks whether the workers ended without a word
POLL_S = 0.5


def load_callable(path: str) -> Callable:
    """The function a "module:function" string names, its module imported here."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class WorkersFailed(RuntimeError):
    """The workers ended without rank 0's result: a worker died, or raised where rank 0 did not."""


def train_loop(settings: dict[str, Any]) -> None:
    """One worker: the job (`settings["job"]`, "module:function" of run_job or a stand-in) in the process group Ray
    Train made, rank 0's
    callbacks, result and error relayed through the queue `settings["events"]` as (kind, payload); after a report,
    rank 0 waits for the driver's word on `settings["handled"]`."""
    import ray.train

    events, handled = settings["events"], settings["handled"]
    main = ray.train.get_context().get_world_rank() == 0

    def relay(kind: str) -> Callable[..., None]:
        return lambda *args: events.put((kind, args))

    def report(*args: Any) -> None:
        events.put(("report", args))
        handled.get()

    try:
        job = load_callable(settings["job"])
        result = job(JobConfig.from_dict(settings["config"]), on_report=report, on_step=relay("step"),
                     on_resume=relay("resume"), checkpoint_dir=settings["checkpoint_dir"],
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
    """`run_job(config, ...)` on `workers` workers of an embedded Ray of its own, each with a GPU of this machine
    where it has CUDA GPUs (NCCL), else a CPU (gloo): the same outcome, callbacks and errors, rank 0's.
    `ray_log_file` takes Ray's own log lines off the terminal. Ray ends before this returns or raises."""
    import torch

    # one GPU per worker where the job trains on CUDA: a worker given none would see no GPU (Ray hides them)
    gpus = 0 if config.device == "cpu" else torch.cuda.device_count()
    if 0 < gpus < workers:
        raise ValueError(f"--workers-per-trial {workers}: this machine has {gpus} GPU(s), one per worker; "
                         f"use --workers-per-trial {gpus} or fewer, or train on CPUs with --set device=cpu")
    if ray_log_file is not None:
        route_ray_logs(ray_log_file)
    temp = Path(tempfile.mkdtemp(prefix="mdsw-"))  # short: Ray's socket paths live under it
    handle = start_embedded(num_cpus=workers, num_gpus=gpus, temp_dir=temp / "ray")
    try:
        return run_on_workers(workers, config, on_report, checkpoint_dir, resume_from, on_step, test_data,
                              on_resume, job="trainer.job:run_job", storage=temp / "train",
                              resources={"CPU": 1, "GPU": 1} if gpus else None)
    finally:
        handle.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def run_on_workers(workers: int, config: JobConfig, on_report: Optional[Callable[..., None]] = None,
                   checkpoint_dir: Optional[Path] = None, resume_from: Optional[Path] = None,
                   on_step: Optional[Callable[..., None]] = None, test_data: Optional[str] = None,
                   on_resume: Optional[Callable[..., None]] = None, *, job: str, storage: Path,
                   resources: Optional[dict[str, float]] = None, node_id: Optional[str] = None) -> JobResult:
    """`job(config, ...)` on `workers` workers of the Ray this process is attached to, each asking for `resources`
    (Ray Train's default, 1 CPU, when None), all on the node `node_id` when given: the node whose files
    `checkpoint_dir` and `resume_from` name. `storage`: where Ray Train keeps its own records of the run. Returns
    when rank 0 has its result and the workers have ended; raises rank 0's error, or WorkersFailed.

    `job` is "module:function", imported by the workers alone: the trial that starts them and Ray Train's
    controller never load the trainer (torch's models and transformers), seconds each on the way to the start of
    every multi-worker trial."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from trainer.parallel.ranks import lost_a_peer

    events, handled = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    settings = {"events": events, "handled": handled, "job": job, "config": config.to_dict(), "test_data": test_data,
                "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
                "resume_from": str(resume_from) if resume_from is not None else None}
    use_gpu = bool((resources or {}).get("GPU"))
    trainer = TorchTrainer(train_loop, train_loop_config=settings,
                           scaling_config=ScalingConfig(
                               num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                               label_selector={NODE_ID_LABEL: node_id} if node_id else None),
                           torch_config=TorchConfig(backend=collective_backend(config, use_gpu)),
                           # Ray Train's own records of the run; the job's files are where its callbacks put them
                           run_config=RunConfig(name="mdsweep-workers", storage_path=str(storage)))
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
        if kind in ("result", "raised"):
            fitting.join()  # the workers end with rank 0 (Ray Train stops the others when it raises)
            if kind == "raised":
                if lost_a_peer(payload):  # rank 0 saw another worker go: the trial can go on from a checkpoint
                    raise WorkersFailed(f"a worker of the {workers} was lost: {str(payload).splitlines()[0]}") \
                        from payload
                raise payload
            return payload
        if callbacks[kind] is not None:
            callbacks[kind](*payload)
        if kind == "report":
            handled.put(True)


def collective_backend(config: JobConfig, use_gpu: bool, nvidia: Optional[bool] = None) -> str:
    """NCCL where the workers train on NVIDIA GPUs, gloo where they train on CPUs: NCCL reduces only GPU tensors.

    Workers given GPUs train on CPUs when the job says `device=cpu`, or when the GPUs are logical ones (`--num-gpus`
    on a node without NVIDIA's driver): the job falls back to the CPU there (trainer.devices), so its process group
    must too. `nvidia`: whether the node has NVIDIA's driver; by default whether its device file /dev/nvidiactl is
    on this process's node, where the workers run."""
    if nvidia is None:
        nvidia = Path("/dev/nvidiactl").exists()
    return "nccl" if use_gpu and nvidia and config.device != "cpu" else "gloo"


def _fit(trainer: Any, failure: list[BaseException]) -> None:
    """Run the workers to their end; what stopped them, kept for the driver's message."""
    try:
        trainer.fit()
    except BaseException as exc:  # reported by the driver, which also sees the queue
        failure.append(exc)
