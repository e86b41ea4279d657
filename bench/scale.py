"""What the sweep driver costs at scale: N trials x R reports through `mdsweep run`, against bare Ray Tune.

    python bench/scale.py                  # 1 000 trials x 20 reports, 32 at a time (about an hour on 2 cores)
    python bench/scale.py --quick          # 200 trials (what the test runs, with --legs mdsweep)
    python bench/scale.py --legs mdsweep,logged,bare   # also the cost of --log-to (all three trackers)

Both legs run the same torch-free stand-in job (`trainer.standin_job`: reports only) on one simulated cluster
(`ray.cluster_utils.Cluster`, several nodes with logical GPUs, each trial a quarter of one, as users pack
them). The mdsweep leg is the CLI as users run it: `--cross attention`, the Parquet sink, the progress table,
the state backup and the report at the end. The bare leg is Ray Tune + OptunaSearch with the same TPE sampler
and seed, the same resources and no callbacks. Each leg is its own driver process, measured with wait4: wall
time, CPU seconds, peak RSS. Then the results are read back (query, report, study) and timed.

Prints a Markdown table; `--out DIR/scale.json` keeps the figures and the stand-in's expected reports for the
test that checks the tables row for row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPACE = '''
def space(trial):
    return {"lr": trial.suggest_float("lr", 1e-5, 1e-2, log=True),
            "grad_accum": trial.suggest_categorical("grad_accum", [1, 2, 4, 8])}
'''
STANDIN = "trainer.standin_job:run_standin_job"


def measured_run(argv: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run a driver process to its end: wall seconds, CPU seconds (user + system) and peak RSS in MiB, from
    wait4 on that process alone."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[2:4]} failed (exit {os.waitstatus_to_exitcode(status)}): see {log}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env, cwd=str(ROOT))
    return time.perf_counter() - started


def bare_space(trial: Any) -> None:
    """The bare leg's space: the mdsweep leg's, with attention searched (mdsweep crosses it: the same trial count)."""
    trial.suggest_float("lr", 1e-5, 1e-2, log=True)
    trial.suggest_categorical("grad_accum", [1, 2, 4, 8])
    trial.suggest_categorical("attention", ["causal", "prefix"])


def bare_leg(args: argparse.Namespace) -> None:
    """The reference: Ray Tune + OptunaSearch (same sampler, seed, resources and concurrency), no callbacks."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.cluster.connect import project_runtime_env

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(address=args.address, runtime_env=project_runtime_env(), log_to_driver=False)
    seconds, reports = args.seconds, args.reports

    def trainable(config: dict[str, Any]) -> None:
        from trainer.job_config import JobConfig
        from trainer.standin_job import report_at

        job = JobConfig(train_data="x", lr=config["lr"], grad_accum=config["grad_accum"],
                        attention=config["attention"], max_steps=reports, eval_every=1)
        for evaluation in range(1, reports + 1):
            time.sleep(seconds)
            tune.report(report_at(job, evaluation, reports))

    searcher = OptunaSearch(space=bare_space, metric="val_exact_match", mode="max",
                            sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "gpu": args.gpu_share}),
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=args.concurrent),
                                    num_samples=args.trials, reuse_actors=False),
        run_config=tune.RunConfig(name="bare", storage_path=str(args.out / "bare-storage"), verbose=0))
    results = tuner.fit()
    print(f"bare Tune: {len(results)} trials")


def suggest_times(trials: int) -> tuple[float, float]:
    """Optuna TPE's mean ask() time over the first and the last 100 of `trials` proposals (ms), same sampler."""
    import optuna

    from trainer.standin_job import quality

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True))
    times = []
    for _ in range(trials):
        started = time.perf_counter()
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        grad_accum = trial.suggest_categorical("grad_accum", [1, 2, 4, 8])
        times.append(time.perf_counter() - started)
        study.tell(trial, quality(lr, grad_accum))
    window = min(100, trials)
    return 1000 * sum(times[:window]) / window, 1000 * sum(times[-window:]) / window


def parquet_sizes(results: Path) -> dict[str, tuple[int, int]]:
    return {table.name: (len(files := list(table.rglob("*.parquet"))), sum(f.stat().st_size for f in files))
            for table in sorted(results.iterdir()) if table.is_dir() and table.name != "logs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="trials per leg (default 1000; --quick: 200)")
    parser.add_argument("--reports", type=int, default=20, help="reports per trial (default 20)")
    parser.add_argument("--concurrent", type=int, default=32, help="trials at once (default 32)")
    parser.add_argument("--seconds", type=float, default=0.5, help="seconds between a trial's reports (default 0.5)")
    parser.add_argument("--nodes", type=int, default=4, help="simulated nodes (default 4)")
    parser.add_argument("--gpu-share", type=float, default=0.25, help="logical GPU per trial (default 0.25)")
    parser.add_argument("--legs", default="mdsweep,bare", help="which drivers to run: mdsweep, logged (mdsweep "
                        "with --log-to mlflow, wandb and tensorboard), bare (default mdsweep,bare)")
    parser.add_argument("--quick", action="store_true", help="200 trials")
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of the mdsweep driver here")
    parser.add_argument("--out", type=Path, default=None, help="work directory, new or empty (default: a new "
                                                                "temporary one)")
    parser.add_argument("--bare-leg", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.trials = args.trials or (200 if args.quick else 1000)
    if args.bare_leg:
        return bare_leg(args)
    if args.trials % 2:
        raise SystemExit("--trials: an even number (every proposal runs under both attention layouts)")
    args.out = args.out or Path(tempfile.mkdtemp(prefix="mdsweep-scale-"))
    if args.out.is_dir() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out}: not empty (an earlier run?); give a new directory")
    args.out.mkdir(parents=True, exist_ok=True)
    legs = args.legs.split(",")

    from ray.cluster_utils import Cluster

    from trainer.data.synth import synthesize

    train = synthesize(8, args.out / "train.parquet", length=4, seed=0)
    (args.out / "scale_space.py").write_text(SPACE)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT),
           "MDSWEEP_STANDIN_SECONDS": str(args.seconds)}
    os.environ["MDSWEEP_STANDIN_SECONDS"] = str(args.seconds)  # the cluster's workers inherit it
    per_node = -(-args.concurrent // args.nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node, "num_gpus": per_node,
                                                             "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=per_node, num_gpus=per_node)
    cluster.wait_for_nodes()
    figures: dict[str, Any] = {"trials": args.trials, "reports": args.reports, "concurrent": args.concurrent,
                               "seconds": args.seconds, "nodes": args.nodes, "ideal_s": args.trials / args.concurrent
                               * args.reports * args.seconds}
    results = args.out / "results"
    def mdsweep_leg(name: str, extra: list[str]) -> dict[str, float]:
        profile = ["-m", "cProfile", "-o", str(args.profile)] if args.profile and name == "scale" else []
        return measured_run(
            [sys.executable, *profile, "-m", "orchestrator.cli", "run", "--address", cluster.address, "--name", name,
             "--space", f"{args.out / 'scale_space.py'}:space", "--cross", "attention",
             "--num-samples", str(args.trials // 2), "--job-fn", STANDIN, "--train-data", str(train),
             "--max-steps", str(args.reports), "--eval-every", "1", "--gpus-per-trial", str(args.gpu_share),
             "--cpus-per-trial", "1", "--max-concurrent", str(args.concurrent), "--storage",
             str(args.out / "storage"), "--results", str(results), "--progress-interval", "30", *extra],
            env, args.out / f"{name}.log")

    try:
        if "mdsweep" in legs:
            print(f"mdsweep leg: {args.trials} trials x {args.reports} reports, {args.concurrent} at a time ...",
                  flush=True)
            figures["mdsweep"] = mdsweep_leg("scale", [])
        if "logged" in legs:  # the same sweep, every trial also logged to all three trackers (W&B offline)
            print("mdsweep leg with --log-to mlflow, wandb and tensorboard ...", flush=True)
            env["WANDB_MODE"] = "offline"
            figures["logged"] = mdsweep_leg("scale-logged", [
                "--log-to", f"mlflow=sqlite:///{args.out / 'mlflow.db'}", "--log-to", f"wandb={args.out / 'wandb'}",
                "--log-to", f"tensorboard={args.out / 'tensorboard'}"])
        if "bare" in legs:
            print("bare Ray Tune leg ...", flush=True)
            figures["bare"] = measured_run(
                [sys.executable, str(Path(__file__).resolve()), "--bare-leg", "--address", cluster.address,
                 "--trials", str(args.trials), "--reports", str(args.reports), "--concurrent", str(args.concurrent),
                 "--seconds", str(args.seconds), "--gpu-share", str(args.gpu_share), "--out", str(args.out)],
                env, args.out / "bare.log")
    finally:
        cluster.shutdown()
    if "mdsweep" in legs:
        mdsweep = [sys.executable, "-m", "orchestrator.cli"]
        figures["query_s"] = timed([*mdsweep, "query", str(results), "--sweep", "scale"], env)
        figures["query_where_s"] = timed([*mdsweep, "query", str(results), "--sweep", "scale", "--where",
                                          "lr < 1e-3 and grad_accum == 2"], env)
        figures["query_paired_s"] = timed([*mdsweep, "query", str(results), "--sweep", "scale", "--paired",
                                           "attention"], env)
        report = args.out / "report.html"
        rendered = measured_run([*mdsweep, "report", str(results), "--sweep", "scale", "--out", str(report)], env,
                                args.out / "report.log")
        figures["report_s"], figures["report_rss_mib"] = rendered["wall_s"], rendered["peak_rss_mib"]
        figures["report_mb"] = report.stat().st_size / 1e6
        figures["study_s"] = timed([*mdsweep, "study", str(results), "--sweep", "scale", "--storage",
                                    str(args.out / "study.db")], env)
        (args.out / "study.db").unlink()
        figures["parquet"] = parquet_sizes(results)
    figures["suggest_ms_first_last"] = suggest_times(args.trials)
    (args.out / "scale.json").write_text(json.dumps(figures, indent=1))
    print_table(figures)


def print_table(f: dict[str, Any]) -> None:
    results = f["trials"] * f["reports"]
    print(f"\n{f['trials']} trials x {f['reports']} reports, {f['concurrent']} at a time on {f['nodes']} nodes, "
          f"{f['seconds']} s between reports (ideal wall time {f['ideal_s']:.0f} s)\n")
    print("| driver | wall s | CPU s | CPU ms / result | CPU ms / trial | results/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for leg in ("mdsweep", "logged", "bare"):
        if leg in f:
            m = f[leg]
            print(f"| {'mdsweep --log-to x3' if leg == 'logged' else leg} | {m['wall_s']:.0f} | {m['cpu_s']:.0f} | {1000 * m['cpu_s'] / results:.2f} | "
                  f"{1000 * m['cpu_s'] / f['trials']:.0f} | {results / m['wall_s']:.0f} | {m['peak_rss_mib']:.0f} |")
    if "mdsweep" in f and "bare" in f:
        print(f"\nwall time mdsweep / bare Tune: {f['mdsweep']['wall_s'] / f['bare']['wall_s']:.2f}")
    if "logged" in f:
        for leg in ("mdsweep", "bare"):
            if leg in f:
                print(f"wall time mdsweep with --log-to mlflow, wandb, tensorboard / {leg}: "
                      f"{f['logged']['wall_s'] / f[leg]['wall_s']:.2f}")
    first, last = f["suggest_ms_first_last"]
    print(f"Optuna TPE ask(): {first:.1f} ms over the first 100 proposals, {last:.1f} ms over the last 100")
    if "parquet" in f:
        print("\n| table | files | MB |\n|---|---|---|")
        for table, (files, size) in f["parquet"].items():
            print(f"| {table} | {files} | {size / 1e6:.2f} |")
        print(f"\nquery {f['query_s']:.2f} s, --where {f['query_where_s']:.2f} s, --paired {f['query_paired_s']:.2f} s; "
              f"report {f['report_s']:.1f} s ({f['report_mb']:.1f} MB, peak RSS {f.get('report_rss_mib', 0):.0f} MiB "
              f"on its own; the sweep's driver renders it too); study {f['study_s']:.1f} s")


if __name__ == "__main__":
    main()
