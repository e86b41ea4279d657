"""What the Parquet sink costs the driver per result, and what it keeps in memory, as a sweep grows.

    python bench/sink_scale.py                 # 100, 1 000 and 3 000 trials x 20 reports
    python bench/sink_scale.py --trials 200    # one size

`bench/scale.py` measures the whole driver on a simulated cluster, where Ray's own work and the machine's load
blur the sink's share. This drives the sink alone, the way Tune drives it (start, reports, a final report with
200 predictions, completion, a step end after each report), on a simulated clock: results arrive as C trials
reporting every S seconds would deliver them, so the trials file is rewritten as often as in a real sweep of
that length. It prints the sink's CPU per result, and (in a second pass) the memory it holds once every trial
has ended (Python objects by tracemalloc, plus Arrow's buffers) and the peak of the Python objects, for each size.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

import orchestrator.results.store as store  # noqa: E402
from orchestrator.sweep.sink import ParquetSink  # noqa: E402
from orchestrator.results.spaces import GROUP_KEY, MEMBER_KEY  # noqa: E402
from orchestrator.cluster.tune_internals import TrialView  # noqa: E402
from orchestrator.sweep.trainable import KIND_KEY, PREDICTIONS_KEY  # noqa: E402

FIXED = {"train_data": "/data/train.parquet", "model": "tiny-reader", "max_steps": 20, "eval_every": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drive(results: Path, trials: int, reports: int, concurrent: int, seconds: float, clock: Clock) -> ParquetSink:
    """One sweep's callbacks, `concurrent` trials at a time, each reporting `reports` times."""
    sink = ParquetSink(str(results), "scale", FIXED, ["lr", "grad_accum", "attention"], "val_exact_match", "max")
    sink.setup()
    tick = seconds / concurrent  # the gap between two results of the whole sweep
    started = 0
    live: list[tuple[TrialView, int]] = []
    while started < trials or live:
        while len(live) < concurrent and started < trials:
            trial = TrialView(f"{started:08x}", {"lr": 1e-4 * (1 + started % 7), "grad_accum": 2 ** (started % 4),
                                             "attention": ("causal", "prefix")[started % 2], GROUP_KEY: started // 2,
                                             MEMBER_KEY: started % 2})
            sink.on_trial_start(0, [], trial)
            live.append((trial, 0))
            started += 1
        trial, done = live.pop(0)
        step = done + 1
        clock.now += tick
        value = min(1.0, 0.04 * step)
        sink.on_trial_result(0, [], trial, {
            "step": step, "train_loss": 1.0 / step, "val_exact_match": value, "val_exact_match_low": value * 0.9,
            "val_exact_match_high": min(1.0, value * 1.1), "val_n": 500, "peak_memory_bytes": 10 ** 9,
            "outcome": "running", KIND_KEY: "eval", "node_id": "n", "node_ip": "10.0.0.1", "gpu_ids": "0",
            "training_iteration": step})
        if step == reports:
            sink.on_trial_result(0, [], trial, {
                "step": step, "val_exact_match": value, "outcome": "ok", KIND_KEY: "final", "job_wall_time_s": 1.0,
                "job_error": "", PREDICTIONS_KEY: {
                    "sample_id": [f"s{i}" for i in range(200)], "target": ["123456"] * 200,
                    "prediction": ["123456"] * 200, "correct": [True] * 200, "cer": [0.0] * 200}})
            sink.on_trial_complete(0, [], trial)
        else:
            live.append((trial, step))
        sink.on_step_end(0, [])
    sink.on_experiment_end([])
    return sink


def measure(trials: int, reports: int, concurrent: int, seconds: float) -> dict[str, float]:
    clock = Clock()
    store.time.monotonic = clock  # the trials file's interval (store.SweepWriter) runs on the simulated clock
    with tempfile.TemporaryDirectory(prefix="sink-scale-") as tmp:
        cpu = time.process_time()
        drive(Path(tmp) / "a", trials, reports, concurrent, seconds, clock)
        cpu = time.process_time() - cpu
        trials_files = len(list((Path(tmp) / "a" / "trials").rglob("*.parquet")))
        tracemalloc.start()
        arrow_before = pa.total_allocated_bytes()
        sink = drive(Path(tmp) / "b", trials, reports, concurrent, seconds, clock)
        held, peak = tracemalloc.get_traced_memory()  # held: what the sink keeps once every trial has ended
        held += pa.total_allocated_bytes() - arrow_before  # Arrow's own buffers, which tracemalloc does not see
        tracemalloc.stop()
        del sink
    return {"cpu_s": cpu, "ms_per_result": 1000 * cpu / (trials * reports), "peak_mib": peak / 2 ** 20,
            "held_mib": held / 2 ** 20, "trials_files": trials_files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, action="append", help="sweep size (repeatable; default 100, 1000, 3000)")
    parser.add_argument("--reports", type=int, default=20, help="reports per trial (default 20)")
    parser.add_argument("--concurrent", type=int, default=32, help="trials at once (default 32)")
    parser.add_argument("--seconds", type=float, default=0.5, help="seconds between a trial's reports (default 0.5)")
    args = parser.parse_args()
    sizes = args.trials or [100, 1000, 3000]
    print(f"{args.reports} reports per trial, {args.concurrent} at a time, {args.seconds} s between a trial's "
          "reports (simulated clock)\n")
    print("| trials | sink CPU s | CPU ms / result | held at the end MiB | peak Python MiB | trials files |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        m = measure(n, args.reports, args.concurrent, args.seconds)
        print(f"| {n} | {m['cpu_s']:.1f} | {m['ms_per_result']:.2f} | {m['held_mib']:.1f} | {m['peak_mib']:.1f} | "
              f"{m['trials_files']} |", flush=True)


if __name__ == "__main__":
    main()
