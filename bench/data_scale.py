"""A trial's data start-up at Moondream2's real geometry: time and peak host memory, with and without the cache.

    python bench/data_scale.py --sizes 1000 6000 20000 --concurrent 4 --concurrent-size 6000

No model is loaded: each row is a fresh process doing what a trial does with its
data before and during training, at the 378-pixel crop geometry (a 200x50 captcha
is 2 crops, 0.86 MB of uint8), then reading one epoch of batches of 8:

- `in memory`: the path before the cache (every sample loaded, cropped and kept in
  RAM: `load_samples` + `encode_samples`, as `predict` still does for its images);
- `cache, cold`: the first trial on a node: hashes the data, crops it into the
  cache, then streams batches from disk;
- `cache, warm`: every later trial: hashes the data and streams.

Columns: `start s` = process start (imports done) to first batch ready; `epoch s` =
reading the rest of the epoch; `peak RSS MiB` = the process's resident-set peak
(the page cache that holds the cache file is the kernel's, shared, and not in it);
`base MiB` = the same process with the imports only. The concurrent rows start N
trials at the same moment on an empty cache (one builds, the others wait and read).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolated import run_row, serve_row, worker_flag

BATCH = 8


def measure(spec: dict) -> dict:
    started = time.perf_counter()
    from trainer.data.batching import encode_samples
    from trainer.model.config import PRESETS
    from trainer.data.dataset import load_samples, split_samples
    from trainer.job_config import JobConfig
    from trainer.job_data import SampleView, micro_batches, open_job_data
    from trainer.model.loading import preset_tokenizer
    from trainer.model.tokenizer import get_template

    imported = time.perf_counter()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    while time.time() < spec.get("start_at", 0):  # concurrent rows start together
        time.sleep(0.001)
    begin = time.perf_counter()
    if spec["mode"] == "imports":
        return {"import_s": imported - started, "base_kib": base}
    config = JobConfig(model="moondream2", train_data=spec["data"], cache_dir=spec["cache"])
    tokenizer, template = preset_tokenizer("tiny"), get_template("moondream2-2025")
    if spec["mode"] == "memory":
        train, val = split_samples(load_samples(spec["data"]).samples, config.val_fraction, config.split_seed)
        vision = PRESETS["moondream2"].vision
        data = encode_samples(train, vision, tokenizer, template, config.question)
        encode_samples(val, vision, tokenizer, template, config.question)
    else:
        opened = open_job_data(config)
        prompt = tuple(template.prompt_ids(tokenizer, config.question))
        view = opened.train
        answers = [tuple(template.answer_ids(tokenizer, text)) for text in view.texts()]
        data = SampleView(view.store, view.rows, prompt, answers)
    stream = micro_batches(data, BATCH, 0, 0, tokenizer.eos_id)
    next(stream)
    ready = time.perf_counter()
    for _ in range(-(-len(data) // BATCH) - 1):
        next(stream)
    return {"start_s": ready - begin, "epoch_s": time.perf_counter() - ready, "base_kib": base,
            "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "samples": len(data)}


def run_together(script: str, specs: list[dict]) -> list[dict]:
    """Start one child per spec, all released at the same moment; their measurements."""
    start_at = time.time() + 5
    procs = [subprocess.Popen([sys.executable, script, "--worker", json.dumps({**spec, "start_at": start_at})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for spec in specs]
    outputs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(err.strip().splitlines()[-1])
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 6000, 20000], help="captchas per dataset")
    parser.add_argument("--memory-max", type=int, default=6000,
                        help="largest size the in-memory path is run at (20 000 captchas hold 17 GB in RAM)")
    parser.add_argument("--concurrent", type=int, default=4, help="trials started together on one node")
    parser.add_argument("--concurrent-size", type=int, default=6000, help="dataset size of the concurrent rows")
    parser.add_argument("--repeats", type=int, default=1, help="warm rows per size (median reported)")
    parser.add_argument("--workdir", type=Path, default=None, help="where datasets and caches go (default: a "
                                                                   "temporary directory, removed after)")
    worker_flag(parser)
    args = parser.parse_args()
    if serve_row(args, measure):
        return
    from trainer.data.synth import synthesize

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mdsweep-data-scale-"))
    script = str(Path(__file__).resolve())
    try:
        base = run_row(script, {"mode": "imports"})
        print(f"process with the imports only: {mib(base['base_kib'])} MiB peak RSS, {base['import_s']:.1f} s\n")
        print(f"{'samples':>8} {'path':>14} {'start s':>8} {'epoch s':>8} {'peak RSS MiB':>13} {'cache GiB':>10}")
        for n in sorted(set(args.sizes) | {args.concurrent_size}):
            data = workdir / f"captchas-{n}.parquet"
            if not data.exists():
                synthesize(n, data, seed=n, workers=os.cpu_count() or 1)
            cache = workdir / f"cache-{n}"
            rows = []
            if n <= args.memory_max:
                rows.append(("in memory", [run_row(script, {"mode": "memory", "data": str(data), "cache": ""})]))
            shutil.rmtree(cache, ignore_errors=True)  # cold means cold, also with a kept --workdir
            rows.append(("cache, cold", [run_row(script, {"mode": "cache", "data": str(data), "cache": str(cache)})]))
            rows.append(("cache, warm", [run_row(script, {"mode": "cache", "data": str(data), "cache": str(cache)})
                                         for _ in range(args.repeats)]))
            size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2 ** 30
            for name, results in rows:
                if any(isinstance(r, str) for r in results):
                    print(f"{n:>8} {name:>14}  failed: {next(r for r in results if isinstance(r, str))}")
                    continue
                med = lambda key: statistics.median(r[key] for r in results)  # noqa: E731
                print(f"{n:>8} {name:>14} {med('start_s'):>8.1f} {med('epoch_s'):>8.1f} {mib(med('peak_kib')):>13} "
                      f"{size if name != 'in memory' else 0:>10.2f}", flush=True)
            if n == args.concurrent_size:
                shutil.rmtree(cache)
                together = run_together(script, [{"mode": "cache", "data": str(data), "cache": str(cache)}
                                                 for _ in range(args.concurrent)])
                size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2 ** 30
                for i, r in enumerate(sorted(together, key=lambda r: r["start_s"])):
                    print(f"{n:>8} {f'{args.concurrent} together #{i + 1}':>14} {r['start_s']:>8.1f} "
                          f"{r['epoch_s']:>8.1f} {mib(r['peak_kib']):>13} {size:>10.2f}")
                print(f"{'':>8} {f'{args.concurrent} together':>14} {'':>8} {'':>8} "
                      f"{mib(sum(r['peak_kib'] for r in together)):>13} {'(total)':>10}")
            if not args.workdir:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
