"""How long `mdsweep run` takes to get going, for one or more checkouts of this project side by side (A vs B).

    python bench/sweep_start.py                                  # this checkout, 3 repeats
    python bench/sweep_start.py --checkouts /tmp/old . --repeats 3

Three commands, each a fresh `mdsweep run` on an embedded Ray as a user types it, on 96 synthetic captchas:

- `--dry-run`: the checks before any trial (model, data, space), Ray's start included;
- a 1-trial sweep of the tiny model, 4 steps, on one worker;
- the same sweep with `--workers-per-trial 2` (Ray Train: the trial starts a controller and two workers).

The checkouts alternate within each repeat, so a machine that slows down slows them alike. Prints a Markdown
table of the medians, in seconds of wall time, and the ratio of each checkout to the first.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

JOB = ["--max-steps", "4", "--eval-every", "2", "--batch-size", "2", "--max-val-samples", "4", "--set",
       "max_new_tokens=5", "--space", "smoke", "--num-samples", "1", "--quiet"]
COMMANDS = {
    "dry run": ["--dry-run", "--num-cpus", "2"],
    "1-trial sweep, 1 worker": ["--num-cpus", "2"],
    "1-trial sweep, 2 workers": ["--num-cpus", "3", "--cpus-per-trial", "1", "--workers-per-trial", "2"],
}


def timed_run(checkout: Path, extra: list[str], data: Path, work: Path) -> float:
    """Seconds of one `mdsweep run` from `checkout`, in a fresh folder of `work`; fails loudly if it fails."""
    folder = Path(tempfile.mkdtemp(dir=work))
    argv = [sys.executable, "-m", "orchestrator.cli", "run", "--name", "start", "--storage", str(folder / "s"),
            "--results", str(folder / "r"), "--train-data", str(data), *JOB, *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=checkout, env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin",
                                                    "HOME": str(folder), "TMPDIR": str(folder)},
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: {' '.join(extra)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkouts", nargs="+", type=Path, default=[ROOT],
                        help="project folders to time, the first being the baseline (default: this checkout)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command per checkout (default 3)")
    args = parser.parse_args()
    from trainer.data.synth import synthesize

    work = Path(tempfile.mkdtemp(prefix="sweep-start-"))
    data = synthesize(96, work / "train.parquet", length=4, seed=0)
    times: dict[tuple[str, Path], list[float]] = {}
    for repeat in range(args.repeats):
        for label, extra in COMMANDS.items():
            for checkout in args.checkouts:
                seconds = timed_run(checkout.resolve(), extra, data, work)
                times.setdefault((label, checkout), []).append(seconds)
                print(f"repeat {repeat + 1}: {checkout}: {label}: {seconds:.1f} s", file=sys.stderr, flush=True)
    first = args.checkouts[0]
    print("| command | " + " | ".join(str(c) for c in args.checkouts) + " |")
    print("|---|" + "---|" * len(args.checkouts))
    for label in COMMANDS:
        base = statistics.median(times[(label, first)])
        cells = [f"{statistics.median(times[(label, c)]):.1f}"
                 + ("" if c == first else f" ({statistics.median(times[(label, c)]) / base:.2f}x)")
                 for c in args.checkouts]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
