"""`mdsweep plan`: predicted GPU memory per configuration shape of a space, trials per GPU, and the workers (GPUs)
a trial needs at 1/2/4/8 workers per trial."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from orchestrator.cli.job_flags import add_job_arguments
from orchestrator.cli.run import JOB_FLAG_FIELDS, add_settings_flags, fixed_settings
from orchestrator.cluster.connect import ClusterError, connect
from orchestrator.cluster.resources import format_size, parse_size, probe_gpu_memory
from orchestrator.sweep.settings import AUTO_WORKERS, positive_int, ray_address
from trainer.budget import worker_split_problem
from trainer.memory.estimate import PLANNING_CROPS_PER_IMAGE, PLANNING_TEXT_TOKENS, Workload

DEFAULT_GPU_TYPES = ("24GiB", "80GiB")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="predict each configuration shape's GPU memory and how many trials fit a GPU",
        description="Probe a search space, group its configurations by what decides memory (scope, batch, "
                    "precision, optimizer, checkpointing, attention backend, adapter rank; not the learning "
                    "rate), and print the predicted peak GPU memory of each shape, how many such trials fit "
                    "one GPU of each size, the shapes that fit nowhere, and each rank's memory at 1/2/4/8 "
                    "workers per trial with the fewest workers (GPUs) a trial needs on each card. Nothing is "
                    "trained; no GPU needed.")
    p.add_argument("--space", default="captcha", help="search space, as for `mdsweep run` (default captcha)")
    p.add_argument("--cross", action="append", default=[], metavar="FIELD[=V1,V2]",
                   help="as for `mdsweep run`: every proposal once per value (matters when FIELD changes memory, "
                        "e.g. --cross attention_backend); repeatable")
    p.add_argument("--gpu-type", action="append", default=[], metavar="SIZE",
                   help=f"memory of a GPU to plan for, e.g. 24GiB or 80GiB; repeatable (default: "
                        f"{', '.join(DEFAULT_GPU_TYPES)}, or the attached cluster's GPUs with --address)")
    p.add_argument("--address", default=None, type=ray_address,
                   help="plan for the GPUs of this Ray cluster (auto, host:port), measured with nvidia-smi on "
                        "each GPU node or given with --node-gpu-memory")
    p.add_argument("--node-gpu-memory", default=None, metavar="SIZE",
                   help="memory of one GPU of the cluster (for logical GPUs, or when it cannot be measured)")
    p.add_argument("--probes", type=positive_int, default=200,
                   help="random configurations drawn from the space to find its shapes (default 200)")
    p.add_argument("--text-tokens", type=positive_int, default=None,
                   help="text tokens per sequence (prompt + answer + end), besides BOS and the image tokens "
                        "(default 24)")
    p.add_argument("--crops-per-image", type=positive_int, default=None,
                   help="crops per image: 2 for a captcha (global + one tile), up to 13 for large photos "
                        "(default 2)")
    add_settings_flags({"resources": p.add_argument_group("workers (as for `mdsweep run`)")},
                       only={"workers_per_trial"})
    g = p.add_argument_group("job settings (fixed: the same for every trial, as for `mdsweep run`)")
    add_job_arguments(g, include=JOB_FLAG_FIELDS)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                   help="any other JobConfig field, e.g. --set optimizer=adamw8bit --set train_scope=lora")
    p.set_defaults(func=cmd_plan, gpu_memory_per_trial=None)


def cluster_gpu_sizes(address: str, node_gpu_memory: Optional[str]) -> list[int]:
    """The memory of every GPU of the attached cluster (one entry per GPU)."""
    with connect(address) as handle:
        nodes = [n for n in handle.nodes() if n.gpus > 0]
        if not nodes:
            raise ValueError(f"--address {address}: the cluster has no GPUs")
        if node_gpu_memory:
            for node in nodes:
                node.gpu_memory = parse_size(node_gpu_memory, "--node-gpu-memory")
        else:
            probe_gpu_memory(nodes)
        unknown = [n.address for n in nodes if not n.gpu_memory]
        if unknown:
            raise ValueError(f"the GPU memory of node(s) {', '.join(unknown)} could not be measured; give it "
                             "with --node-gpu-memory, e.g. 80GiB")
        return [int(n.gpu_memory) for n in nodes for _ in range(int(n.gpus))]


def cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.results.groups import parse_cross
    from orchestrator.results.spaces import SpaceError
    from orchestrator.sweep.memory_plan import plan_space, varying_fields

    try:
        if args.workers_per_trial == AUTO_WORKERS:
            raise ValueError("--workers-per-trial auto: chosen by `mdsweep run` for its cluster's GPUs; this plan's "
                             "last table shows the fewest workers each shape needs per card")
        fixed = fixed_settings(args)
        fixed.setdefault("train_data", "unused-by-plan")
        cross = parse_cross(args.cross)
        if args.address:
            if args.gpu_type:
                raise ValueError("--gpu-type and --address: give one (the cluster's GPUs, or sizes to plan for)")
            sizes = cluster_gpu_sizes(args.address, args.node_gpu_memory)
            gpus = {format_size(size): size for size in sorted(set(sizes))}
        else:
            gpus = {text: parse_size(text, "--gpu-type") for text in (args.gpu_type or DEFAULT_GPU_TYPES)}
        workload = Workload(text_tokens=args.text_tokens or PLANNING_TEXT_TOKENS,
                            crops_per_image=args.crops_per_image or PLANNING_CROPS_PER_IMAGE)
        plans = plan_space(args.space, fixed, cross, probes=args.probes, workload=workload,
                           workers=args.workers_per_trial)
        for plan in plans:
            problem = worker_split_problem(plan.shape["batch_size"], args.workers_per_trial,
                                           names=("--batch-size", "--workers-per-trial"))
            if problem:
                raise ValueError(problem)
    except (ValueError, SpaceError, ClusterError) as e:
        print(f"mdsweep plan: error: {e}", file=sys.stderr)
        return 2
    print(render_plan(plans, varying_fields(plans), gpus, args, workload))
    return 0


def render_plan(plans, columns: list[str], gpus: dict[str, int], args: argparse.Namespace, workload: Any) -> str:
    first = plans[0].shape
    lora = any(p.shape["train_scope"] == "lora" for p in plans)
    common = ", ".join(f"{k}={'default' if first[k] is None else first[k]}" for k in first
                       if k not in columns and (lora or not k.startswith("lora_")))
    workers = args.workers_per_trial
    lines = [f"space {args.space}: {sum(p.configurations for p in plans)} probed configurations, "
             f"{len(plans)} memory shape(s) (rows needing the same memory merged); {workload.text_tokens} text "
             f"tokens and {workload.crops_per_image} crops per image",
             f"same in every shape: {common}", ""]
    if workers > 1:
        lines[-1:] = [f"each rank of {workers} workers per trial (--workers-per-trial {workers}):", ""]
    buckets = any(p.estimate.buckets for p in plans)
    per = "ranks per" if workers > 1 else "per"
    header = columns + ["weights", "grads"] + (["buckets"] if buckets else []) + \
        ["optimizer", "transient", "peak", "+context"] + [f"{per} {name}" for name in gpus]
    rows = []
    for plan in plans:
        e = plan.estimate
        values = [e.weights, e.gradients] + ([e.buckets] if buckets else []) + \
            [e.optimizer_states, e.transient, e.allocator_peak, e.device_total]
        rows.append(shape_cells(plan, columns) + [format_size(v) for v in values]
                    + [str(plan.trials_per_gpu(size)) for size in gpus.values()])
    lines += table(header, merge_equal_rows(rows, len(columns)))
    nowhere = [p for p in plans if all(p.trials_per_gpu(size) == 0 for size in gpus.values())]
    lines.append("")
    if nowhere:
        lines.append(f"{len(nowhere)} shape(s) fit no GPU of {' or '.join(gpus)}"
                     + (f" at {workers} workers" if workers > 1 else "") + ": "
                     + "; ".join(", ".join(f"{c}={p.shape[c]}" for c in columns) or "all" for p in nowhere))
    else:
        lines.append("every shape fits at least one of these GPUs")
    lines.append("transient: activations or the optimizer step's temporaries at the peak; peak: what "
                 "max_gpu_memory must allow; +context: with the CUDA context, what a trial takes of its GPU"
                 + ("; buckets: DDP's copy of the gradients" if buckets else "") + ". Assumptions: README, 'Memory'.")
    lines += ["", *render_workers(plans, columns, gpus)]
    return "\n".join(lines)


def shape_cells(plan, columns: list[str]) -> list[str]:
    """A shape's values in the varying columns; LoRA's fields blank where it does not train LoRA."""
    return ["-" if c.startswith("lora_") and plan.shape["train_scope"] != "lora" else str(plan.shape[c])
            for c in columns]


def render_workers(plans, columns: list[str], gpus: dict[str, int]) -> list[str]:
    """Per shape, one rank's peak + context at each worker count, and per card the fewest workers (one GPU each)
    whose ranks fit it: the GPUs a trial needs."""
    from orchestrator.sweep.memory_plan import WORKER_CHOICES

    strategy = "" if "parallel" in columns else f" (parallel={plans[0].shape['parallel']})"
    header = columns + [f"{n} worker{'s' if n > 1 else ''}" for n in WORKER_CHOICES] + [f"on {name}" for name in gpus]
    rows = []
    for plan in plans:
        needed = [plan.workers_needed(size) for size in gpus.values()]
        rows.append(shape_cells(plan, columns)
                    + [format_size(plan.ranks[n].device_total) if n in plan.ranks else "-" for n in WORKER_CHOICES]
                    + ["none" if n is None else f"{n} GPU{'s' if n > 1 else ''}" for n in needed])
    return [f"per rank at N workers per trial{strategy}, peak + context; on SIZE: the GPUs a trial needs there, "
            "the fewest workers whose ranks fit one card each (-: the batch does not split over N)",
            *table(header, merge_equal_rows(rows, len(columns)))]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns, the header first."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in [header, *rows]]


def merge_equal_rows(rows: list[list[str]], n_shape_columns: int) -> list[list[str]]:
    """Rows that differ in one shape column only and need the same memory become one row listing that column's
    values (grad_accum 1,2,4 when accumulation does not change the peak)."""
    for column in range(n_shape_columns):
        merged: dict[tuple, list[str]] = {}
        for row in rows:
            key = tuple(v for i, v in enumerate(row) if i != column)
            if key in merged:
                values = merged[key][column].split(",") + [row[column]]
                merged[key][column] = ",".join(sorted(set(values), key=lambda v: (len(v), v)))
            else:
                merged[key] = list(row)
        rows = list(merged.values())
    return rows
