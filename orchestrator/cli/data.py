"""`mdsweep data ...`: make and check datasets.

- `mdsweep data synth --n 6000 --out captchas.parquet`: seeded synthetic captchas
  (Parquet, Hugging Face layout: `image` {bytes, path} + `solution`).
- `mdsweep data check PATH`: load a dataset the way a trial would and summarise it.
- `mdsweep data prepare PATH... --model M`: build this node's preprocessing cache entries (crops made once,
  read from disk by every trial) ahead of a sweep.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from orchestrator.cluster.resources import format_size
from trainer.data.synth import synthesize
from trainer.job_config import JobConfig
from trainer.model.config import model_config_of
from trainer.model.layouts import CheckpointError
from trainer.model.loading import model_text
from trainer.model.tokenizer import get_template


def register(subparsers: Any) -> None:
    data = subparsers.add_parser(
        "data",
        help="make synthetic captcha datasets and check datasets",
        description="Make synthetic captcha datasets and check datasets before a sweep.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    synth = commands.add_parser(
        "synth",
        help="generate seeded captchas into a Parquet file",
        description=(
            "Generate captchas with the `captcha` package, fully determined by --seed, into one "
            "Parquet file in the Hugging Face layout (columns: image {bytes, path}, solution). "
            "Defaults mimic a common public set: 200x50 images of 6 digits."
        ),
    )
    synth.add_argument("--n", type=int, default=1000, help="number of captchas to generate (default: %(default)s)")
    synth.add_argument("--out", required=True, metavar="FILE.parquet",
                       help="output Parquet file (written to a temporary name, then renamed)")
    synth.add_argument("--length", type=int, default=6, help="characters per captcha (default: %(default)s)")
    synth.add_argument("--alphabet", default="0123456789", help="characters to draw labels from (default: %(default)s)")
    synth.add_argument("--width", type=int, default=200, help="image width in pixels (default: %(default)s)")
    synth.add_argument("--height", type=int, default=50, help="image height in pixels (default: %(default)s)")
    synth.add_argument("--fonts", nargs="+", metavar="TTF", default=None,
                       help="TrueType font files to draw with (default: the captcha package's bundled font)")
    synth.add_argument("--seed", type=int, default=0,
                       help="random seed; the same seed and options give byte-identical output (default: %(default)s)")
    synth.add_argument("--workers", type=int, default=1,
                       help="processes to render with; output is identical for any value (default: %(default)s)")
    synth.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    synth.set_defaults(func=_synth)

    check = commands.add_parser(
        "check",
        help="load a dataset as a trial would and summarise it",
        description=(
            "Load a dataset (Parquet file or folder, image folder named by labels, or a .jsonl/.csv "
            "manifest), decode every image, and print what was found. Exits 1 if it cannot be used."
        ),
    )
    check.add_argument("path", help="dataset path")
    check.add_argument("--text-column", default=None,
                       help="text column (default: the first of solution, text, label)")
    check.add_argument("--image-column", default=None,
                       help="image column (default: image, else the first struct/binary column)")
    check.add_argument("--split", default=None, help="split to load from a Parquet folder holding several")
    check.add_argument("--skip-bad", action="store_true",
                       help="skip and count bad rows (corrupt image, empty label, a label the model cannot write) "
                            "instead of failing")
    check.add_argument("--model", default=JobConfig.model,
                       help="the model whose tokenizer and context the labels must fit, as for train and run "
                            f"(default: {JobConfig.model})")
    for name in ("revision", "tokenizer", "prompt_template", "question"):
        default = JobConfig.question if name == "question" else None
        check.add_argument(f"--{name.replace('_', '-')}", default=default,
                           help=JobConfig.__dataclass_fields__[name].metadata["help"]
                           + (f" (default: {default!r})" if default else ""))
    check.set_defaults(func=_check)

    prepare = commands.add_parser(
        "prepare",
        help="crop datasets into this node's preprocessing cache ahead of a sweep",
        description=(
            "Crop every image of each dataset at the model's geometry into the preprocessing cache, as the "
            "first trial on a node would. Every trial on this node that reads the same data for a model of the "
            "same geometry then reads the crops from disk instead of making them. An entry that already exists "
            "and passes its checks is kept; a truncated or altered one is rebuilt. Each node of a cluster has "
            "its own cache unless --cache-dir is on a shared filesystem."
        ),
    )
    prepare.add_argument("paths", nargs="+", metavar="PATH", help="datasets (train, validation, test)")
    prepare.add_argument("--model", default=JobConfig.model,
                         help="the model the sweep trains, for its crop geometry: a preset, a local directory or "
                              "a hub id (default: %(default)s, as for mdsweep run)")
    prepare.add_argument("--cache-dir", default=None,
                         help="cache directory (default: $MDSWEEP_CACHE_DIR, else ~/.cache/mdsweep/crops), as "
                              "--cache-dir of run and train")
    prepare.add_argument("--text-column", default=None, help="text column, as for the sweep (default: the first "
                                                             "of solution, text, label)")
    prepare.add_argument("--image-column", default=None, help="image column, as for the sweep")
    prepare.add_argument("--skip-bad", action="store_true",
                         help="skip and count bad rows, as a sweep with --set on_bad_sample=skip does (the entry "
                              "is only used by jobs that skip too)")
    prepare.set_defaults(func=_prepare)


class _Progress:
    """Progress lines on stderr, at most one a second, for runs that take a while."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.start = time.monotonic()
        self.last = self.start

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 1.0 and done < total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        print(f"synth: {done}/{total} ({100 * done // total}%), {rate:.0f}/s, about {eta:.0f}s left",
              file=sys.stderr, flush=True)


def _synth(args: argparse.Namespace) -> int:
    progress = _Progress(args.n, enabled=not args.quiet and args.n >= 500)
    started = time.monotonic()
    try:
        out = synthesize(
            args.n, args.out, length=args.length, alphabet=args.alphabet, width=args.width,
            height=args.height, fonts=args.fonts, seed=args.seed, workers=args.workers,
            progress=progress,
        )
    except ValueError as exc:
        print(f"mdsweep data synth: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mdsweep data synth: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"synth: wrote {args.n} captchas in {time.monotonic() - started:.1f}s", file=sys.stderr)
    print(out)
    return 0


def _check(args: argparse.Namespace) -> int:
    from trainer.data.dataset import DataError, load_samples

    try:
        loaded = load_samples(
            args.path, text_column=args.text_column, image_column=args.image_column,
            on_bad_sample="skip" if args.skip_bad else "error", split=args.split,
        )
    except DataError as exc:
        print(f"mdsweep data check: error: {exc}", file=sys.stderr)
        return 1
    try:
        unwritable = labels_the_model_cannot_write(loaded.samples, args)
    except (CheckpointError, ValueError) as exc:
        print(f"mdsweep data check: error: --model {args.model}: {exc}", file=sys.stderr)
        return 1
    if unwritable and not args.skip_bad:
        sample_id, why = unwritable[0]
        print(f"mdsweep data check: error: sample {sample_id}: {why} ({len(unwritable)} such label(s) for model "
              f"{args.model}; --skip-bad drops and counts them, as --on-bad-sample skip does in training)",
              file=sys.stderr)
        return 1
    dropped = {sample_id for sample_id, _ in unwritable}
    samples = [s for s in loaded.samples if s.sample_id not in dropped]
    if not samples:
        print(f"mdsweep data check: error: no sample left: model {args.model} can write none of the labels",
              file=sys.stderr)
        return 1
    lengths = Counter(len(s.text) for s in samples)
    chars = sorted(set("".join(s.text for s in samples)))
    first = samples[0].image
    print(f"source:   {loaded.source}")
    print(f"samples:  {len(samples)}")
    print(f"skipped:  {loaded.skipped + len(unwritable)}")
    for reason in [*loaded.skipped_reasons, *(f"sample {i}: {why}" for i, why in unwritable[:10])]:
        print(f"  - {reason}")
    print("lengths:  " + ", ".join(f"{k}: {v}" for k, v in sorted(lengths.items())))
    print(f"charset:  {''.join(chars)!r} ({len(chars)} characters)")
    print(f"first:    {samples[0].sample_id} -> {samples[0].text!r}, {first.size[0]}x{first.size[1]}")
    return 0


def labels_the_model_cannot_write(samples: list, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(sample id, why) for every label the model's tokenizer cannot encode, or that does not fit the context
    left after BOS, the image tokens and the prompt: the labels a trial would refuse, found here first."""
    from trainer.job_data import answer_ids, answer_room

    text = model_text(args.model, revision=args.revision, tokenizer=args.tokenizer)
    template = get_template(args.prompt_template or text.choice.template)
    room = answer_room(text.config, template.prompt_ids(text.tokenizer, args.question))
    found = []
    for sample in samples:
        _ids, why = answer_ids(sample.text, text.tokenizer, template, room)
        if why:
            found.append((sample.sample_id, why))
    return found


def _prepare(args: argparse.Namespace) -> int:
    from trainer.data.crop_cache import ReadOptions, geometry_of, open_cached
    from trainer.data.dataset import DataError

    vision = model_config_of(args.model).vision
    read = ReadOptions(args.text_column, args.image_column, "skip" if args.skip_bad else "error")
    geometry = ", ".join(f"{k} {v}" for k, v in geometry_of(vision).items())
    print(f"model {args.model}: {geometry}")
    for path in args.paths:
        started = time.monotonic()
        try:
            store = open_cached(path, vision, read, Path(args.cache_dir) if args.cache_dir else None)
        except DataError as exc:
            print(f"mdsweep data prepare: error: {exc}", file=sys.stderr)
            return 1
        meta = store.meta
        skipped = f", {meta['skipped']} bad rows skipped" if meta["skipped"] else ""
        print(f"{path}: {len(store)} samples{skipped}, {format_size(meta['crops_bytes'])} of crops "
              f"in {store.directory} (ready in {time.monotonic() - started:.1f} s)")
    return 0
