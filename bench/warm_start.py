"""Does `--warm-start` pay? A sweep widened after an earlier one, warm-started from it against cold, same seeds.

    python bench/warm_start.py                 # 5 seeds: 15 sweeps of 16 trials (about 15 minutes on 2 cores)
    python bench/warm_start.py --seeds 2       # a quicker look

For each seed: a first sweep of 16 trials over a narrow space (lr 1e-5..1e-3, grad_accum 1/2/4); then the space
a user widens to (lr 1e-6..1e-1, grad_accum 1/2/4/8) is searched twice with the same search seed: cold, and with
`--warm-start` from the first sweep. Every sweep is `mdsweep run` as users run it, attached to one
`ray.cluster_utils.Cluster`, with the torch-free stand-in job (`trainer.standin_job`: its objective peaks near
lr 3e-4, grad_accum 2). Trials are read back from the Parquet results in the order Optuna proposed them.

Prints, per arm, the median over seeds of: the trials needed to come within 1 % of the stand-in's optimum
(17 when a sweep never does), and the best objective after 4, 8 and 16 trials.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.results.store import read_partition  # noqa: E402
from trainer.standin_job import quality  # noqa: E402

STANDIN = "trainer.standin_job:run_standin_job"
TRIALS = 16
CHECKPOINTS = (4, 8, 16)
SPACES = """
def narrow(trial):
    return {"lr": trial.suggest_float("lr", 1e-5, 1e-3, log=True),
            "grad_accum": trial.suggest_categorical("grad_accum", [1, 2, 4])}


def wide(trial):
    return {"lr": trial.suggest_float("lr", 1e-6, 1e-1, log=True),
            "grad_accum": trial.suggest_categorical("grad_accum", [1, 2, 4, 8])}
"""
BUDGET = ["--max-steps", "4", "--eval-every", "2"]


def optimum() -> float:
    """The stand-in's best final objective, without its noise: at lr 10^-3.5 and grad_accum 2, at its last
    evaluation (trainer.standin_job.report_at)."""
    return quality(10 ** -3.5, 2) * (1 - math.exp(-3))


def sweep(address: str, work: Path, name: str, space: str, seed: int, env: dict[str, str], *extra: str) -> list[float]:
    """One `mdsweep run`; the objectives of its trials in the order Optuna proposed them."""
    argv = [sys.executable, "-m", "orchestrator.cli", "run", "--address", address, "--name", name, "--space",
            f"{work / 'spaces.py'}:{space}", "--num-samples", str(TRIALS), "--search-seed", str(seed), "--job-fn",
            STANDIN, "--train-data", str(work / "train.parquet"), *BUDGET, "--gpus-per-trial", "0",
            "--cpus-per-trial", "1", "--max-concurrent", "2", "--storage", str(work / "storage"), "--results",
            str(work / "results"), "--progress-interval", "0", "--quiet", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if done.returncode != 0:
        raise SystemExit(f"sweep {name} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    rows = sorted(read_partition(work / "results", "trials", name), key=lambda r: r["group_id"])
    return [r["objective"] if r["objective"] is not None else 0.0 for r in rows]


def trials_to_reach(values: list[float], target: float) -> int:
    return next((i for i, v in enumerate(values, 1) if v >= target), TRIALS + 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="search seeds, each a first sweep + cold + warm")
    parser.add_argument("--work", type=Path, default=None, help="where results go (default: a temporary dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mdsweep-warm-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "spaces.py").write_text(SPACES)

    from ray.cluster_utils import Cluster

    from trainer.data.synth import synthesize

    synthesize(8, work / "train.parquet", length=4, seed=0)
    os.environ["MDSWEEP_STANDIN_SECONDS"] = "0.05"  # the cluster's workers inherit it
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT)}
    target = 0.99 * optimum()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    arms: dict[str, list[list[float]]] = {"cold": [], "warm": []}
    try:
        for seed in range(args.seeds):
            sweep(cluster.address, work, f"first{seed}", "narrow", 100 + seed, env)
            arms["cold"].append(sweep(cluster.address, work, f"cold{seed}", "wide", seed, env))
            arms["warm"].append(sweep(cluster.address, work, f"warm{seed}", "wide", seed, env,
                                      "--warm-start", f"{work / 'results'}:first{seed}"))
            print(f"seed {seed}: cold reaches the target after {trials_to_reach(arms['cold'][-1], target)} "
                  f"trial(s), warm after {trials_to_reach(arms['warm'][-1], target)}", flush=True)
    finally:
        cluster.shutdown()

    print(f"\n{args.seeds} seed(s); target: within 1 % of the stand-in's optimum ({target:.4f}); "
          f"{TRIALS} trials per sweep; medians over seeds\n")
    print("| arm | trials to the target | " + " | ".join(f"best after {n}" for n in CHECKPOINTS) + " |")
    print("|---|---|" + "---|" * len(CHECKPOINTS))
    for arm, runs in arms.items():
        reach = statistics.median(trials_to_reach(r, target) for r in runs)
        bests = [statistics.median(max(r[:n]) for r in runs) for n in CHECKPOINTS]
        print(f"| {arm} | {reach:g} | " + " | ".join(f"{b:.4f}" for b in bests) + " |")
    print(f"\nresults in {work / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
