"""`mdsweep query`: tables from the Parquet results, without Ray."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.results.objectives import parse_objective, pareto_front


def register(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser(
        "query", help="print tables from a Parquet results dataset (filter, group, sort, paired comparison)",
        description="Read RESULTS (the --results directory of `mdsweep run`) and print a table. Filters use a "
                    "small safe expression form: comparisons (==, !=, <, <=, >, >=, in, is None), arithmetic, "
                    "and/or/not, column names and constants, e.g. "
                    "--where \"attention == 'prefix' and lr < 1e-4\".")
    q.add_argument("results", metavar="RESULTS", help="the results dataset directory")
    q.add_argument("--table", choices=("trials", "steps", "predictions", "sweeps"), default="trials",
                   help="which table (default trials: one row per trial)")
    q.add_argument("--sweep", action="append", default=[], metavar="NAME",
                   help="only this sweep (repeatable; default: all sweeps in RESULTS)")
    q.add_argument("--where", default=None, metavar="EXPR", help="row filter, e.g. \"outcome == 'ok' and lr < 1e-4\"")
    q.add_argument("--columns", default=None,
                   help="comma-separated columns to show, or 'all' (default for trials: a compact set with the "
                        "searched parameters and the objective)")
    q.add_argument("--group-by", default=None, metavar="COLS",
                   help="group rows by these columns (comma-separated) and show count, ok, mean, sd, a 95%% t "
                        "interval of the mean, and best of --value")
    q.add_argument("--value", default="objective",
                   help="column summarised by --group-by (default objective: the final evaluation of ok trials)")
    q.add_argument("--paired", default=None, metavar="FACTOR[=A,B]",
                   help="compare the levels of FACTOR (e.g. attention) over pairs of ok trials identical in every "
                        "other setting: per-sample agreement on the same validation samples, exact-match "
                        "difference with a 95%% interval, exact McNemar p-value")
    q.add_argument("--vs-baseline", action="store_true",
                   help="the best trial against the sweep's --enqueue baseline, paired on the same validation "
                        "samples: exact-match difference with a 95%% interval and the McNemar p-value (one --sweep)")
    q.add_argument("--pareto", nargs="?", const="", default=None, metavar="METRIC:MODE,...",
                   help="only the ok trials on the Pareto front of these objectives (default: the sweep's own "
                        "--objective list), e.g. --pareto val_exact_match:max,peak_memory_bytes:min")
    q.add_argument("--sort", default=None, metavar="COL[:asc|desc],...",
                   help="sort order (default for trials: objective, best first)")
    q.add_argument("--top", type=int, default=None, metavar="N", help="only the first N rows")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default table)")
    q.set_defaults(func=cmd_query)


def cmd_query(args: argparse.Namespace) -> int:
    if args.top is not None and args.top < 1:
        print(f"mdsweep query: error: --top must be ≥ 1, got {args.top}", file=sys.stderr)
        return 2
    import pyarrow as pa
    import pyarrow.compute as pc

    from orchestrator.results import query as Q
    from orchestrator.results.where import apply_where

    try:
        table = Q.load_table(args.results, args.table, args.sweep or None)
        table = apply_where(table, args.where)
        mode = Q.objective_mode(table)
        if args.pareto is not None:
            table = pareto_table(args, table)
        if args.vs_baseline:
            if len(args.sweep) != 1 or args.table != "trials":
                raise Q.QueryError("--vs-baseline compares within one sweep: give one --sweep (trials table)")
            preds = Q.load_table(args.results, "predictions") if Path(args.results, "predictions").is_dir() else None
            record = Q.versus_baseline(table.to_pylist(), preds.filter(pc.field("sweep") == args.sweep[0]).to_pylist()
                                       if preds is not None and preds.num_rows else [])
            if record is None:
                print(f"mdsweep query: sweep {args.sweep[0]} has no ok baseline trial to compare with (run it "
                      "with --enqueue official or --enqueue FILE.json)", file=sys.stderr)
                return 1
            print(Q.describe_versus_baseline(record) if args.format == "table"
                  else Q.format_table(pa.Table.from_pylist([record]), args.format))
            return 0
        if args.paired:
            if args.table != "trials":
                raise Q.QueryError("--paired works on the trials table")
            if args.group_by:
                raise Q.QueryError("--paired and --group-by cannot be combined")
            spec = Q.parse_paired(args.paired)
            ids = table.column("trial_id").to_pylist()
            preds = Q.load_table(args.results, "predictions", args.sweep or None)
            if preds.num_rows:
                preds = preds.filter(pc.field("trial_id").isin(pa.array(ids, pa.string())))
            out = Q.paired_comparison(table, preds, spec)
            if out.num_rows == 0:
                print(f"mdsweep query: no pairs of ok trials that differ only in {spec.factor} and share "
                      f"validation samples (run the sweep with --cross {spec.factor} to get such pairs)",
                      file=sys.stderr)
                return 1
        elif args.group_by:
            by = [c.strip() for c in args.group_by.split(",") if c.strip()]
            out = Q.group_summary(table, by, args.value, Q.value_mode(args.value, mode))
        else:
            out = table
            default_cols = Q.default_trial_columns(table) if args.table == "trials" else None
            if args.sort:
                out = Q.sort_table(out, Q.parse_sort(args.sort, out.column_names))
            elif args.table == "trials" and "objective" in out.column_names:
                out = Q.sort_table(out, [("objective", "descending" if mode == "max" else "ascending"),
                                         ("trial_id", "ascending")])
            elif args.table == "steps":
                out = Q.sort_table(out, [("trial_id", "ascending"), ("step", "ascending")])
            out = Q.select_columns(out, args.columns, default_cols)
        if args.sort and (args.paired or args.group_by):
            out = Q.sort_table(out, Q.parse_sort(args.sort, out.column_names))
        if args.top is not None:
            out = out.slice(0, max(0, args.top))
        print(Q.format_table(out, args.format))
    except Q.QueryError as e:
        print(f"mdsweep query: error: {e}", file=sys.stderr)
        return 2
    return 0


def pareto_table(args: argparse.Namespace, table):
    """The trials on the Pareto front: of the objectives given, or of the selected sweep's own."""
    import pyarrow as pa

    from orchestrator.results import query as Q

    if args.table != "trials":
        raise Q.QueryError("--pareto works on the trials table")
    if args.pareto:
        try:
            objectives = [parse_objective(t, "--pareto") for t in args.pareto.split(",") if t.strip()]
        except ValueError as e:
            raise Q.QueryError(str(e)) from None
    else:
        sweeps = Q.load_table(args.results, "sweeps", args.sweep or None)
        found = {o for o in sweeps.column("objectives_json").to_pylist() if o} \
            if "objectives_json" in sweeps.column_names else set()
        if len(found) != 1:
            raise Q.QueryError("--pareto: give the objectives (METRIC:MODE,...), or select one sweep run with "
                               "several --objective")
        objectives = [tuple(o) for o in json.loads(found.pop())]
    if len(objectives) < 2:
        raise Q.QueryError(f"--pareto needs two or more objectives, got {objectives}")
    missing = [m for m, _ in objectives if f"final_{m}" not in table.column_names]
    if missing:
        raise Q.QueryError(f"--pareto: {', '.join(missing)} is not a reported metric")
    front = pa.Table.from_pylist(pareto_front(table.to_pylist(), objectives), schema=table.schema)
    if not args.columns:
        wanted = [*Q.default_trial_columns(front), *(f"final_{m}" for m, _ in objectives)]
        args.columns = ",".join(dict.fromkeys(c for c in wanted if c in front.column_names and c != "objective"))
    return front
