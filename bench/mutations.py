"""A mutation check of the project's core promises: break each promise on purpose, and see that a test fails.

    python bench/mutations.py [--list] [--only NAME ...] [--check-clean] [--timeout 900]

A test suite that passes says little until it has been seen failing on the break it is there to catch: a review
of issue 29 broke eight core promises by hand and five survived their test files. This script keeps that check
repeatable. Each entry is one promise, the one line (or few) of code that carries it, an exact change that
breaks it, and the tests that must catch the break. For each entry it copies the working tree as git sees it
(tracked files and untracked, unignored ones) to a temporary folder, applies the change there, runs only the
named tests there, and prints whether they caught it.

The copy is what runs, not the editable install in the checkout: pytest starts with the copy as its working
directory and `PYTHONPATH`, which every subprocess inherits, so `python -m orchestrator.cli`, the `mdsweep`
console script and a sweep's Ray workers (whose code is shipped from the driver's own project root,
orchestrator.cluster.connect.project_runtime_env) all import the copy. Entries X1 and X2 check exactly that:
their breaks are reached only in a subprocess started from another folder and only in a Ray worker.

An entry whose old text is not found exactly once in its file is refused before anything runs, so the table
cannot rot silently as the code moves on: mend the entry. `caught` means pytest ended with failures (exit 1) or
could not import a test module (exit 2); `survived` means the named tests all passed on the broken code;
`error` (no test collected, a node id that no longer exists) and `timeout` are neither. `--check-clean` first
runs every named test once on an unbroken copy, so a `caught` cannot be a test that fails anyway.

Never run in CI (it is not under tests/): it runs many test files, some of them sweeps, one entry at a time.
Results in bench/RESULTS.md ("Mutation check").
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One promise broken on purpose: `old` (found exactly once in `file`) becomes `new`, and `tests` (pytest
    node ids or files) must fail."""

    name: str
    promise: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "M1", "layering: results/ never imports the sweep layer above it",
        "orchestrator/results/study.py",
        "from orchestrator.results.query import QueryError, load_table\n",
        "from orchestrator.results.query import QueryError, load_table\n"
        "from orchestrator.sweep.settings import SweepError\n",
        ("tests/test_layering.py",)),
    Mutation(
        "M2", "tokenizer rules: from 2025-06-21 BOS/EOS is starmie's id 0, whatever token holds it",
        "trainer/model/tokenizer_source.py",
        'TokenizerRule("2025-06-21", "moondream/starmie-v1", None, 0, "moondream2-starmie", own_file_wins=False)',
        'TokenizerRule("2025-06-21", "moondream/starmie-v1", None, None, "moondream2-starmie", own_file_wins=False)',
        ("tests/test_tokenizer_source.py::test_a_starmie_revision_uses_starmie_ids_and_template_not_the_stale_files_"
         "beside_it",)),
    Mutation(
        "M3", "mdsweep train --resume continues from the checkpoint (does not start over)",
        "orchestrator/cli/train.py",
        "resume_from = checkpoint if args.resume and TrainState.exists(checkpoint) else None",
        "resume_from = None",
        ("tests/test_cli_train.py::test_train_resume_continues_from_the_checkpoint",)),
    Mutation(
        "M4", "repair: a finished trial missing step rows is replayed",
        "orchestrator/sweep/repair.py",
        "    if not steps <= written:\n",
        "    if not steps <= written | steps:\n",
        ("tests/test_results_sink.py::test_the_resumes_repair_puts_back_missing_step_rows_finished_or_not",)),
    Mutation(
        "M5", "sweep lock: the results partition is locked, not only the experiment folder",
        "orchestrator/sweep/lock.py",
        '    folders.append(partition_dir(results, "sweeps", name))\n',
        "",
        ("tests/test_sweep_lock.py::test_the_results_partition_alone_refuses_a_second_driver",)),
    Mutation(
        "M6", "export guard: --out never is, holds or lies inside RESULTS",
        "orchestrator/cli/export.py",
        'guarded = {"the results (RESULTS)": results.resolve(), "the working directory": Path.cwd().resolve(),',
        'guarded = {"the working directory": Path.cwd().resolve(),',
        ("tests/test_export_guards.py",)),
    Mutation(
        "M7", "checkpoint layouts: every 2024 name is renamed (one rule dropped)",
        "trainer/model/layouts.py",
        '    (r"^model\\.text\\.post_ln\\.", "text_model.lm_head.ln."),\n',
        "",
        ("tests/test_checkpoint_layouts.py::test_the_shipped_base_in_every_layout_loads_to_identical_weights_and_"
         "logits",)),
    Mutation(
        "M8", "baselines: the best trial is paired with the baseline run of its own member",
        "orchestrator/results/query.py",
        'base = next((r for r in baselines if r.get("member") == best.get("member")), baselines[0])',
        "base = baselines[0]",
        ("tests/test_results_query.py::test_the_best_trial_is_paired_with_the_baseline_run_of_its_own_member",)),
    Mutation(
        "E1", "export guard: --force replaces only a previous export (one with a model card)",
        "orchestrator/cli/export.py",
        "        if not (target / MODEL_CARD).is_file():\n",
        "        if False:\n",
        ("tests/test_export_guards.py",)),
    Mutation(
        "L1", "sweep lock: the lock is exclusive",
        "orchestrator/sweep/lock.py",
        "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)",
        ("tests/test_sweep_lock.py::test_a_held_lock_refuses_a_second_holder_naming_the_first",)),
    Mutation(
        "R1", "repair: an unfinished trial is left to Tune, not recorded as ended",
        "orchestrator/sweep/repair.py",
        '    return reports if any(r.get(KIND_KEY) == "final" for r in reports) else None\n',
        "    return reports\n",
        ("tests/test_results_sink.py::test_the_resumes_repair_puts_back_missing_step_rows_finished_or_not",)),
    Mutation(
        "R2", "repair: an interrupted trial's evaluations before its checkpoint that the disk refused are put back",
        "orchestrator/sweep/sink.py",
        '        missing = {int(r["step"]): r for r in evals if int(r["step"]) not in steps}\n',
        "        missing = {}\n",
        ("tests/test_results_sink.py::test_the_resumes_repair_puts_back_missing_step_rows_finished_or_not",
         "tests/test_orchestrator_embedded.py::test_ctrl_c_after_the_results_disks_failed_saves_the_sweep_and_"
         "resume_puts_back_every_row")),
    Mutation(
        "K1", "sink keys: steps rows are keyed by (trial, step), so a retried report replaces its row",
        "orchestrator/sweep/sink.py",
        "            steps[int(step)] = steps_row(tid, result)\n",
        "            steps[len(steps) + 1] = steps_row(tid, result)\n",
        ("tests/test_results_sink.py::test_a_retried_trial_neither_duplicates_nor_loses_rows",)),
    Mutation(
        "K2", "sink keys: trials rows are read back once per trial id",
        "orchestrator/results/store.py",
        'rows = list({r["trial_id"]: r for r in read_partition(self.root, "trials", self.sweep)}.values())',
        'rows = read_partition(self.root, "trials", self.sweep)',
        ("tests/test_results_sink.py::test_updating_a_row_keeps_one_row_per_trial_when_a_migration_was_cut",)),
    Mutation(
        "K4", "store: a command that read the tables exits with its own code (no reader thread aborts it)",
        "orchestrator/results/store.py",
        "pq.ParquetFile(pa.BufferReader(handle.read())).read(use_threads=False)",
        "pq.read_table(handle)",
        ("tests/test_results_sink.py::test_a_process_that_read_the_tables_exits_cleanly",)),
    Mutation(
        "K3", "sink keys: a trial Tune restarts under a new id (resume --restart-errored) keeps its one row",
        "orchestrator/sweep/sink.py",
        "        self._take_restarted_row(trial, trials)\n",
        "",
        ("tests/test_results_sink.py::test_a_trial_tune_restarts_under_a_new_id_keeps_one_row",)),
    Mutation(
        "T1", "tokenizer rules: from 2025-06-21 the stale tokenizer.json beside the weights is not used",
        "trainer/model/tokenizer_source.py",
        '"moondream2-starmie", own_file_wins=False)',
        '"moondream2-starmie", own_file_wins=True)',
        ("tests/test_tokenizer_source.py::test_a_starmie_revision_uses_starmie_ids_and_template_not_the_stale_files_"
         "beside_it",)),
    Mutation(
        "B1", "baselines: a setting the sweep fixes (its budget, data) keeps the sweep's value",
        "orchestrator/sweep/baselines.py",
        "        elif name in fixed:\n",
        "        elif name in fixed and False:\n",
        ("tests/test_baselines.py::test_the_official_recipe_follows_the_revision_and_is_fitted_to_the_sweep",)),
    Mutation(
        "F1", "fair budgets: max_samples is counted in samples, the same for every grad_accum",
        "trainer/budget.py",
        "        total = epochs_done * per_epoch + math.ceil(rest / batch_size)\n",
        "        total = (epochs_done * per_epoch + math.ceil(rest / batch_size)) * grad_accum\n",
        ("tests/test_budget.py::test_a_sample_budget_is_the_same_data_for_every_grad_accum",)),
    Mutation(
        "F2", "fair budgets: the last optimizer step takes only the micro-batches left",
        "trainer/budget.py",
        "        most = min(self.grad_accum, self.total_micro_batches - micro_batches_done)\n",
        "        most = self.grad_accum\n",
        ("tests/test_budget.py::test_a_sample_budget_is_the_same_data_for_every_grad_accum",)),
    Mutation(
        "P1", "memory prediction: AdamW keeps two states per trained value",
        "trainer/memory/estimate.py",
        "            total += 2 * trained_bytes * tensor.numel + 4",
        "            total += trained_bytes * tensor.numel + 4",
        ("tests/test_memory_model.py::test_optimizer_state_bytes_match_the_real_optimizers_exactly",)),
    Mutation(
        "P2", "memory prediction: unmeasured shapes are corrected by the largest measured/predicted ratio",
        "orchestrator/sweep/gpu_memory.py",
        "        return max(ratios) if ratios else 1.0\n",
        "        return min(ratios) if ratios else 1.0\n",
        ("tests/test_gpu_memory.py::test_measured_peaks_tighten_unmeasured_shapes_and_never_go_below_a_measurement",)),
    Mutation(
        "H1", "held-out selection: the --test-top best trials by the validation objective, ok ones only",
        "orchestrator/sweep/held_out.py",
        "    chosen = ranked_trials(rows)[:test_top]\n",
        "    chosen = list(rows)[:test_top]\n",
        ("tests/test_orchestrator_sweep.py::test_the_held_out_test_takes_the_best_ok_trials_once_per_test_set",)),
    Mutation(
        "H2", "held-out selection: a trial already tested on the same data is not tested again",
        "orchestrator/sweep/held_out.py",
        '    return [r for r in chosen if r.get("test_n") is None or r.get("test_data") != test_data]\n',
        "    return chosen\n",
        ("tests/test_orchestrator_sweep.py::test_the_held_out_test_takes_the_best_ok_trials_once_per_test_set",)),
    Mutation(
        "W1", "--where safety: anything outside the small language is refused, never evaluated",
        "orchestrator/results/where.py",
        '        raise QueryError(f"{flag}: unsupported expression {ast.unparse(node)!r}; use comparisons "\n',
        "        return pc.scalar(bool(eval(ast.unparse(node))))\n"
        '        raise QueryError(f"{flag}: unsupported expression {ast.unparse(node)!r}; use comparisons "\n',
        ("tests/test_results_query.py::test_where_rejects_anything_but_the_small_language",)),
    Mutation(
        "WS1", "warm start: the carried trials reach the study before the first proposal",
        "orchestrator/sweep/search.py",
        "            self.study.add_trials(self.pending_warm_start)\n",
        "            pass\n",
        ("tests/test_warm_start.py::test_the_first_proposal_after_a_warm_start_comes_from_tpe",)),
    Mutation(
        "WS2", "warm start: a source run under another budget is skipped whole",
        "orchestrator/results/study.py",
        "        wrong = [k for k, v in ours.items() if theirs_ran[k] != v]\n",
        "        wrong = []\n",
        ("tests/test_warm_start.py::test_a_source_run_under_other_meaning_settings_is_skipped_whole",)),
    Mutation(
        "TR1", "trackers: a resumed trial's repeated evaluations are not logged twice",
        "orchestrator/tracking/trial_mirror.py",
        "            if step not in self._logged[trial_id]:\n",
        "            if True:\n",
        ("tests/test_trackers.py::test_a_resumed_tensorboard_run_logs_each_evaluation_once",
         "tests/test_orchestrator_embedded.py::test_ctrl_c_after_the_results_disks_failed_saves_the_sweep_and_"
         "resume_puts_back_every_row")),
    Mutation(
        "TR2", "trackers: a tracker that fails mid-sweep is a warning, never an exception in Tune's loop",
        "orchestrator/tracking/trial_mirror.py",
        "        except Exception as e:  # noqa: BLE001 - any tracker error: the sweep goes on without the copy\n",
        "        except ZeroDivisionError as e:\n",
        ("tests/test_trackers.py::test_a_tracker_that_breaks_mid_sweep_is_one_warning_and_nothing_is_raised",)),
    Mutation(
        "TR3", "W&B: a resumed trial goes on in its run (one run id per trial, whichever driver runs it)",
        "orchestrator/tracking/wandb_runs.py",
        "            id=run_id(self.sweep, trial_id), resume=\"allow\",",
        "            id=f\"{run_id(self.sweep, trial_id)}{os.getpid()}\", resume=\"allow\",",
        ("tests/test_orchestrator_embedded.py::test_ctrl_c_after_the_results_disks_failed_saves_the_sweep_and_"
         "resume_puts_back_every_row",)),
    Mutation(
        "TR4", "trackers: a relative SQLite store is made absolute, so resume from another folder finds it",
        "orchestrator/tracking/trackers.py",
        "        return f\"{kind}=sqlite:///{Path(where.removeprefix('sqlite:///')).expanduser().resolve()}\"\n",
        "        return value\n",
        ("tests/test_trackers.py::test_a_place_on_this_machine_is_made_absolute_so_resume_finds_it_from_anywhere",)),
    Mutation(
        "EF1", "efficiency: the report ranks by MFU, not by achieved TFLOP/s, when trials have one",
        "orchestrator/results/report_data.py",
        '    key = "final_mfu" if by_mfu else "final_achieved_tflops"\n',
        '    key = "final_achieved_tflops"\n',
        ("tests/test_report.py::test_efficiency_ranks_by_mfu_beside_the_objective_and_the_query_shows_it",)),
    Mutation(
        "X1", "the copy runs: `python -m orchestrator.cli` started from another folder imports the copy",
        "orchestrator/cli/train.py",
        "def register(",
        "def register(:",
        ("tests/test_checkpoint_layouts.py::test_train_and_predict_read_a_2024_checkpoint_as_they_read_the_2025_"
         "one",)),
    Mutation(
        "X2", "the copy runs: a sweep's Ray workers import the copy",
        "trainer/standin_job.py",
        '    seconds = float(os.environ.get(SECONDS_VARIABLE, "0.5"))\n',
        '    raise RuntimeError("the mutated copy ran in the worker")\n',
        ("tests/test_orchestrator_embedded.py::test_asha_stops_the_weak_trials_of_a_real_sweep_and_budgets_are_"
         "recorded",)),
)


def tree_files(root: Path) -> list[str]:
    """The working tree as git sees it: tracked files as they are now, and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (root / name).is_file()})


def problems(mutation: Mutation, root: Path) -> Optional[str]:
    """Why `mutation` cannot be applied to the tree at `root` as written, or None."""
    path = root / mutation.file
    if not path.is_file():
        return f"{mutation.file}: no such file"
    found = path.read_text().count(mutation.old)
    if found != 1:
        return f"{mutation.file}: its old text is found {found} times, not once"
    return None


def copy_tree(root: Path, target: Path) -> None:
    """Copy the tree as it is now; a file removed between the listing and its copy is left out, as it is gone."""
    for name in tree_files(root):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.copy2(root / name, target / name)


def run_tests(copy: Path, tests: tuple[str, ...], timeout_s: float, log: Path) -> tuple[str, float]:
    """Run `tests` in `copy`, as the copy's own code; (status, seconds). The output goes to `log`."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    env.pop("RAY_ADDRESS", None)  # the tests start their own embedded clusters
    started = time.monotonic()
    with open(log, "w") as out:
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                  cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - started
    status = {0: "survived", 1: "caught", 2: "caught"}.get(done.returncode, f"error (pytest exit {done.returncode})")
    return status, time.monotonic() - started


def check_mutation(mutation: Optional[Mutation], tests: tuple[str, ...], root: Path, timeout_s: float,
                   logs: Path) -> tuple[str, float]:
    """Copy the tree, apply `mutation` (None: leave it whole), run `tests` there, remove the copy."""
    copy = Path(tempfile.mkdtemp(prefix=f"mdsweep-mutation-{mutation.name if mutation else 'clean'}-"))
    try:
        copy_tree(root, copy)
        if mutation is not None:
            path = copy / mutation.file
            path.write_text(path.read_text().replace(mutation.old, mutation.new))
        return run_tests(copy, tests, timeout_s, logs / f"{mutation.name if mutation else 'clean'}.log")
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these entries only (e.g. M1 K2)")
    parser.add_argument("--check-clean", action="store_true",
                        help="first run every named test on an unbroken copy; stop if any fails")
    parser.add_argument("--timeout", type=float, default=900, help="seconds an entry's tests may take")
    parser.add_argument("--logs", type=Path, default=None,
                        help="keep each entry's pytest output here (default: a temporary folder, removed)")
    args = parser.parse_args()

    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:3} {m.promise}\n    {m.file}; tests: {' '.join(m.tests)}")
        return 0
    by_name = {m.name: m for m in MUTATIONS}
    if len(by_name) < len(MUTATIONS):  # --only would pick one of two entries of a name, and a table mix them
        twice = sorted({m.name for m in MUTATIONS if sum(o.name == m.name for o in MUTATIONS) > 1})
        raise SystemExit(f"mutations.py: entry names used twice: {', '.join(twice)}")
    unknown = [name for name in args.only or () if name not in by_name]
    if unknown:
        parser.error(f"--only: no entry {', '.join(unknown)}; entries: {', '.join(by_name)}")
    chosen = [by_name[name] for name in args.only] if args.only else list(MUTATIONS)
    rotted = [f"{m.name}: {why}" for m in chosen if (why := problems(m, ROOT))]
    if rotted:
        print("refused: entries that no longer match the code (mend them):\n  " + "\n  ".join(rotted),
              file=sys.stderr)
        return 2

    logs = args.logs or Path(tempfile.mkdtemp(prefix="mdsweep-mutation-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    try:
        if args.check_clean:
            named = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            status, seconds = check_mutation(None, named, ROOT, args.timeout * len(chosen), logs)
            print(f"unbroken copy: named tests {'pass' if status == 'survived' else status} ({seconds:.0f} s)",
                  flush=True)
            if status != "survived":
                print(f"the named tests must pass on the unbroken code first; see {logs / 'clean.log'}",
                      file=sys.stderr)
                return 1
        print(f"{'entry':5} {'result':9} {'s':>5}  tests", flush=True)
        rows = []
        for m in chosen:
            status, seconds = check_mutation(m, m.tests, ROOT, args.timeout, logs)
            rows.append((m, status, seconds))
            print(f"{m.name:5} {status:9} {seconds:5.0f}  {' '.join(m.tests)}", flush=True)
        caught = sum(1 for _, status, _ in rows if status == "caught")
        print(f"total: {caught} of {len(rows)} caught in {sum(s for _, _, s in rows):.0f} s"
              + ("" if caught == len(rows) else "; not caught: "
                 + ", ".join(f"{m.name} ({status})" for m, status, _ in rows if status != "caught")))
        if args.logs:
            print(f"pytest output of each entry: {logs}")
        return 0 if caught == len(rows) else 1
    finally:
        if not args.logs:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
