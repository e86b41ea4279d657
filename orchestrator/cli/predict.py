"""`mdsweep predict`: read new images with any model (preset, shipped base, local directory, export).

With labelled data (any format `train` accepts) it also prints exact match with
its 95 % interval and the character error rate. An exported model's card supplies
the attention layout, question, prompt template and batch size its trial used,
so its answers on the trial's validation set are the ones the sweep recorded.
"""
from __future__ import annotations

import argparse
import sys
import time
import typing
from pathlib import Path

from trainer.model.choices import AttentionMode
from trainer.model.layouts import CheckpointError
from trainer.model.loading import load_model
from trainer.model.tokenizer import PROMPT_TEMPLATES

DEFAULT_SHOW = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="run a model on images or a dataset; exact match and CER when labels exist",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a directory from `mdsweep export`, a shipped model (tiny-reader), a preset, a local "
                             "official-layout directory or a hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="labelled data: a Parquet file/dir, an image folder named by label, or a "
                                       "JSONL/CSV manifest")
    source.add_argument("--images", nargs="+", metavar="PATH", help="unlabelled image files or folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="write every prediction to this .parquet or .csv file")
    parser.add_argument("--limit", type=int, default=None, help="predict only the first N samples")
    parser.add_argument("--show", type=int, default=DEFAULT_SHOW,
                        help=f"predictions to print (default {DEFAULT_SHOW}; 0: none, -1: all)")
    parser.add_argument("--attention", choices=typing.get_args(AttentionMode), default=None,
                        help="attention layout (default: the exported trial's, else prefix)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per decoding batch (default: the exported trial's, else 8)")
    parser.add_argument("--question", default=None, help="question asked (default: the trial's, else the "
                                                         "captcha question)")
    parser.add_argument("--prompt-template", choices=tuple(PROMPT_TEMPLATES), default=None,
                        help="prompt layout (default: the trial's, else the one that goes with the model's "
                             "tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: the trial's, "
                                                                         "else 16)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--revision", default=None, help="hub revision when --model is a hub id; a dated revision "
                                                         "also picks the tokenizer its official code used")
    parser.add_argument("--tokenizer", default=None, help="tokenizer: a directory holding tokenizer.json, a hub "
                                                          "id or id@revision (default: the model's own, else the "
                                                          "one its revision's official code used)")
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainer.data.dataset import DataError, load_samples, load_unlabelled_images
    from trainer.export import read_model_card
    from trainer.predict import PredictSettings, predict

    def fail(message: str) -> int:
        print(f"mdsweep predict: error: {message}", file=sys.stderr)
        return 2

    if args.out is not None and args.out.suffix.lower() not in (".parquet", ".csv"):
        return fail(f"--out {args.out}: give a .parquet or .csv file name")
    if args.limit is not None and args.limit < 1:
        return fail(f"--limit must be ≥ 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        return fail(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        return fail(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    try:
        samples = load_samples(args.data).samples if args.data else load_unlabelled_images(args.images)
        loaded = load_model(args.model, revision=args.revision, tokenizer=args.tokenizer)
    except (DataError, CheckpointError) as e:
        return fail(str(e))
    samples = samples[: args.limit] if args.limit else samples
    trial = read_model_card(Path(args.model)).get("job_config", {}) if Path(args.model).is_dir() else {}
    pick = lambda flag, key, default: flag if flag is not None else trial.get(key, default)  # noqa: E731
    settings = PredictSettings(
        attention=pick(args.attention, "attention", "prefix"), batch_size=pick(args.batch_size, "batch_size", 8),
        question=pick(args.question, "question", "What does the text say?"),
        prompt_template=pick(args.prompt_template, "prompt_template", None),
        max_new_tokens=pick(args.max_new_tokens, "max_new_tokens", 16), device=args.device)
    bar = tqdm(total=len(samples), desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        metrics, predictions = predict(loaded, samples, settings, on_batch=bar.update)
    except ValueError as e:
        bar.close()
        return fail(str(e))
    bar.close()
    seconds = time.perf_counter() - started
    labelled = args.data is not None
    shown = predictions if args.show < 0 else predictions[: args.show]
    for p in shown:
        verdict = ("ok  " if p.correct else "MISS") if labelled else ""
        print(f"{verdict} {p.prediction!r:>14}" + (f"  target {p.target!r}" if labelled else "") + f"  {p.sample_id}")
    if len(shown) < len(predictions):
        print(f"... {len(predictions) - len(shown)} more" + (f" in {args.out}" if args.out else " (--show -1, --out)"))
    print(f"{len(predictions)} images in {seconds:.1f} s ({len(predictions) / seconds:.0f} images/s), attention "
          f"{settings.attention}, model {args.model}")
    if labelled:
        print(f"exact match {metrics['val_exact_match']:.3f} [{metrics['val_exact_match_low']:.3f}, "
              f"{metrics['val_exact_match_high']:.3f}] (95 % Wilson interval, n={metrics['val_n']}), "
              f"CER {metrics['val_cer']:.3f}")
    if args.out is not None:
        write_predictions(predictions, args.out, labelled)
        print(f"predictions: {args.out}")
    return 0


def write_predictions(predictions: list, out: Path, labelled: bool) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    columns = {"sample_id": [p.sample_id for p in predictions], "prediction": [p.prediction for p in predictions]}
    if labelled:
        columns.update(target=[p.target for p in predictions], correct=[p.correct for p in predictions],
                       cer=[p.cer for p in predictions])
    table = pa.table(columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        pacsv.write_csv(table, out)
    else:
        pq.write_table(table, out)
