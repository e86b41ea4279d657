"""Users' own captchas: does a base learn captcha styles it never saw in pretraining? (issue 34)

    nice -n 19 python bench/own_captchas.py --model tiny-reader-v2          # ~10-20 min a style on 2 cores
    python bench/own_captchas.py --model models/tiny-reader-v3 --styles claptcha19

Why: the demo's captchas come from the renderer the shipped base was pretrained on, so its held-out figure says
little about the captchas a user brings. For each style of `bench/own_captchas_venv.py` (other generators,
fonts, alphabets and lengths, all kept out of pretraining) this makes 6 000 training, 500 validation and 500
held-out test images as folders of PNGs named by label (the layout of the most-used public captcha set), checks
the training folder with `mdsweep data check`, and runs the README's main command on them with only the paths,
`--model` and the names changed. It prints one row per style: the best trial's held-out exact match with its
95 % interval and CER, and the zero-shot exact match of an off-the-shelf OCR (ddddocr) on the same held-out
images.

The generators and ddddocr live in their own virtual environment (`--venv`; how to make it is in
bench/own_captchas_venv.py), called as subprocesses: they are not dependencies of the project. ddddocr is scored
both as it answers and ignoring case (it often answers in lower case; the second is the generous figure).
Data, sweeps and results go under `--workdir` (default runs/own-captchas, git-ignored); a style's images are
made once and reused for every base. Run it under `nice` on a shared machine: the children inherit it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("claptcha19", "multicolor-hex", "easy-letters")
HELPER = ROOT / "bench" / "own_captchas_venv.py"


def run(command: list[str], log: Path | None = None) -> str:
    """Run `command`, print it, and return its stdout; stop the bench with its output if it fails."""
    print("$ " + " ".join(command), flush=True)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def make_style(venv_python: Path, style: str, data: Path, counts: tuple[int, int, int]) -> None:
    """The style's train/val/test folders, made once (a `.done` marker says they are complete)."""
    if (data / ".done").is_file():
        return
    run([str(venv_python), str(HELPER), "generate", style, str(data), "--counts", *map(str, counts)])
    (data / ".done").write_text(json.dumps({"counts": counts}))


def sweep(style: str, model: str, data: Path, work: Path, name: str) -> dict:
    """The README's main command on the style's folders; returns the best trial's row (chosen on validation,
    tested once on the held-out folder) and the sweep's wall time."""
    import pyarrow.parquet as pq

    command = [
        "mdsweep", "run", "--name", name, "--model", model, "--results", str(work / "results"),
        "--storage", str(work / "sweeps"), "--train-data", str(data / "train"), "--val-data", str(data / "val"),
        "--test-data", str(data / "test"), "--space", "demo:paired", "--cross", "attention", "--num-samples", "2",
        "--search-seed", "6", "--max-samples", "12000", "--eval-every-samples", "3000", "--batch-size", "16",
        "--set", "train_scope=all", "--set", "gradient_checkpointing=false"]
    started = time.time()
    run(command, log=work / f"{name}.log")
    wall = time.time() - started
    trials = [t for t in pq.read_table(work / "results" / "trials").to_pylist() if t["sweep"] == name]
    tested = [t for t in trials if t.get("test_exact_match") is not None]
    if not tested:
        sys.exit(f"{name}: no trial was tested on the held-out folder (see {work / (name + '.log')})")
    best = max(tested, key=lambda t: t["final_val_exact_match"] or 0)
    return {"trials": len(trials), "ok": sum(t["outcome"] == "ok" for t in trials), "wall_s": round(wall),
            "lr": best["lr"], "grad_accum": best["grad_accum"], "attention": best["attention"],
            "val_exact": best["final_val_exact_match"], **{k: best[k] for k in (
                "test_exact_match", "test_exact_match_low", "test_exact_match_high", "test_cer", "test_n")}}


def ocr_zero_shot(venv_python: Path, folder: Path) -> dict:
    """ddddocr on the held-out folder: exact match as it answers and ignoring case, with intervals, and CER."""
    from trainer.evaluation.metrics import character_error_rate, wilson_interval

    readings = json.loads(run([str(venv_python), str(HELPER), "ocr", str(folder)]).strip().splitlines()[-1])
    labels = {name: Path(name).stem for name in readings}
    n = len(readings)
    exact = sum(readings[k] == labels[k] for k in readings)
    nocase = sum(readings[k].lower() == labels[k].lower() for k in readings)
    return {"n": n, "exact": exact / n, "exact_interval": wilson_interval(exact, n),
            "exact_nocase": nocase / n, "exact_nocase_interval": wilson_interval(nocase, n),
            "cer": sum(character_error_rate(readings[k], labels[k]) for k in readings) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-reader-v2", help="the base to fine-tune (name or directory)")
    parser.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES), help="styles to run")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "own-captchas",
                        help="data, sweeps, results and logs (default runs/own-captchas)")
    parser.add_argument("--venv", type=Path, default=Path("/work/ddddocr-venv"),
                        help="the virtual environment with the generators and ddddocr")
    parser.add_argument("--counts", type=int, nargs=3, default=(6000, 500, 500), metavar=("TRAIN", "VAL", "TEST"))
    args = parser.parse_args()
    venv_python = args.venv / "bin" / "python"
    if not venv_python.is_file():
        parser.error(f"no {venv_python}: make the environment as bench/own_captchas_venv.py says")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.model).name
    rows = []
    for style in args.styles:
        data = work / "data" / style
        make_style(venv_python, style, data, tuple(args.counts))
        print(run(["mdsweep", "data", "check", str(data / "train")]), flush=True)
        ocr = ocr_zero_shot(venv_python, data / "test")
        result = sweep(style, args.model, data, work, f"own-{style}-{base}")
        rows.append({"style": style, "base": base, **result, "ddddocr": ocr})
        (work / f"summary-{base}.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{'style':<15} {'base':<15} {'held-out exact [95 %]':<24} {'CER':>5} {'ddddocr exact':>13} "
          f"{'(no case)':>9} {'trials ok':>9} {'wall s':>6}")
    for r in rows:
        interval = f"[{r['test_exact_match_low']:.3f}, {r['test_exact_match_high']:.3f}]"
        print(f"{r['style']:<15} {r['base']:<15} {r['test_exact_match']:.3f} {interval:<18} {r['test_cer']:5.3f} "
              f"{r['ddddocr']['exact']:13.3f} {r['ddddocr']['exact_nocase']:9.3f} "
              f"{r['ok']:>5}/{r['trials']:<3} {r['wall_s']:6d}")


if __name__ == "__main__":
    main()
