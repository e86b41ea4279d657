"""The README's main command, measured: does the demo sweep learn, and what does each trial cost?

    python bench/demo_sweep.py                 # ~6-9 min on 2 CPU cores

Runs the same steps as the README (synthesize the 6-digit captchas, sweep the
shipped base it names on an embedded Ray, export the best trial), then
scores the base zero-shot and the export on *fresh* captchas of another seed.
Prints one row per trial (wall time, exact match and its 95 % interval) and the
totals; every figure comes from the Parquet results the sweep wrote.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_main_command() -> list[str]:
    """The README's second bash block (the main command), as separate shell commands."""
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")
    command = blocks[2].split("```")[0]
    return [c.strip() for c in command.replace("\\\n", " ").split("&&") if c.strip()]


def run(command: str, cwd: Path) -> str:
    print(f"$ {command}", flush=True)
    proc = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def score(model: str, data: Path, cwd: Path) -> str:
    out = run(f"mdsweep predict --model {shlex.quote(model)} --data {data} --show 0", cwd)
    return next(line for line in out.splitlines() if line.startswith("exact match"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where data and results go (default: temp dir)")
    parser.add_argument("--fresh", type=int, default=500, help="fresh 6-digit captchas (seed 99) to score on")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.time()
        commands = readme_main_command()
        for command in commands:
            sweep_out = run(command, work)
        total = time.time() - started
        print(sweep_out[sweep_out.find("Leaderboard"):], flush=True)

        trials = pq.read_table(work / "results" / "trials").to_pylist()
        print(f"{'trial':>8} {'attention':>9} {'lr':>9} {'accum':>5} {'samples':>7} {'wall s':>6} "
              f"{'exact match':>11} {'95 % interval':>15}")
        for t in sorted(trials, key=lambda t: (t["group_id"], t["member"])):
            print(f"{t['trial_id']:>8} {t['attention']:>9} {t['lr']:9.2e} {t['grad_accum']:5d} "
                  f"{t['final_samples_seen'] or 0:7d} {t['wall_time_s'] or 0:6.0f} "
                  f"{t['final_val_exact_match'] or 0:11.3f} "
                  f"[{t['final_val_exact_match_low'] or 0:.3f}, {t['final_val_exact_match_high'] or 0:.3f}]")
        print(f"README main command: {total:.0f} s in all (data generation, Ray start, {len(trials)} trials)")

        fresh = work / "fresh.parquet"
        run(f"mdsweep data synth --n {args.fresh} --length 6 --seed 99 --out {fresh}", work)
        run(f"mdsweep export results --sweep demo --best --out {work / 'best'} --force", work)
        base = next(c for c in commands if c.startswith("mdsweep run")).split("--model ")[1].split()[0]
        print(f"base {base} zero-shot on {args.fresh} fresh captchas: {score(base, fresh, work)}")
        print(f"best trial, exported, on the same captchas:  {score(str(work / 'best'), fresh, work)}")


if __name__ == "__main__":
    main()
