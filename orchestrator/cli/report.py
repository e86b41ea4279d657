"""`mdsweep report` (one offline HTML page of a sweep) and `mdsweep study` (the sweep as an Optuna study)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    report = _sweep_command(
        subparsers, "report", "write a sweep's report: one HTML file with its charts, opens offline",
        "One self-contained HTML file (no CDN, no server) with the sweep's summary, leaderboard, learning curves, "
        "the search, the paired attention comparison, setting importances, memory and throughput, and the best "
        "trial's misread samples. Works on a sweep still running: it shows what has landed.")
    report.add_argument("--out", type=Path, help="HTML file to write (default: RESULTS/report-SWEEP.html)")
    report.set_defaults(func=cmd_report)

    study = _sweep_command(
        subparsers, "study", "write a sweep as an Optuna study (for optuna-dashboard, optuna.visualization)",
        "Rebuild the sweep as an Optuna study named after it: one Optuna trial per proposal, with its parameters, "
        "distributions, state and value (the mean over a proposal's runs when it ran several times, as the "
        "searcher was told). A study of that name in STORAGE is replaced, so re-running gives the same study.")
    study.add_argument("--storage", required=True,
                       help="Optuna storage: a URL (sqlite:///sweeps.db, postgresql://...), a path ending in .log or "
                            ".jsonl for an Optuna journal file (much faster to write for large sweeps), or any other "
                            "path for a SQLite file")
    study.set_defaults(func=cmd_study)


def _sweep_command(subparsers: argparse._SubParsersAction, name: str, help: str,
                   description: str) -> argparse.ArgumentParser:
    """A command on one sweep of a results dataset: RESULTS and --sweep."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("results", metavar="RESULTS", help="the sweep's Parquet results directory (run --results)")
    parser.add_argument("--sweep", required=True, help="sweep name (run --name)")
    return parser


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.results.report_data import ReportError
    from orchestrator.results.report_html import default_report_path, write_report

    started = time.time()
    out = args.out or default_report_path(args.results, args.sweep)
    if out.is_dir():
        print(f"mdsweep report: error: --out {out} is a directory; give a file name", file=sys.stderr)
        return 2
    try:
        warnings = write_report(args.results, args.sweep, out)
    except (ReportError, OSError) as e:
        print(f"mdsweep report: error: {e}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"mdsweep report: warning: {warning}", file=sys.stderr)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, {time.time() - started:.1f} s); open it in a browser")
    return 0


JOURNAL_SUFFIXES = (".log", ".jsonl")


SQLITE_URL = "sqlite:///"
SQLITE_HEADER = b"SQLite format 3\x00"
OPTUNA_TABLES = {"studies", "trials", "version_info"}  # in every Optuna RDB schema


def study_storage(text: str) -> tuple[Any, str]:
    """The Optuna storage `--storage` names, and what to give optuna-dashboard to open it.

    A URL is taken as given. A path ending in .log or .jsonl is an Optuna journal file: one append per trial,
    where SQLite runs a query per intermediate value (a 1 000-trial sweep: 3.4 s against 21.5 s,
    bench/RESULTS.md). Any other path is a SQLite file there. An existing file (of a path or a sqlite:/// URL)
    must already be such a storage: see `check_storage_file`."""
    if text.startswith(SQLITE_URL):
        check_storage_file(Path(text[len(SQLITE_URL):]), journal=False)
    if "://" in text:
        return text, text
    path = Path(text).expanduser().resolve()
    journal = path.suffix in JOURNAL_SUFFIXES
    check_storage_file(path, journal)
    if journal:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(path))), str(path)
    url = f"{SQLITE_URL}{path}"
    return url, url


def check_storage_file(path: Path, journal: bool) -> None:
    """Raise ValueError unless `path` is new, empty, or already an Optuna journal (its first line one of Optuna's
    operations) or SQLite database (with Optuna's tables): Optuna appends its log to any file and adds its
    tables to any SQLite database, so a user's notes.jsonl or another program's database would be altered."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    kind = "journal" if journal else "database (SQLite)"
    with path.open("rb") as f:
        head = f.readline(1 << 20)
    if journal:
        try:
            ok = "op_code" in json.loads(head)
        except (ValueError, TypeError):  # not JSON, or not an object
            ok = False
    else:
        ok = head.startswith(SQLITE_HEADER)
        if ok:
            try:
                with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
                    tables = {name for (name,) in db.execute("select name from sqlite_master where type='table'")}
            except sqlite3.Error:
                tables = set()
            ok = OPTUNA_TABLES <= tables
    if not ok:
        raise ValueError(f"{path} exists and is not an Optuna {kind}, which the study would write into; give a "
                         "new file, or one an earlier `mdsweep study` wrote")


def cmd_study(args: argparse.Namespace) -> int:
    from orchestrator.results.study import StudyError, build_study

    try:
        storage, url = study_storage(args.storage)
    except OSError as e:  # a journal file that cannot be opened where it was asked for
        print(f"mdsweep study: error: --storage {args.storage}: {e.strerror or e}; give a file in a writable "
              "directory", file=sys.stderr)
        return 2
    except ValueError as e:  # an existing file that is not an Optuna storage
        print(f"mdsweep study: error: --storage {args.storage}: {e}", file=sys.stderr)
        return 2
    try:
        built = build_study(args.results, args.sweep, storage=storage)
    except (StudyError, OSError) as e:
        print(f"mdsweep study: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the storage itself: a bad URL, a database that cannot be opened
        # SQLAlchemy's messages go on with the statement and a link to its docs: the first line says it
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"mdsweep study: error: --storage {args.storage}: {type(e).__name__}: {first}", file=sys.stderr)
        return 2
    for note in built.notes:
        print(f"mdsweep study: {note}", file=sys.stderr)
    trials = built.study.trials
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "no trials"
    print(f"wrote study {args.sweep!r} to {url}: {len(trials)} proposal(s) ({counts})")
    if len(built.objectives) == 1 and states.get("COMPLETE"):
        best = built.study.best_trial
        print(f"best: proposal {best.user_attrs['group_id']} ({', '.join(best.user_attrs['trial_ids'])}), "
              f"{built.objectives[0][0]} {best.value:.4g}, {best.params}")
    print(f"open it: optuna-dashboard {url}")
    return 0
