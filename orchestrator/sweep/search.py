"""The Optuna searcher of a sweep (Ray Tune's OptunaSearch, wrapped).

`SweepSearcher` wraps Ray Tune's `OptunaSearch` (TPE, seeded, constant liar for
parallel trials) and adds four things:
- outcomes: `ok` is told to Optuna as COMPLETE with the metric, `oom` and
  `error` as FAIL, `diverged` and trials stopped by the scheduler as PRUNED;
- groups: with `--replicates K` and/or `--cross FIELD`, every suggestion runs
  once per seed / per value of FIELD (orchestrator.results.groups), and Optuna is told the
  group's mean;
- the concurrency limit, with its state saved with the experiment (so a resumed
  sweep neither forgets running trials nor exceeds the limit);
- memory: measured peaks and out-of-memory shapes go into the sweep's MemoryBook
  (orchestrator.sweep.gpu_memory), and a proposal whose shape cannot fit is not run.
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Any, Optional, Sequence

from ray.tune.search import Searcher

from orchestrator.results.groups import group_state, member_state
from orchestrator.results.objectives import is_finite_number
from orchestrator.results.spaces import BASELINE_EXTRA_KEY, BASELINE_KEY, GROUP_KEY, MEMBER_KEY, SpaceFunction, \
    split_suggestion

def make_searcher(space: str, metric: str, mode: str, seed: int, expansions: list[dict[str, Any]],
                  max_concurrent: Optional[int], sweep: Optional[str] = None,
                  fixed: Optional[dict[str, Any]] = None,
                  objectives: Sequence[tuple[str, str]] = (),
                  baselines: Sequence[dict[str, Any]] = (), warm_start: Sequence[Any] = ()) -> "Any":
    """The sweep's searcher; two or more `objectives` make Optuna search for their Pareto front (multi-objective
    TPE) while `metric` stays the one the scheduler and the tables rank by. `warm_start` (Optuna FrozenTrials of
    earlier sweeps, results.study.carried_trials) is added to the study before the first proposal."""
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    objectives = list(objectives) if len(objectives) > 1 else [(metric, mode)]
    sampler = TPESampler(seed=seed, constant_liar=True)
    if len(objectives) > 1:
        inner = OptunaSearch(space=SpaceFunction(space), metric=[m for m, _ in objectives],
                             mode=[d for _, d in objectives], sampler=sampler)
    else:
        inner = OptunaSearch(space=SpaceFunction(space), metric=metric, mode=mode, sampler=sampler)
    return SweepSearcher(inner, metric=metric, mode=mode, expansions=expansions, max_concurrent=max_concurrent,
                         sweep=sweep, fixed=fixed, objectives=objectives, baselines=baselines,
                         warm_start=warm_start)


# proposals in a row whose memory shape cannot fit, after which the search stops instead of spinning
MAX_REJECTED_IN_A_ROW = 50


class SweepSearcher(Searcher):
    """OptunaSearch plus outcomes, replicate/cross groups, a saved concurrency limit, and memory: proposals whose
    shape ran out of memory (or fits no GPU) are told to Optuna as failed and resampled, not run."""

    def __init__(self, searcher: Any, metric: str, mode: str, expansions: Optional[list[dict]] = None,
                 max_concurrent: Optional[int] = None, sweep: Optional[str] = None,
                 fixed: Optional[dict[str, Any]] = None, objectives: Sequence[tuple[str, str]] = (),
                 baselines: Sequence[dict[str, Any]] = (), warm_start: Sequence[Any] = ()):
        from orchestrator.sweep.gpu_memory import book_for

        super().__init__(metric=metric, mode=mode)
        self.objectives = [tuple(o) for o in objectives] or [(metric, mode)]
        self.sweep = sweep
        self.fixed = dict(fixed or {})
        self.book = book_for(sweep) if sweep else None
        self.searcher = searcher  # the attribute name SearchGenerator looks for to save wrappers
        self.expansions = expansions or [{}]
        self.max_concurrent = max_concurrent
        self.queue: list[tuple[str, int]] = []  # (inner id, member) waiting for a Tune trial
        self.groups: dict[str, dict[str, Any]] = {}
        self.trial_member: dict[str, tuple[str, int]] = {}
        self.live: set[str] = set()
        self.told: dict[str, tuple[str, Optional[float]]] = {}  # inner id -> (state, value)
        self._counter = 0
        # --enqueue (orchestrator.sweep.baselines): proposals made first, through Optuna's enqueued trials
        self.pending_baselines: list[dict[str, Any]] = [dict(b) for b in baselines]
        # --warm-start: told to the study once, before the first proposal; the study (saved with the experiment)
        # then holds them, so a resumed sweep does not add them again
        self.pending_warm_start: list[Any] = list(warm_start)

    # Tune plumbing
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        state.pop("searcher")
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        from orchestrator.sweep.gpu_memory import register_book

        self.__dict__.update(state)
        if getattr(self, "book", None) is not None:
            register_book(self.sweep, self.book)  # the resource function finds the restored book by name

    def save(self, checkpoint_path: str):
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str):
        self.searcher.restore(checkpoint_path)

    # suggestions
    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None
        if getattr(self, "pending_warm_start", None):  # a state saved before --warm-start existed has none
            self.study.add_trials(self.pending_warm_start)
            self.pending_warm_start = []
        if not self.queue:
            for _ in range(MAX_REJECTED_IN_A_ROW):
                inner_id = f"g{self._counter:05d}"
                pending = getattr(self, "pending_baselines", [])  # a state saved before --enqueue existed has none
                baseline = pending[0] if pending else None
                if baseline is not None:
                    # an enqueued trial: the define-by-run space's suggest_* calls return these values
                    self.study.enqueue_trial(baseline["params"], skip_if_exists=False)
                config = self.searcher.suggest(inner_id)
                if config is None or config == self.FINISHED:
                    return config
                self._counter += 1
                if baseline is not None:
                    pending.pop(0)
                params, _meta = split_suggestion(config)
                extra = baseline["extra"] if baseline is not None else {}
                if not self._reject(inner_id, {**params, **extra}):
                    break
            else:
                print(f"mdsweep: the last {MAX_REJECTED_IN_A_ROW} proposals all had memory shapes that ran out of "
                      "memory or fit no GPU; stopping the search", file=sys.stderr, flush=True)
                return self.FINISHED
            number = self.searcher._ot_trials[inner_id].number
            self.groups[inner_id] = {"number": number, "params": {**params, **extra}, "size": len(self.expansions),
                                     "done": {}, "baseline": baseline["label"] if baseline is not None else None,
                                     "baseline_extra": sorted(extra)}
            self.queue.extend((inner_id, i) for i in range(len(self.expansions)))
        inner_id, member = self.queue.pop(0)
        group = self.groups[inner_id]
        self.trial_member[trial_id] = (inner_id, member)
        self.live.add(trial_id)
        config = {**group["params"], **self.expansions[member], GROUP_KEY: group["number"], MEMBER_KEY: member}
        if group.get("baseline"):
            config.update({BASELINE_KEY: group["baseline"], BASELINE_EXTRA_KEY: group["baseline_extra"]})
        return config

    def _configs(self, params: dict[str, Any]) -> list[Any]:
        from orchestrator.sweep.trainable import job_config_from

        return [job_config_from(self.fixed, {**params, **expansion}) for expansion in self.expansions]

    def _reject(self, inner_id: str, params: dict[str, Any]) -> bool:
        """Tell Optuna a proposal failed without running it when one of its runs cannot fit."""
        if self.book is None:
            return False
        why = next((w for w in map(self.book.cannot_fit, self._configs(params)) if w), None)
        if why is None:
            return False
        self.book.rejected += 1
        self.told[inner_id] = ("FAIL", None)
        self.searcher.on_trial_complete(inner_id, result=None, error=True)
        print(f"mdsweep: not running {params}: {why}", file=sys.stderr, flush=True)
        return True

    def _observe(self, inner_id: str, member: int, result: Optional[dict]) -> None:
        """Record a finished run's measured GPU peak (when its job trained on a GPU) or its out-of-memory outcome.
        On several workers the peak is the largest rank's: each worker's GPU must hold it (the trial's driver holds
        no GPU, so its `gpu_ids` say nothing of where the job ran)."""
        if self.book is None or not result:
            return
        outcome = result.get("outcome")
        if outcome != "oom" and result.get("device_name") in (None, "cpu"):
            return  # a CPU run's peak is host memory, not a GPU reading
        config = self._configs(self.groups[inner_id]["params"])[member]
        peaks = [p for p in result.get("rank_peak_memory_bytes") or [result.get("peak_memory_bytes")] if p]
        self.book.observe(config, outcome, max(peaks, default=None))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        where = self.trial_member.get(trial_id)
        if where is None or len(self.expansions) != 1 or len(self.objectives) > 1:
            # groups: intermediate values of several runs would collide in one Optuna trial; several objectives:
            # Optuna keeps no intermediate values for them
            return
        value = result.get(self.metric)
        if not is_finite_number(value) or result.get("outcome", "running") != "running":
            return
        try:
            # a retried trial reports its checkpoint's step again, which Optuna would warn about on the terminal
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.searcher.on_trial_result(where[0], {**result, self.metric: float(value),
                                                         "training_iteration": int(result.get("step") or 0)})
        except Exception:
            pass  # intermediate values are informative only

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        where = self.trial_member.get(trial_id)
        if where is None:
            return
        inner_id, member = where
        group = self.groups[inner_id]
        if member in group["done"] or inner_id in self.told:
            return
        self._observe(inner_id, member, result)
        group["done"][member] = ("FAIL", None) if error else member_state(
            result, [metric for metric, _ in self.objectives])
        if len(group["done"]) < group["size"]:
            return
        state, value = group_state(list(group["done"].values()))
        self.told[inner_id] = (state, value)
        if state == "COMPLETE":
            self.searcher.on_trial_complete(
                inner_id, result={metric: v for (metric, _), v in zip(self.objectives, value)}, error=False)
        else:
            self.searcher.on_trial_complete(inner_id, result=None, error=(state == "FAIL"))

    @property
    def study(self) -> Any:
        return self.searcher._ot_study
