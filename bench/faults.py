"""The fault matrix: each fault a sweep can meet on one machine, injected several times, then recovered from.

    python bench/faults.py [--runs 3] [--faults sigint sigterm kill9 full-disk twice]

Each run is a real sweep on an embedded Ray (`smoke` space, 2 trials one at a time, 8 steps with an evaluation
every 2, tiny model): the fault is injected once the first evaluation has landed, the sweep is resumed when it
did not finish, and the results are checked against what the sweep should hold. Columns: `finished` = runs
whose sweep ended `finished` (after the recovery), `lost` / `duplicated` = step and prediction rows missing or
present twice, summed over the runs, `left` = processes of the sweep's process tree still alive 10 s after the
end, `exit codes` = the faulted command → its resume (for `twice`: the first driver → the second). Needs
root for `full-disk` (a tmpfs).

Faults: `sigint` (Ctrl-C), `sigterm`, `kill9` (the driver killed; resume takes over its lock), `full-disk`
(the results disk fills up mid-sweep, then is freed; resume puts back the rows), `twice` (a second driver
of the same sweep started while the first runs: refused; the first finishes).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.results.store import read_partition  # noqa: E402

FAULTS = ("sigint", "sigterm", "kill9", "full-disk", "twice")
STEPS = (2, 4, 6, 8)
VAL_SAMPLES = 4


def sweep_command(work: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "run", "--name", "fault", "--space", "smoke", "--num-samples",
            "2", "--max-concurrent", "1", "--num-cpus", "2", "--storage", str(work / "sweeps"), "--results",
            str(work / "results"), "--quiet", "--train-data", str(data), "--max-steps", str(STEPS[-1]),
            "--eval-every", "2", "--batch-size", "2", "--max-val-samples", str(VAL_SAMPLES), "--set",
            "max_new_tokens=5"]


class Tree:
    """The process tree of a command, sampled while it runs (Ray renames its agents, so they are followed by
    parentage, not by name)."""

    def __init__(self, root: int) -> None:
        self.root, self.seen = root, {}

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.root).children(recursive=True):
                self.seen.setdefault(p.pid, p)

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def run_once(fault: str, data: Path, work: Path) -> dict:
    results = work / "results"
    results.mkdir(parents=True)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT)}
    if fault == "full-disk":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(results)], check=True)
    exits = []
    try:
        # its own process group, SIGINT at its default (a shell's background job inherits it ignored)
        driver = subprocess.Popen(sweep_command(work, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=env, cwd=str(ROOT), start_new_session=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        tree = Tree(driver.pid)
        deadline = time.monotonic() + 300
        while not read_partition(results, "steps", "fault"):
            tree.sample()
            if driver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{fault}: the sweep ended before its first evaluation")
            time.sleep(0.1)
        tree.sample()
        if fault == "sigint":
            os.killpg(driver.pid, signal.SIGINT)
        elif fault == "sigterm":
            driver.send_signal(signal.SIGTERM)
        elif fault == "kill9":
            driver.send_signal(signal.SIGKILL)
        elif fault == "full-disk":
            with open(results / "filler", "wb") as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        elif fault == "twice":
            second = subprocess.run(sweep_command(work, data), capture_output=True, env=env, cwd=str(ROOT))
            exits.append(second.returncode)
        while driver.poll() is None:
            tree.sample()
            time.sleep(0.2)
        exits.insert(0, driver.returncode)
        if fault == "full-disk":
            (results / "filler").unlink()
        status = read_partition(results, "sweeps", "fault")[0].get("status")
        if status != "finished":
            resumed = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "resume", "fault", "--storage",
                                        str(work / "sweeps"), "--quiet"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env=env, cwd=str(ROOT))
            resume_tree = Tree(resumed.pid)
            while resumed.poll() is None:
                resume_tree.sample()
                time.sleep(0.2)
            exits.append(resumed.returncode)
            tree.seen.update(resume_tree.seen)
        time.sleep(10)
        left = tree.alive()
        for process in left:  # counted; ended so that the next run starts clean
            with contextlib.suppress(psutil.Error):
                process.kill()
        return {"finished": read_partition(results, "sweeps", "fault")[0].get("status") == "finished",
                **count_rows(results), "left": len(left), "exits": exits}
    finally:
        if fault == "full-disk":
            subprocess.run(["umount", "-l", str(results)])


def count_rows(results: Path) -> dict:
    """Rows lost and duplicated against what the sweep should hold: every trial's step rows and predictions."""
    trials = read_partition(results, "trials", "fault")
    expected_steps = {(t["trial_id"], s) for t in trials for s in STEPS} if len(trials) == 2 else set()
    steps = collections.Counter((s["trial_id"], s["step"]) for s in read_partition(results, "steps", "fault"))
    predictions = collections.Counter((p["trial_id"], p["sample_id"])
                                      for p in read_partition(results, "predictions", "fault"))
    lost = len(expected_steps - set(steps)) + (2 - len(trials)) * len(STEPS)
    lost += sum(max(0, VAL_SAMPLES - sum(1 for key in predictions if key[0] == t["trial_id"])) for t in trials)
    duplicated = sum(n - 1 for n in steps.values()) + sum(n - 1 for n in predictions.values())
    return {"lost": lost, "duplicated": duplicated}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each fault (default 3)")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS), help="which faults (default: all)")
    args = parser.parse_args()
    from trainer.data.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="mdsweep-faults-") as tmp:
        data = synthesize(96, Path(tmp) / "train.parquet", length=4, seed=0)
        print("| fault | runs | sweeps finished | rows lost | rows duplicated | processes left | exit codes |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for fault in args.faults:
            outcomes = [run_once(fault, data, Path(tmp) / f"{fault}-{i}") for i in range(args.runs)]
            exits = "; ".join(" → ".join(map(str, o["exits"])) for o in outcomes)
            print(f"| {fault} | {args.runs} | {sum(o['finished'] for o in outcomes)} | "
                  f"{sum(o['lost'] for o in outcomes)} | {sum(o['duplicated'] for o in outcomes)} | "
                  f"{sum(o['left'] for o in outcomes)} | {exits} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
