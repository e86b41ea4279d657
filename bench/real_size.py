"""The whole path at Moondream2's real size (1.87 B parameters) on this CPU machine, through the CLI.

    python bench/real_size.py [--work DIR] [--keep]

No real weights can be downloaded here, so the bench fabricates a checkpoint: seeded
random weights at the real shapes (layer norms at 1 and 0), written as one fp16
`model.safetensors` in the official 2025 layout, with a small byte-level BPE
`tokenizer.json` beside it (trainer.model.synth_tokenizer; its ids lie inside the real
vocabulary). Answers mean nothing; memory and time are the real model's. Stages:

1. load: `load_model` in a fresh process: time, peak RSS while loading against the
   loaded model's bytes (no second copy of the weights: ≤ 1.15 ×);
2. categories: in that process, the job's own model (LoRA rank 16, adamw8bit) after one
   micro-batch and one optimizer step: bytes of weights, gradients and optimizer states
   against `memory_model.estimate_memory` for the same settings on CPU (fp32);
3. train: `mdsweep train`, batch 1, 2 optimizer steps, evaluation on 4 captchas,
   `--save-model`;
4. predict: `mdsweep predict` of the saved model on 4 captchas;
5. sweep: `mdsweep run` of 1 trial of 1 step (a Ray worker, checkpoint to storage, sink);
6. export: `mdsweep export --best` of that sweep, then `mdsweep predict` of the export.

Every CLI stage runs in its own process tree, whose resident memory is sampled every
0.2 s (peak of the largest process, peak of the tree). The table goes to stdout; the
checkpoint and every output are removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

GIB = 2 ** 30
ROOT = Path(__file__).resolve().parents[1]
LORA = ["--train-scope", "lora", "--lora-rank", "16", "--optimizer", "adamw8bit"]


def fabricate_checkpoint(directory: Path, seed: int = 0) -> int:
    """Seeded random fp16 weights at Moondream2's shapes, 2025 layout, made and written one tensor at a time;
    returns the file's bytes."""
    import torch

    from trainer.model.config import PRESETS
    from trainer.model.synth_tokenizer import write_bpe_tokenizer
    from trainer.model.config import WEIGHTS_FILE
    from trainer.model.layouts import key_mappings
    from trainer.model.weights import write_safetensors

    generator = torch.Generator().manual_seed(seed)

    def make(name: str, shape: tuple[int, ...]):
        def tensor() -> torch.Tensor:
            if ".ln" in name or "post_ln" in name:  # layer norms at identity
                return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=torch.float16)
            return (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
        return tensor

    entries = [(m.official, torch.float16, m.official_shape, make(m.official, m.official_shape))
               for m in key_mappings(PRESETS["moondream2"])]
    write_safetensors(directory / WEIGHTS_FILE, entries, metadata={"format": "pt"})
    write_bpe_tokenizer(directory)
    return (directory / WEIGHTS_FILE).stat().st_size


class TreeMemory:
    """Samples the resident memory of a process and its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.largest = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
            except psutil.Error:
                rss = []
            if rss:
                self.largest, self.tree = max(self.largest, max(rss)), max(self.tree, sum(rss))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class AnonymousPeak:
    """This process's peak anonymous memory (RssAnon: what it allocated, not file pages it maps), sampled every
    20 ms until stopped."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def stage(name: str, command: list[str], cwd: Path, rows: list[dict]) -> subprocess.CompletedProcess:
    """Run one CLI stage, timed and memory-sampled; stop the bench if it fails."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(process.pid)
    output, _ = process.communicate()
    memory.stop()
    seconds = time.perf_counter() - started
    rows.append({"stage": name, "seconds": seconds, "largest_rss": memory.largest, "tree_rss": memory.tree,
                 "rc": process.returncode})
    print(f"  {seconds:.0f} s, peak RSS {memory.largest / GIB:.2f} GiB (largest process), "
          f"{memory.tree / GIB:.2f} GiB (tree)", flush=True)
    if process.returncode != 0:
        print(output[-4000:], file=sys.stderr)
        raise SystemExit(f"stage {name} failed with exit {process.returncode}")
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def measure_in_process(model_dir: Path, data: Path) -> dict:
    """Stages 1 and 2 in this (fresh) process: load alone, then the job's model through one step."""
    import torch

    from trainer.model.config import PRESETS
    from trainer.job import accumulate_gradients, optimizer_step, prepare_model
    from trainer.parallel.ranks import current_ranks
    from trainer.parallel.replica import Replica
    from trainer.job_config import JobConfig
    from trainer.job_data import micro_batches, open_job_data, prepare_data
    from trainer.model.loading import load_model
    from trainer.memory.estimate import estimate_memory
    from trainer.memory.optimizers import build_optimizer
    from trainer.memory.precision import plan_precision

    torch.set_num_threads(os.cpu_count() or 1)
    before = psutil.Process().memory_info().rss
    anon = AnonymousPeak()
    started = time.perf_counter()
    loaded = load_model(str(model_dir))
    load_s = time.perf_counter() - started
    anon.stop()
    peak_loading = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    del loaded

    config = JobConfig(model=str(model_dir), train_data=str(data), batch_size=1, max_steps=1, max_val_samples=4,
                       train_scope="lora", lora_rank=16, optimizer="adamw8bit", precision="fp32", device="cpu")
    plan = plan_precision(config.precision, config.trained_dtype, config.frozen_dtype, on_gpu=False)
    job_model = prepare_model(config, plan)
    model = job_model.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    job_data = prepare_data(config, job_model, open_job_data(config))
    batch = next(micro_batches(job_data.train, 1, 0, 0, job_model.tokenizer.eos_id))
    optimizer = build_optimizer(config.optimizer, params, lr=1e-5, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step_started = time.perf_counter()
    accumulate_gradients(Replica(model, current_ranks(), config.parallel, torch.device("cpu")), [batch],
                         config.attention, scaler, torch.device("cpu"), None)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    optimizer_step(optimizer, scaler, params, 1.0, finite_loss=True)
    step_s = time.perf_counter() - step_started
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v))
    predicted = estimate_memory(config, PRESETS["moondream2"])
    return {"load_s": load_s, "rss_before_load": before, "peak_while_loading": peak_loading,
            "anonymous_peak_while_loading": anon.peak,
            "loaded_model_bytes": model_bytes, "one_micro_batch_step_s": step_s,
            "measured": {"weights": weights, "gradients": gradients, "optimizer_states": states},
            "predicted": {"weights": predicted.weights, "gradients": predicted.gradients,
                          "optimizer_states": predicted.optimizer_states},
            "trained_parameters": sum(p.numel() for p in params)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    parser.add_argument("--in-process", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(measure_in_process(Path(args.in_process[0]), Path(args.in_process[1]))))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="mdsweep-real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    mdsweep = [sys.executable, "-m", "orchestrator.cli"]
    env_note = f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.0f} GiB"
    rows: list[dict] = []
    try:
        from trainer.data.synth import synthesize

        started = time.perf_counter()
        size = fabricate_checkpoint(work / "moondream2-random")
        print(f"checkpoint: {size / GIB:.2f} GiB fp16 in {time.perf_counter() - started:.0f} s", flush=True)
        data = synthesize(16, work / "captchas.parquet", length=6, seed=0)
        model = work / "moondream2-random"

        done = stage("load + one step (in process)", [sys.executable, __file__, "--in-process", str(model), str(data)],
                     ROOT, rows)
        inproc = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(inproc), flush=True)
        stage("train (2 steps, eval on 4)",
              [*mdsweep, "train", "--model", str(model), "--train-data", str(data), *LORA, "--batch-size", "1",
               "--max-steps", "2", "--eval-every", "2", "--max-val-samples", "4", "--val-fraction", "0.25",
               "--out", str(work / "train"), "--save-model", str(work / "trained")], ROOT, rows)
        train_result = json.loads((work / "train" / "result.json").read_text())
        import pyarrow.parquet as pq

        step_seconds = [1 / r["samples_per_s"] for r in pq.read_table(work / "train" / "steps.parquet").to_pylist()]
        stage("predict (saved model, 4 captchas)",
              [*mdsweep, "predict", "--model", str(work / "trained"), "--data", str(data), "--limit", "4"], ROOT, rows)
        stage("sweep (1 trial, 1 step)",
              [*mdsweep, "run", "--name", "real-size", "--space", "smoke", "--num-samples", "1", "--model", str(model),
               "--train-data", str(data), "--batch-size", "1", "--max-steps", "1", "--max-val-samples", "4",
               "--set", "train_scope=lora", "--set", "optimizer=adamw8bit", "--set", "val_fraction=0.25",
               "--results", str(work / "results"), "--storage", str(work / "sweeps"), "--quiet"], ROOT, rows)
        stage("export (best trial)",
              [*mdsweep, "export", str(work / "results"), "--sweep", "real-size", "--best", "--out",
               str(work / "export")], ROOT, rows)
        export_bytes = sum(f.stat().st_size for f in (work / "export").iterdir())
        stage("predict (export, 4 captchas)",
              [*mdsweep, "predict", "--model", str(work / "export"), "--data", str(data), "--limit", "4"], ROOT, rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n## Real size on this machine ({env_note}), {time.strftime('%Y-%m-%d')}\n")
    print("| stage | wall s | peak RSS, largest process GiB | peak RSS, process tree GiB |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['stage']} | {row['seconds']:.0f} | {row['largest_rss'] / GIB:.2f} | "
              f"{row['tree_rss'] / GIB:.2f} |")
    ratio = inproc["peak_while_loading"] / inproc["loaded_model_bytes"]
    print(f"\nload: {inproc['load_s']:.1f} s; peak RSS while loading {inproc['peak_while_loading'] / GIB:.2f} GiB "
          f"for a {inproc['loaded_model_bytes'] / GIB:.2f} GiB model ({ratio:.2f} x; "
          f"{inproc['rss_before_load'] / GIB:.2f} GiB "
          f"before loading; anonymous memory peaked at {inproc['anonymous_peak_while_loading'] / GIB:.2f} GiB)")
    print(f"one micro-batch + optimizer step in process: {inproc['one_micro_batch_step_s']:.0f} s; "
          f"{inproc['trained_parameters'] / 1e6:.1f} M trained parameters (LoRA rank 16)")
    steps = train_result.get("final_metrics", {})
    print(f"train: outcome {train_result['outcome']}, {train_result['step']} steps in "
          f"{train_result['wall_time_s']:.0f} s "
          f"(job), samples/s {steps.get('samples_per_s', float('nan')):.3f}, job peak RSS "
          f"{train_result['peak_memory_bytes'] / GIB:.2f} GiB")
    print("train step times (batch 1, LoRA + adamw8bit, gradient checkpointing): "
          + ", ".join(f"{t:.0f} s" for t in step_seconds))
    print(f"export: {export_bytes / GIB:.2f} GiB on disk")
    print("\n| category | measured GiB | memory_model GiB (same settings, fp32) | ratio |")
    print("|---|---:|---:|---:|")
    for key, measured in inproc["measured"].items():
        predicted = inproc["predicted"][key]
        print(f"| {key} | {measured / GIB:.3f} | {predicted / GIB:.3f} | {measured / max(predicted, 1):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
