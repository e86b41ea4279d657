"""`mdsweep plan` on real spaces, the real-size preset's stand-in tokenizer, and the GPU check's dry run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.sweep.memory_plan import plan_space
from trainer.model.loading import preset_tokenizer
from trainer.memory.estimate import Workload

ROOT = Path(__file__).resolve().parents[1]


def test_plan_groups_configurations_by_memory_shape_not_learning_rate():
    plans = plan_space("demo:paired", {"model": "moondream2", "train_data": "x", "train_scope": "text"},
                       cross=[("attention_backend", ["sdpa", "eager-4d"])], probes=30, workload=Workload())
    # demo searches lr (continuous) and grad_accum (1, 2, 4): three accumulations x two backends
    assert len(plans) == 6 and sum(p.configurations for p in plans) == 60
    assert [p.estimate.device_total for p in plans] == sorted((p.estimate.device_total for p in plans), reverse=True)
    assert plans[0].shape["attention_backend"] == "eager-4d"


def test_plan_prints_trials_per_gpu_and_the_shapes_that_fit_nowhere(capsys, tmp_path):
    space = tmp_path / "space.py"
    space.write_text("def space(trial):\n"
                     "    return {'train_scope': trial.suggest_categorical('train_scope', ['text', 'lora']),\n"
                     "            'lr': trial.suggest_float('lr', 1e-6, 1e-3, log=True)}\n")
    code = main(["plan", "--model", "moondream2", "--space", f"{space}:space", "--batch-size", "8",
                 "--set", "optimizer=adamw8bit", "--gpu-type", "8GiB", "--gpu-type", "80GiB", "--probes", "20"])
    out = capsys.readouterr().out
    assert code == 0
    memory_table = out.split("per rank at N workers")[0]  # not the workers table after it
    header, text_row, lora_row = [line for line in memory_table.splitlines()
                                  if line.strip().startswith(("train_scope", "text", "lora"))]
    assert header.endswith("per 8GiB  per 80GiB")
    assert text_row.split()[-2:] == ["0", "4"]  # the lean text fine-tune: four per 80 GiB, none on 8 GiB
    assert int(lora_row.split()[-2]) >= 1
    assert "every shape fits at least one of these GPUs" in out

    assert main(["plan", "--model", "moondream2", "--space", f"{space}:space", "--batch-size", "8",
                 "--set", "optimizer=adamw8bit", "--gpu-type", "8GiB", "--probes", "20"]) == 0
    assert "1 shape(s) fit no GPU of 8GiB: train_scope=text" in capsys.readouterr().out


def _workers_table(out: str) -> list[list[str]]:
    """The rows (header first) of the table a plan ends with: each rank's peak + context at 1/2/4/8 workers."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per rank at N workers per trial"))
    return [line.split() for line in lines[start + 1:] if line.strip()]


def _gib(cell: str) -> float:
    assert cell.endswith("GiB"), cell
    return float(cell.removesuffix("GiB"))


def test_plan_shows_that_ddp_ranks_need_more_than_one_worker(capsys):
    """A DDP rank holds the whole replica and its gradient buckets besides: no worker count fits a card that one
    worker does not."""
    assert main(["plan", "--model", "moondream2", "--space", "demo", "--batch-size", "8", "--set", "optimizer=adamw",
                 "--set", "train_scope=text", "--gpu-type", "24GiB", "--probes", "10"]) == 0
    header, *rows = _workers_table(capsys.readouterr().out)
    assert header[1:] == ["1", "worker", "2", "workers", "4", "workers", "8", "workers", "on", "24GiB"]
    for row in rows:  # grad_accum, four sizes, "none"
        assert _gib(row[2]) > _gib(row[1]) and row[-1] == "none", row


def test_the_real_full_finetune_fits_24_gib_cards_on_two_fsdp_workers(capsys):
    """Issue 31: fp32 AdamW at batch 8 needs 27.8 GiB on one worker; sharded over two, each rank fits a 24 GiB card."""
    assert main(["plan", "--model", "moondream2", "--workers-per-trial", "2", "--set", "parallel=fsdp",
                 "--gpu-type", "24GiB", "--probes", "20"]) == 0
    out = capsys.readouterr().out
    assert "each rank of 2 workers per trial" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("grad_accum"))
    context = lines[header].split().index("+context")
    for line in lines[header + 1:lines.index("", header)]:
        assert 10 < _gib(line.split()[context]) < 24, line
    _, *rows = _workers_table(out)
    assert all(_gib(row[1]) > 24 and row[-2:] == ["2", "GPUs"] for row in rows), rows


def test_plan_names_a_bad_flag(capsys):
    assert main(["plan", "--space", "demo", "--gpu-type", "lots"]) == 2
    assert "--gpu-type" in capsys.readouterr().err


def test_real_size_preset_runs_with_a_stand_in_tokenizer_and_says_so(capsys):
    tokenizer = preset_tokenizer("moondream2")
    assert max(tokenizer.encode("What does the text say? 123456")) < 51200
    assert "stands in" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_dry_run_completes():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"], capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert run.stdout.count(" ok") >= 4 and "outcomes ['ok', 'ok']" in run.stdout
    # the multi-GPU section, on 2 gloo workers: the full fine-tune on 1 worker, then on 2 sharded ones
    rows = [line.rsplit(maxsplit=5) for line in run.stdout.split("workers (full fine-tune")[1].splitlines()[1:3]]
    assert [(row[0].strip(), row[-1]) for row in rows] == [("1 worker", "ok"), ("2 workers, fsdp", "ok")], rows
    # each row says how well the step used the device and which attention kernel ran
    assert "TFLOP/s" in run.stdout and " flash-cpu " in run.stdout and " eager " in run.stdout
