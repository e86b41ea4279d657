"""`mdsweep report` (one offline HTML page of a sweep) and `mdsweep study` (the sweep as an Optuna study)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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


def cmd_study(args: argparse.Namespace) -> int:
    from orchestrator.results.study import StudyError, build_study, study_storage

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
