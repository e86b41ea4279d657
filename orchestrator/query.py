"""Read the Parquet results: filters, grouping, sorting, paired comparisons, output.

Only pyarrow is needed (no pandas, no Ray). Filters use a small, safe expression
form compiled to pyarrow compute expressions (nothing is `eval`ed):

    attention == 'prefix' and lr < 1e-4
    outcome in ['ok', 'diverged'] and not (grad_accum >= 8)
    peak_memory_bytes / 2**30 > 6 or error is not None
"""
from __future__ import annotations

import ast
import csv
import io
import json
import math
import statistics
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from orchestrator.objectives import default_mode
from orchestrator.results_schema import TABLES, job_field_types


class QueryError(ValueError):
    """A query that cannot run; the message names the flag at fault."""


# ---------------------------------------------------------------- loading


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
                raise QueryError(f"RESULTS: could not read {table} under {results}: {e}") from None
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


# ---------------------------------------------------------------- safe expressions

_CMP = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
}
_ARITH = {ast.Add: pc.add, ast.Sub: pc.subtract, ast.Mult: pc.multiply, ast.Div: pc.divide, ast.Pow: pc.power}


def _const(node: ast.AST, flag: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _const(node.operand, flag)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_const(e, flag) for e in node.elts]
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        a, b = _const(node.left, flag), _const(node.right, flag)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            return _fold(type(node.op), a, b, ast.unparse(node), flag)
    raise _NotConst


def _fold(op: type, a: float, b: float, text: str, flag: str) -> float:
    """Constant arithmetic that always ends quickly: an integer power beyond 64 bits is taken in floats
    (never an unbounded integer), and every result is a finite number Arrow can compare with (or a
    QueryError naming the constant)."""
    small_int_power = (op is ast.Pow and isinstance(a, int) and isinstance(b, int) and b >= 0
                       and (abs(a) <= 1 or b * math.log2(abs(a)) < 63))
    if small_int_power:  # stays an int, so integer columns divide by it exactly
        return a ** b
    try:
        result = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                  ast.Div: lambda: a / b, ast.Pow: lambda: float(a) ** float(b)}[op]()
    except ZeroDivisionError:
        raise QueryError(f"{flag}: {text}: division by zero") from None
    except OverflowError:
        raise QueryError(f"{flag}: {text}: too large a number") from None
    if isinstance(result, complex) or not math.isfinite(result) or abs(result) > 1.7e308:
        raise QueryError(f"{flag}: {text}: not a finite real number")
    return float(result) if isinstance(result, int) and abs(result) >= 2 ** 63 else result


class _NotConst(Exception):
    pass


def compile_where(text: str, columns: Iterable[str], flag: str = "--where") -> pc.Expression:
    """Compile a filter expression to a pyarrow Expression; raises QueryError."""
    columns = list(columns)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise QueryError(f"{flag}: cannot parse {text!r}: {e.msg}") from None

    def value(node: ast.AST) -> Any:
        try:
            return _const(node, flag)
        except _NotConst:
            pass
        if isinstance(node, ast.Name):
            if node.id in ("true", "false", "none", "null"):
                return {"true": True, "false": False}.get(node.id)
            if node.id not in columns:
                raise QueryError(f"{flag}: unknown column {node.id!r}; columns: {', '.join(columns)}")
            return pc.field(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            operands = [value(node.left), value(node.right)]
            if any(not isinstance(v, (pc.Expression, int, float)) or isinstance(v, bool) for v in operands):
                raise QueryError(f"{flag}: {ast.unparse(node)!r}: arithmetic needs numbers or numeric columns")
            return _ARITH[type(node.op)](*operands)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return pc.negate(value(node.operand))
        return boolean(node)

    def compare(op: ast.cmpop, left: Any, right_node: ast.AST) -> pc.Expression:
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                raise QueryError(f"{flag}: 'is' only compares with None")
            e = left.is_null() if isinstance(left, pc.Expression) else pc.scalar(left is None)
            return e if isinstance(op, ast.Is) else ~e
        right = value(right_node)
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, list):
                raise QueryError(f"{flag}: 'in' needs a list of constants, e.g. attention in ['causal', 'prefix']")
            e = left.isin(right)
            return e if isinstance(op, ast.In) else ~e
        if right is None and isinstance(op, (ast.Eq, ast.NotEq)):
            e = left.is_null()
            return e if isinstance(op, ast.Eq) else ~e
        if type(op) not in _CMP:
            raise QueryError(f"{flag}: unsupported comparison {type(op).__name__}")
        return _CMP[type(op)](left, right)

    def boolean(node: ast.AST) -> pc.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [boolean(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~boolean(node.operand)
        if isinstance(node, ast.Compare):
            left = value(node.left)
            out = None
            for op, right_node in zip(node.ops, node.comparators):
                e = compare(op, left, right_node)
                out = e if out is None else (out & e)
                left = value(right_node)
            return out
        if isinstance(node, ast.Name):
            return value(node)  # a boolean column
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            return pc.scalar(node.value)
        raise QueryError(f"{flag}: unsupported expression {ast.unparse(node)!r}; use comparisons "
                         "(==, !=, <, <=, >, >=, in, is None) joined by and/or/not")

    return boolean(tree.body)


def apply_where(table: pa.Table, text: Optional[str], flag: str = "--where") -> pa.Table:
    if not text:
        return table
    expr = compile_where(text, table.column_names, flag)
    try:
        return table.filter(expr)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise QueryError(f"{flag}: {text!r}: {e}") from None


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
              "peak_memory_bytes", "predicted_peak_bytes", "wall_time_s", "node_ip", "gpu_ids"]
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


# ---------------------------------------------------------------- statistics


def t_quantile(p: float, df: int) -> float:
    """Student t quantile (exact for df 1 and 2, Cornish-Fisher expansion beyond)."""
    if df <= 0:
        return math.nan
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sd, low, high) with a t interval for the mean; nan where undefined."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: binomial test of b successes in b + c at 1/2."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**m)))


def paired_difference_ci(n11: int, n10: int, n01: int, n00: int, level: float = 0.95) -> tuple[float, float]:
    """Agresti-Min adjusted Wald interval for a difference of paired proportions."""
    n = n11 + n10 + n01 + n00
    if n == 0:
        return math.nan, math.nan
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    nn = n + 2
    p10, p01 = (n10 + 0.5) / nn, (n01 + 0.5) / nn
    diff = p10 - p01
    se = math.sqrt(max(p10 + p01 - diff**2, 0.0) / nn)
    return max(-1.0, diff - z * se), min(1.0, diff + z * se)


# ---------------------------------------------------------------- grouping


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
    from orchestrator.job_values import parse_value

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
    preds: dict[str, dict[str, bool]] = {}
    if predictions.num_rows:
        for p in predictions.select(["trial_id", "sample_id", "correct"]).to_pylist():
            preds.setdefault(p["trial_id"], {})[p["sample_id"]] = bool(p["correct"])
    out = []
    for key, by_level in cells.items():
        for a, b in level_pairs:
            ta = sorted(by_level.get(a, []), key=lambda r: (r.get("sweep") or "", r["trial_id"]))
            tb = sorted(by_level.get(b, []), key=lambda r: (r.get("sweep") or "", r["trial_id"]))
            for ra, rb in zip(ta, tb):
                pa_, pb_ = preds.get(ra["trial_id"], {}), preds.get(rb["trial_id"], {})
                common = sorted(set(pa_) & set(pb_))
                if not common:
                    continue
                n11 = sum(1 for s in common if pa_[s] and pb_[s])
                n10 = sum(1 for s in common if pa_[s] and not pb_[s])
                n01 = sum(1 for s in common if not pa_[s] and pb_[s])
                n00 = len(common) - n11 - n10 - n01
                n = len(common)
                low, high = paired_difference_ci(n11, n10, n01, n00)
                rec = {"factor": spec.factor, "a": str(a), "b": str(b)}
                rec.update({k: ra.get(k) for k in searched})
                rec.update(trial_a=ra["trial_id"], trial_b=rb["trial_id"], n=n, both_correct=n11, a_only=n10,
                           b_only=n01, both_wrong=n00, em_a=(n11 + n10) / n, em_b=(n11 + n01) / n,
                           diff=(n10 - n01) / n, ci_low=low, ci_high=high, mcnemar_p=mcnemar_exact(n10, n01))
                out.append(rec)
    return pa.Table.from_pylist(out)


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
    mode = "max"
    if "objective_mode" in trials.column_names:
        modes = [m for m in pc.unique(trials.column("objective_mode")).to_pylist() if m]
        mode = modes[0] if modes else "max"
    trials = sort_table(trials, [("objective", "descending" if mode == "max" else "ascending"), ("trial_id", "ascending")])
    cols = default_trial_columns(trials)
    return format_table(trials.select(cols).slice(0, top))
