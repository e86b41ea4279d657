"""The end of a sweep run with --test-data: its best trials tested once on held-out data.

The search chose by the validation metric, so the best trial's validation number
is an optimistic estimate; a test on data that no choice was made on is not. Each
of the --test-top best trials (by the objective, as `mdsweep export --best`
picks) is rebuilt from its final checkpoint, as an export does, and evaluated in a
Ray task with a trial's resources, so on a GPU node when trials ran on GPUs. The
numbers land in the trial's row (`test_*` columns); a resumed sweep does not test
a trial twice on the same data.
"""
from __future__ import annotations

from typing import Any, Callable

from orchestrator.cluster.resources import TrialResources
from orchestrator.cluster.trial_checkpoint import job_config_of, local_checkpoint
from orchestrator.results.ranking import describe_test, ranked_trials
from orchestrator.sweep.settings import SweepSettings


def test_best_trials(s: SweepSettings, req: TrialResources, say: Callable[[str], None]) -> None:
    """Test the sweep's top trials on s.test_data and record the results; a failed test is said, not raised:
    the sweep's results have landed either way."""
    import ray

    from orchestrator.results.store import read_partition, update_trial_row

    todo = trials_to_test(read_partition(s.results, "trials", s.name), s.test_top, s.test_data)
    if not todo:
        return
    say(f"testing the {len(todo)} best trial(s) on --test-data {s.test_data}")
    task = ray.remote(_test_trial).options(num_cpus=req.cpus, num_gpus=req.gpus, max_retries=0)
    pending = {row["trial_id"]: task.remote(row, s.experiment_path(), s.test_data) for row in todo}
    for trial_id, ref in pending.items():
        try:
            metrics = ray.get(ref)
        except Exception as e:  # a task error arrives wrapped: its last line says what went wrong
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            say(f"test of trial {trial_id} failed: {last}")
            continue
        update_trial_row(s.results, s.name, trial_id, {**metrics, "test_data": s.test_data})
        say(f"trial {trial_id}: test {describe_test(metrics)}")


def trials_to_test(rows: list[dict[str, Any]], test_top: int, test_data: str) -> list[dict[str, Any]]:
    """Of the `test_top` best trials (ok ones, by the objective, as `export --best` ranks them), those not yet
    tested on `test_data`: the choice is made on validation alone, and a resumed sweep tests no trial twice."""
    chosen = ranked_trials(rows)[:test_top]
    return [r for r in chosen if r.get("test_n") is None or r.get("test_data") != test_data]


def _test_trial(row: dict[str, Any], experiment_path: str, test_data: str) -> dict[str, Any]:
    from trainer.held_out import test_checkpoint

    with local_checkpoint(row, experiment_path) as checkpoint:
        return test_checkpoint(checkpoint, job_config_of(row), test_data, final_step=row["steps_completed"])
