"""Read the Parquet results into tables: loading, sorting, grouping, paired comparisons, output.

Only pyarrow is needed (no pandas, no Ray). Filters are in orchestrator.results.where, the statistics in
orchestrator.results.intervals.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from orchestrator.results.intervals import mcnemar_exact, mean_interval, paired_difference_ci
from orchestrator.results.objectives import default_mode
from orchestrator.results.where import QueryError
from orchestrator.results.schema import TABLES, job_field_types
from orchestrator.results.ranking import best_trial, ranked_trials



# ---------------------------------------------------------------- loading


class UnreadableError(QueryError):
    """A table whose files exist but cannot be read (a corrupt or foreign file), as opposed to one not there."""


def load_table(results: str | Path, table: str = "trials", sweeps: Optional[Sequence[str]] = None,
               attempts: int = 5) -> pa.Table:
    """One table of the dataset, all sweeps (or the given ones), with a `sweep` column.

    Safe while a sweep is writing: the sink replaces whole files atomically, but
    pyarrow's dataset reader notes each file's size when it lists the folder and
    reads later, so a file replaced in between reads as corrupt. Such a read is
    retried from a fresh listing.
    """
    for attempt in range(attempts):
        try:
            return _load_table_once(results, table, sweeps)
        except (OSError, pa.ArrowInvalid) as e:
            if isinstance(e, FileNotFoundError) and not Path(results, table).is_dir():
                raise
            if attempt == attempts - 1:
                raise UnreadableError(f"RESULTS: could not read {table} under {results}: {e}") from None
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _load_table_once(results: str | Path, table: str, sweeps: Optional[Sequence[str]]) -> pa.Table:
    if table not in TABLES:
        raise QueryError(f"--table: unknown table {table!r}; tables: {', '.join(TABLES)}")
    root = Path(results) / table
    if not root.is_dir():
        raise QueryError(f"RESULTS: no {table} table under {results} (expected {root}/sweep=NAME/*.parquet)")
    present = sorted(d.name.removeprefix("sweep=") for d in root.glob("sweep=*") if d.is_dir())
    missing = [name for name in sweeps or () if name not in present]
    if missing:
        raise QueryError(f"--sweep {missing[0]}: no such sweep in {results}; sweeps: {', '.join(present) or 'none'}")
    # only *.parquet: a stray file (a note, an editor's backup) in a partition must not break every query
    # and never a hidden temporary file of a write in progress
    files = sorted(str(f) for f in root.glob("sweep=*/*.parquet") if not f.name.startswith("."))
    if not files:
        return pa.table({"sweep": pa.array([], pa.string())})
    partitioning = ds.partitioning(pa.schema([("sweep", pa.string())]), flavor="hive")
    dataset = ds.dataset(files, format="parquet", partitioning=partitioning, partition_base_dir=str(root))
    # Files written by different schema versions may differ in columns: unify them.
    schemas = {str(f.physical_schema): f.physical_schema for f in dataset.get_fragments()}
    if len(schemas) > 1:
        unified = pa.unify_schemas(list(schemas.values()), promote_options="permissive")
        unified = unified.append(pa.field("sweep", pa.string()))
        dataset = ds.dataset(files, format="parquet", partitioning=partitioning, partition_base_dir=str(root),
                             schema=unified)
    flt = None
    if sweeps:
        flt = pc.field("sweep").isin(list(sweeps))
    out = dataset.to_table(filter=flt)
    # put `sweep` first
    names = ["sweep"] + [n for n in out.column_names if n != "sweep"]
    return out.select(names)


# ---------------------------------------------------------------- sorting, selecting


def parse_sort(text: Optional[str], columns: Sequence[str], flag: str = "--sort") -> list[tuple[str, str]]:
    keys = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, order = part.partition(":")
        order = order.strip().lower() or "asc"
        if name.startswith("-"):
            name, order = name[1:], "desc"
        if name not in columns:
            raise QueryError(f"{flag}: unknown column {name!r}")
        if order not in ("asc", "desc"):
            raise QueryError(f"{flag}: order must be asc or desc, got {order!r}")
        keys.append((name, "ascending" if order == "asc" else "descending"))
    return keys


def sort_table(table: pa.Table, keys: list[tuple[str, str]]) -> pa.Table:
    if not keys or table.num_rows == 0:
        return table
    return table.sort_by([(name, order, "at_end") for name, order in keys])


def default_trial_columns(table: pa.Table) -> list[str]:
    searched: list[str] = []
    if "searched" in table.column_names:
        for lst in table.column("searched").to_pylist():
            for name in lst or ():
                if name not in searched:
                    searched.append(name)
    metric = "val_exact_match"
    if "objective_metric" in table.column_names:
        vals = [v for v in pc.unique(table.column("objective_metric")).to_pylist() if v]
        if len(vals) == 1:
            metric = vals[0]
    wanted = ["sweep", "trial_id", "outcome", *searched, "seed", "objective", f"best_{metric}",
              f"final_{metric}", f"final_{metric}_low", f"final_{metric}_high", "steps_completed",
              "peak_memory_bytes", "predicted_peak_bytes", "final_achieved_tflops", "final_mfu", "attention_kernel",
              "wall_time_s", "node_ip", "gpu_ids"]
    if "final_mfu" in table.column_names and table.column("final_mfu").null_count == table.num_rows:
        wanted.remove("final_mfu")  # null on CPU: a column of blanks says nothing (`--columns all` still has it)
    if "test_n" in table.column_names and table.column("test_n").null_count < table.num_rows:
        at = wanted.index("steps_completed")  # a sweep run with --test-data: its tested trials' numbers
        wanted[at:at] = ["test_exact_match", "test_exact_match_low", "test_exact_match_high"]
    seen, cols = set(), []
    for c in wanted:
        if c in table.column_names and c not in seen:
            seen.add(c)
            cols.append(c)
    if "sweep" in cols and len(pc.unique(table.column("sweep"))) <= 1:
        cols.remove("sweep")
    return cols


def select_columns(table: pa.Table, text: Optional[str], default: Optional[list[str]] = None) -> pa.Table:
    if text == "all":
        return table
    if not text:
        return table.select(default) if default else table
    names = [c.strip() for c in text.split(",") if c.strip()]
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise QueryError(f"--columns: unknown column(s) {', '.join(missing)}; columns: {', '.join(table.column_names)}")
    return table.select(names)


# ---------------------------------------------------------------- grouping


def objective_mode(trials: pa.Table) -> str:
    """The direction of the objective the trials were ranked by (max when the table does not say, or when it
    mixes sweeps of both directions)."""
    if "objective_mode" not in trials.column_names:
        return "max"
    modes = [m for m in pc.unique(trials.column("objective_mode")).to_pylist() if m]
    return modes[0] if len(modes) == 1 else "max"


def value_mode(value: str, objective_mode: str = "max") -> str:
    """Which way is better for `value`: the objective's mode, or min for losses/error rates/costs."""
    return objective_mode if value == "objective" else default_mode(value)


def group_summary(table: pa.Table, by: Sequence[str], value: str, mode: str = "max") -> pa.Table:
    """count, ok, mean, sd, 95 % interval of the mean, and best of `value` per group."""
    for name in [*by, value]:
        if name not in table.column_names:
            flag = "--value" if name == value else "--group-by"
            raise QueryError(f"{flag}: unknown column {name!r}")
    rows = table.select([*by, value] + (["outcome"] if "outcome" in table.column_names else [])).to_pylist()
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, members in groups.items():
        vals = [float(r[value]) for r in members if isinstance(r[value], (int, float)) and not isinstance(r[value], bool)
                and math.isfinite(r[value])]
        mean, sd, low, high = mean_interval(vals)
        best = (max(vals) if mode == "max" else min(vals)) if vals else None
        rec = dict(zip(by, key))
        rec.update(count=len(members), ok=sum(1 for r in members if r.get("outcome") == "ok"), n_values=len(vals),
                   mean=None if math.isnan(mean) else mean, sd=None if math.isnan(sd) else sd,
                   ci_low=None if math.isnan(low) else low, ci_high=None if math.isnan(high) else high, best=best)
        out.append(rec)
    out.sort(key=lambda r: (r["mean"] is None, -(r["mean"] or 0) if mode == "max" else (r["mean"] or 0)))
    return pa.Table.from_pylist(out)


# ---------------------------------------------------------------- paired comparison


@dataclass
class PairedSpec:
    factor: str
    levels: Optional[list[Any]] = None


def parse_paired(text: str) -> PairedSpec:
    from orchestrator.results.job_values import parse_value

    name, sep, vals = text.partition("=")
    name = name.strip()
    if name not in job_field_types():
        raise QueryError(f"--paired: {name!r} is not a config column; use e.g. --paired attention")
    levels = None
    if sep:
        try:
            levels = [parse_value(name, v.strip(), "--paired") for v in vals.split(",") if v.strip()]
        except ValueError as e:
            raise QueryError(str(e)) from None
        if len(levels) != 2:
            raise QueryError("--paired: give exactly two levels, e.g. --paired attention=causal,prefix")
    return PairedSpec(name, levels)


def paired_comparison(trials: pa.Table, predictions: pa.Table, spec: PairedSpec) -> pa.Table:
    """Pairs of ok trials identical in every config column except `spec.factor`.

    For each pair, the per-sample agreement table on the validation samples both
    predicted, exact match of each, their difference (a - b) with an Agresti-Min
    95 % interval, and the exact McNemar p-value.
    """
    config_cols = [c for c in job_field_types() if c in trials.column_names and c != spec.factor]
    if spec.factor not in trials.column_names:
        raise QueryError(f"--paired: no column {spec.factor!r} in the trials table")
    ok = trials.filter(pc.field("outcome") == "ok") if "outcome" in trials.column_names else trials
    rows = ok.to_pylist()
    cells: dict[tuple, dict[Any, list[dict]]] = {}
    for r in rows:
        key = tuple(json.dumps(r.get(c), default=str) for c in config_cols)
        cells.setdefault(key, {}).setdefault(r[spec.factor], []).append(r)
    levels = spec.levels
    if levels is None:
        levels = sorted({r[spec.factor] for r in rows if r[spec.factor] is not None}, key=str)
    level_pairs = [(a, b) for i, a in enumerate(levels) for b in levels[i + 1:]]
    searched: list[str] = []
    for r in rows:
        for name in r.get("searched") or ():
            if name != spec.factor and name not in searched:
                searched.append(name)
    if "seed" not in searched and len({r.get("seed") for r in rows}) > 1:
        searched.append("seed")
    preds = correct_by_trial(predictions.select(["trial_id", "sample_id", "correct"]).to_pylist()
                             if predictions.num_rows else [])
    out = []
    for key, by_level in cells.items():
        for a, b in level_pairs:
            ta = sorted(by_level.get(a, []), key=lambda r: (r.get("sweep") or "", r["trial_id"]))
            tb = sorted(by_level.get(b, []), key=lambda r: (r.get("sweep") or "", r["trial_id"]))
            for ra, rb in zip(ta, tb):
                agreement = paired_agreement(preds.get(ra["trial_id"], {}), preds.get(rb["trial_id"], {}))
                if agreement is None:
                    continue
                rec = {"factor": spec.factor, "a": str(a), "b": str(b)}
                rec.update({k: ra.get(k) for k in searched})
                rec.update(trial_a=ra["trial_id"], trial_b=rb["trial_id"], **agreement)
                out.append(rec)
    return pa.Table.from_pylist(out)


def correct_by_trial(predictions: Sequence[dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """trial_id -> sample_id -> whether the trial's final evaluation read it right."""
    preds: dict[str, dict[str, bool]] = {}
    for p in predictions:
        preds.setdefault(p["trial_id"], {})[p["sample_id"]] = bool(p["correct"])
    return preds


def paired_agreement(a: dict[str, bool], b: dict[str, bool]) -> Optional[dict[str, Any]]:
    """Two trials on the validation samples both predicted: the agreement table, each one's exact match, their
    difference (a - b) with an Agresti-Min 95 % interval and the exact McNemar p-value; None with no sample in
    common."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    n = len(common)
    n11 = sum(1 for s in common if a[s] and b[s])
    n10 = sum(1 for s in common if a[s] and not b[s])
    n01 = sum(1 for s in common if not a[s] and b[s])
    n00 = n - n11 - n10 - n01
    low, high = paired_difference_ci(n11, n10, n01, n00)
    return dict(n=n, both_correct=n11, a_only=n10, b_only=n01, both_wrong=n00, em_a=(n11 + n10) / n,
                em_b=(n11 + n01) / n, diff=(n10 - n01) / n, ci_low=low, ci_high=high, mcnemar_p=mcnemar_exact(n10, n01))


def versus_baseline(trials: Sequence[dict[str, Any]],
                    predictions: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The best trial against the sweep's enqueued baseline (`--enqueue`), paired on their validation samples:
    the baseline run with the best trial's member index (its crossed values and seed), else the best baseline
    run. None when the sweep has no ok baseline or no ok trial. One computation for the closing summary, the
    report and `mdsweep query --vs-baseline`."""
    best = best_trial(trials)
    baselines = [r for r in ranked_trials(trials) if r.get("baseline")]
    if best is None or not baselines:
        return None
    base = next((r for r in baselines if r.get("member") == best.get("member")), baselines[0])
    preds = correct_by_trial(predictions)
    agreement = paired_agreement(preds.get(best["trial_id"], {}), preds.get(base["trial_id"], {}))
    record = {"best_trial": best["trial_id"], "baseline": base["baseline"], "baseline_trial": base["trial_id"],
              "best_objective": best.get("objective"), "baseline_objective": base.get("objective")}
    if agreement is not None:
        names = {"em_a": "em_best", "em_b": "em_baseline", "a_only": "best_only", "b_only": "baseline_only"}
        record.update({names.get(k, k): v for k, v in agreement.items()})
    return record


def describe_versus_baseline(record: dict[str, Any]) -> str:
    """`vs baseline official (...) (trial b): exact match +0.125 [+0.048, +0.201] paired over 200 samples
    (0.812 vs 0.688), McNemar p=0.002`."""
    head = f"vs baseline {record['baseline']} (trial {record['baseline_trial']})"
    if record["best_trial"] == record["baseline_trial"]:
        return f"{head}: the best trial is the baseline itself"
    if record.get("n") is None:
        return (f"{head}: objective {record['best_objective']:.3f} vs {record['baseline_objective']:.3f} "
                "(no shared validation predictions to pair)")
    return (f"{head}: exact match {record['diff']:+.3f} [{record['ci_low']:+.3f}, {record['ci_high']:+.3f}] "
            f"paired over {record['n']} samples ({record['em_best']:.3f} vs {record['em_baseline']:.3f}), "
            f"McNemar p={record['mcnemar_p']:.3g}")


# ---------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    if hasattr(v, "isoformat"):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    s = str(v).replace("\n", " ")
    return s if len(s) <= 60 else s[:57] + "..."


def format_table(table: pa.Table, fmt: str = "table") -> str:
    rows = table.to_pylist()
    cols = table.column_names
    if fmt == "json":
        return json.dumps(rows, default=lambda o: o.isoformat() if hasattr(o, "isoformat") else str(o), indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r[c] is None else (r[c].isoformat() if hasattr(r[c], "isoformat") else r[c])
                        for c in cols])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise QueryError(f"--format: unknown format {fmt!r}; choose table, csv or json")
    if not rows:
        return "(no rows)"
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]
    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    out = [line(cols), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def leaderboard(results: str | Path, sweep: str, top: int = 10) -> str:
    """The sweep's trials, best first (by the value told to Optuna)."""
    trials = load_table(results, "trials", [sweep])
    if trials.num_rows == 0:
        return "(no trials)"
    mode = objective_mode(trials)
    trials = sort_table(trials, [("objective", "descending" if mode == "max" else "ascending"),
                                 ("trial_id", "ascending")])
    cols = default_trial_columns(trials)
    return format_table(trials.select(cols).slice(0, top))
