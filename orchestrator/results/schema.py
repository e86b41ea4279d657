"""Versioned Arrow schemas of the Parquet results dataset.

The dataset is plain Parquet: one dataset per table, each hive-partitioned by sweep
(the files of each, and how they are written, are in orchestrator.results.store):

    trials       one row per trial (one file per sweep)
    steps        one row per report (evaluation; one file per trial)
    predictions  one row per validation sample of the final evaluation (one file per trial)
    sweeps       one row: how the sweep was run and where it stands

The partition column `sweep` lives in the folder name only (never inside the
files), so every hive-aware reader (pyarrow, pandas, polars, DuckDB) adds it
exactly once. Every file carries a `schema_version` column and the same number in
its file metadata (`mdsweep.schema_version`); `SCHEMA_VERSION` changes whenever a
column is removed, renamed or retyped (adding a column keeps readers working).

The trials table has one typed column per `JobConfig` field (the hyperparameters,
searched or fixed), so filters read naturally: `attention == 'prefix' and lr < 1e-4`.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
import typing
from typing import Any

import pyarrow as pa

from trainer.job_config import HARDWARE_COLUMNS, REPORT_METRICS, TEST_METRICS
from trainer.job_config import field_types as job_field_types
from trainer.model.tokenizer_source import TOKENIZER_COLUMNS

SCHEMA_VERSION = 1
METADATA_KEY = b"mdsweep.schema_version"

TABLES = ("trials", "steps", "predictions", "sweeps")

# Sweep names become hive partition values and folder names: keep them plain, and
# starting with a letter so that no reader infers a number or a date from them.
SWEEP_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")



# outcomes of a trial that ended without a usable model: GPU out of memory, host memory (Ray's memory monitor
# killed it), a loss that stayed non-finite, any other failure
FAILED_OUTCOMES = ("oom", "host_oom", "diverged", "error")


def _arrow_types(metrics: dict[str, Any]) -> dict[str, pa.DataType]:
    return {name: pa.int64() if metric.type is int else pa.float64() for name, metric in metrics.items()}


# What the job reports at each evaluation, typed from the job's own table.
METRIC_TYPES: dict[str, pa.DataType] = _arrow_types(REPORT_METRICS)
METRICS: tuple[str, ...] = tuple(METRIC_TYPES)
# A held-out test of a sweep's best trials (--test-data): null for the trials not tested.
TEST_METRIC_TYPES: dict[str, pa.DataType] = _arrow_types(TEST_METRICS)

UTC_TS = pa.timestamp("us", tz="UTC")


def utc_now() -> dt.datetime:
    """The time stamps every table's UTC_TS columns hold (start, end, report, created, updated)."""
    return dt.datetime.now(dt.timezone.utc)


def validate_sweep_name(name: str, flag: str = "--name") -> str:
    if not SWEEP_NAME_RE.match(name or ""):
        raise ValueError(
            f"{flag}: sweep name {name!r} must start with a letter and contain only "
            "letters, digits, '_', '-' or '.' (at most 128 characters); it becomes a "
            "folder name and a hive partition value"
        )
    return name


def arrow_type_for(tp: Any) -> pa.DataType:
    if typing.get_origin(tp) is typing.Literal:
        values = typing.get_args(tp)
        kinds = {type(v) for v in values}
        tp = kinds.pop() if len(kinds) == 1 else str
    if tp is bool:
        return pa.bool_()
    if tp is int:
        return pa.int64()
    if tp is float:
        return pa.float64()
    return pa.string()  # str, and anything richer is stored as its JSON text


def job_config_fields() -> list[pa.Field]:
    return [pa.field(name, arrow_type_for(tp)) for name, (tp, _opt) in job_field_types().items()]


def _metadata() -> dict[bytes, bytes]:
    return {METADATA_KEY: str(SCHEMA_VERSION).encode()}


def trials_schema() -> pa.Schema:
    fields = [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("group_id", pa.int64()),  # the Optuna trial number: replicates/crossed runs share it
        pa.field("member", pa.int64()),  # index of this run within its group
        pa.field("status", pa.string()),  # Ray Tune status: pending, running, terminated, error
        pa.field("outcome", pa.string()),  # running, ok, oom, host_oom, diverged, error, stopped
        pa.field("error", pa.string()),
        pa.field("searched", pa.list_(pa.string())),  # which config columns the search chose
        pa.field("baseline", pa.string()),  # the --enqueue baseline this trial runs (its label); null for proposals
        pa.field("params_json", pa.string()),  # every suggested parameter, auxiliary ones too
        *job_config_fields(),
        pa.field("objective_metric", pa.string()),
        pa.field("objective_mode", pa.string()),
        pa.field("objective", pa.float64()),  # the value Optuna was told (final evaluation)
        *[pa.field(f"best_{m}", t) for m, t in METRIC_TYPES.items()],
        *[pa.field(f"final_{m}", t) for m, t in METRIC_TYPES.items()],
        *[pa.field(m, t) for m, t in TEST_METRIC_TYPES.items()],
        pa.field("test_data", pa.string()),  # what the test_* columns were measured on
        # the tokenizer the trial's job used, resolved from the checkpoint and its revision (trainer.model.tokenizer_source)
        *[pa.field(name, arrow_type_for(tp)) for name, tp in TOKENIZER_COLUMNS.items()],
        # the device, the attention kernel (trainer.job: decoder_attention_kernel) and the count of data-parallel
        # workers (--workers-per-trial; null in files written before it was a column, whose trials ran on one) the
        # trial's job ran on
        *[pa.field(name, arrow_type_for(tp)) for name, tp in HARDWARE_COLUMNS.items()],
        pa.field("steps_completed", pa.int64()),
        pa.field("n_reports", pa.int64()),
        pa.field("peak_memory_bytes", pa.int64()),
        # each rank's peak by rank, rank 0's first (= peak_memory_bytes), as the trial's last attempt gathered them;
        # null where the ranks did not end together (out of memory) and in files written before it was a column
        pa.field("rank_peak_memory_bytes", pa.list_(pa.int64())),
        # the memory model's GPU peak (trainer/memory/estimate.py), one rank's at the trial's worker count
        pa.field("predicted_peak_bytes", pa.int64()),
        pa.field("job_wall_time_s", pa.float64()),
        pa.field("wall_time_s", pa.float64()),
        pa.field("node_id", pa.string()),
        pa.field("node_ip", pa.string()),
        pa.field("hostname", pa.string()),
        pa.field("gpu_ids", pa.string()),
        pa.field("num_failures", pa.int64()),  # retries after a worker/node failure
        pa.field("attempts", pa.int64()),  # starts: first run, retries and sweep resumes
        pa.field("restored_from_step", pa.int64()),  # step of the checkpoint the latest start resumed
        pa.field("checkpoint_path", pa.string()),
        pa.field("start_time", UTC_TS),
        pa.field("end_time", UTC_TS),
    ]
    return pa.schema(fields, metadata=_metadata())


def steps_schema() -> pa.Schema:
    fields = [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        *[pa.field(m, t, nullable=(m != "step")) for m, t in METRIC_TYPES.items()],
        pa.field("training_iteration", pa.int64()),
        pa.field("report_time", UTC_TS),
    ]
    return pa.schema(fields, metadata=_metadata())


def predictions_schema() -> pa.Schema:
    fields = [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("step", pa.int64()),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("target", pa.string()),
        pa.field("prediction", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("cer", pa.float64()),
    ]
    return pa.schema(fields, metadata=_metadata())


def sweeps_schema() -> pa.Schema:
    fields = [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("status", pa.string()),  # running, finished, interrupted, failed
        pa.field("created_at", UTC_TS),
        pa.field("updated_at", UTC_TS),
        pa.field("experiment_path", pa.string()),
        pa.field("space", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("mode", pa.string()),
        pa.field("num_samples", pa.int64()),
        pa.field("replicates", pa.int64()),
        pa.field("cross_json", pa.string()),
        pa.field("objectives_json", pa.string()),  # [[metric, mode], ...]: several for a multi-objective sweep
        pa.field("fixed_json", pa.string()),  # the fixed JobConfig settings, same for every trial
        pa.field("resources_json", pa.string()),
        pa.field("argv", pa.string()),
        # --warm-start: [{source, carried, notes}], the earlier sweeps whose finished trials the search was told
        pa.field("warm_start_json", pa.string()),
    ]
    return pa.schema(fields, metadata=_metadata())


SCHEMAS = {
    "trials": trials_schema,
    "steps": steps_schema,
    "predictions": predictions_schema,
    "sweeps": sweeps_schema,
}


def schema_for(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]()
    except KeyError:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}") from None


def coerce_value(value: Any, dtype: pa.DataType) -> Any:
    """Best-effort conversion of a Python value to something `dtype` accepts (else None)."""
    if value is None:
        return None
    try:
        if pa.types.is_boolean(dtype):
            return bool(value)
        if pa.types.is_integer(dtype):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return int(value)
        if pa.types.is_floating(dtype):
            return float(value)
        if pa.types.is_string(dtype):
            if isinstance(value, str):
                return value
            return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
        if pa.types.is_list(dtype):
            return [coerce_value(v, dtype.value_type) for v in value]
    except (TypeError, ValueError, OverflowError):
        return None
    return value


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema`'s columns; missing keys become nulls."""
    columns = {}
    for f in schema:
        if f.name == "schema_version":
            columns[f.name] = pa.array([SCHEMA_VERSION] * len(rows), type=f.type)
            continue
        values = [coerce_value(r.get(f.name), f.type) for r in rows]
        columns[f.name] = pa.array(values, type=f.type)
    return pa.Table.from_pydict(columns, schema=schema)
