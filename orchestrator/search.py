"""Search spaces, their validation, the Optuna searcher and the early-stopping scheduler.

A search space is an Optuna define-by-run function, `space(trial) -> dict`, whose
returned keys are JobConfig fields and whose values are constants. Suggestions the
function makes but does not return (e.g. a `log_lr` it turns into `lr`) are kept
by Optuna as parameters but not passed to the job. A function returning None
passes every suggestion, which then must be a JobConfig field.

`SweepSearcher` wraps Ray Tune's `OptunaSearch` (TPE, seeded, constant liar for
parallel trials) and adds three things:
- outcomes: `ok` is told to Optuna as COMPLETE with the metric, `oom` and
  `error` as FAIL, `diverged` and trials stopped by the scheduler as PRUNED;
- groups: with `--replicates K` and/or `--cross FIELD`, every suggestion runs
  once per seed / per value of FIELD, and Optuna is told the group's mean;
- the concurrency limit, with its state saved with the experiment (so a resumed
  sweep neither forgets running trials nor exceeds the limit).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import math
import numbers
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from orchestrator.results_schema import job_field_types

DEFAULT_SPACE = "captcha"
SPACE_PACKAGE = "search_spaces"
GROUP_KEY = "_group"
MEMBER_KEY = "_member"
DROP_KEY = "_drop"


class SpaceError(ValueError):
    """A search space that cannot be used; raised before anything is scheduled."""


# ---------------------------------------------------------------- values and types


def literal_choices(tp: Any) -> Optional[tuple]:
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def type_name(tp: Any, optional: bool) -> str:
    choices = literal_choices(tp)
    base = ("one of " + ", ".join(repr(c) for c in choices)) if choices else getattr(tp, "__name__", str(tp))
    return base + (" or None" if optional else "")


def check_value(name: str, value: Any) -> Optional[str]:
    """None when `value` suits JobConfig field `name`, else why not."""
    types_ = job_field_types()
    if name not in types_:
        return f"{name!r} is not a JobConfig field"
    tp, optional = types_[name]
    if value is None:
        return None if optional else f"{name} cannot be None"
    choices = literal_choices(tp)
    if choices is not None:
        return None if value in choices else f"{name}={value!r} is not {type_name(tp, optional)}"
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        ok = True
    return None if ok else f"{name}={value!r} ({type(value).__name__}) should be {type_name(tp, optional)}"


def normalize_value(name: str, value: Any) -> Any:
    """Plain Python values (numpy scalars from categorical choices become int/float)."""
    tp, _ = job_field_types()[name]
    if value is None:
        return None
    if tp is float and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_value(name: str, text: str, flag: str = "--set") -> Any:
    """Parse `text` as the type of JobConfig field `name` (for --set key=value)."""
    types_ = job_field_types()
    if name not in types_:
        raise ValueError(f"{flag}: {name!r} is not a JobConfig field; fields: {', '.join(sorted(types_))}")
    tp, optional = types_[name]
    if optional and text.strip().lower() in ("none", "null"):
        return None
    choices = literal_choices(tp)
    if choices is not None:
        for c in choices:
            if str(c) == text:
                return c
        raise ValueError(f"{flag}: {name}={text!r} is not {type_name(tp, optional)}")
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise ValueError(f"{flag}: {name}={text!r} should be {type_name(tp, optional)}") from None
    return text


def parse_assignments(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag}: expected key=value, got {item!r}")
        if key in out:
            raise ValueError(f"{flag}: {key} given twice")
        out[key] = parse_value(key, text, flag)
    return out


# ---------------------------------------------------------------- loading spaces


def resolve_space_spec(spec: str) -> tuple[str, str]:
    """'captcha' -> ('search_spaces.captcha', 'space'); 'pkg.mod:fn'; 'path/file.py:fn'."""
    spec = (spec or DEFAULT_SPACE).strip()
    target, func = spec.rsplit(":", 1) if ":" in spec else (spec, "space")
    if not target or not func:
        raise SpaceError(f"--space {spec!r}: expected NAME, module:function or file.py:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise SpaceError(f"--space {spec!r}: no such file {path}")
        return str(path), func
    if "." not in target and importlib.util.find_spec(f"{SPACE_PACKAGE}.{target}") is not None:
        target = f"{SPACE_PACKAGE}.{target}"
    return target, func


def load_space_function(spec: str) -> Callable:
    target, func = resolve_space_spec(spec)
    try:
        if target.endswith(".py"):
            mod_name = f"_mdsweep_space_{abs(hash(target))}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, target)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except SpaceError:
        raise
    except Exception as e:
        raise SpaceError(f"--space {spec!r}: cannot import {target} ({type(e).__name__}: {e})") from None
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        available = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                     and getattr(v, "__module__", None) == module.__name__]
        raise SpaceError(f"--space {spec!r}: {target} has no function {func!r}"
                         + (f"; it has: {', '.join(available)}" if available else ""))
    return fn


def list_spaces() -> list[str]:
    """The modules of the search_spaces package (each offers at least `space`)."""
    import pkgutil

    pkg = importlib.import_module(SPACE_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


class SpaceFunction:
    """A picklable define-by-run function: stores its spec, loads the code lazily.

    OptunaSearch pickles its space with the experiment state, so it must not be a
    closure. Returns the chosen config plus `_drop`: suggestion names that are not
    part of the config (OptunaSearch merges every suggestion into the result).
    """

    def __init__(self, spec: str):
        self.spec = spec
        self._fn: Optional[Callable] = None

    def __getstate__(self) -> dict:
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.spec = state["spec"]
        self._fn = None

    @property
    def fn(self) -> Callable:
        if self._fn is None:
            self._fn = load_space_function(self.spec)
        return self._fn

    def __call__(self, trial: Any) -> dict[str, Any]:
        ret = self.fn(trial)
        suggested = dict(trial.params)
        if ret is None:
            chosen = dict(suggested)
        elif isinstance(ret, dict):
            chosen = dict(ret)
        else:
            raise SpaceError(f"--space {self.spec!r}: the function returned {type(ret).__name__}, not a dict")
        chosen[DROP_KEY] = [k for k in suggested if k not in chosen]
        return chosen


def split_suggestion(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job params, bookkeeping) from a trial config made by SweepSearcher."""
    params, meta = {}, {}
    drop = set(config.get(DROP_KEY) or ())
    for k, v in config.items():
        if k.startswith("_"):
            meta[k] = v
        elif k not in drop:
            params[k] = v
    return params, meta


@dataclass
class SpaceInfo:
    spec: str
    searched: list[str]  # config keys the space returns (on any probe)
    auxiliary: list[str]  # suggestions that are not config keys
    samples: list[dict[str, Any]] = field(default_factory=list)


def validate_space(spec: str, fixed: dict[str, Any], probes: int = 12, seed: int = 0) -> SpaceInfo:
    """Run the space on throwaway Optuna trials and check what it returns.

    Checks: it runs; it returns a dict (or None); every key is a JobConfig field;
    every value is a constant of that field's type; the space's keys do not clash
    with fixed settings; and JobConfig accepts fixed + suggested values together.
    Random probes cover the branches of conditional spaces.
    """
    import optuna

    fn = SpaceFunction(spec)
    _ = fn.fn  # import errors first
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        searched: set[str] = set()
        auxiliary: set[str] = set()
        samples = []
        for _i in range(max(1, probes)):
            trial = study.ask()
            try:
                out = fn(trial)
            except SpaceError:
                raise
            except Exception as e:
                raise SpaceError(f"--space {spec!r}: the function raised on a probe trial "
                                 f"({type(e).__name__}: {e})") from None
            drop = out.pop(DROP_KEY)
            problems = []
            for k, v in out.items():
                if k.startswith("_"):
                    problems.append(f"{k!r}: names starting with '_' are reserved")
                    continue
                why = check_value(k, v)
                if why:
                    problems.append(why)
            if problems:
                raise SpaceError(f"--space {spec!r}: " + "; ".join(problems))
            clash = sorted(set(out) & set(fixed))
            if clash:
                raise SpaceError(f"--space {spec!r} searches {', '.join(clash)}, which is also fixed by a flag "
                                 "(--set or a named flag); drop one of them")
            from trainer.job_config import JobConfig

            try:
                JobConfig.from_dict({**fixed, **{k: normalize_value(k, v) for k, v in out.items()}})
            except Exception as e:
                raise SpaceError(f"--space {spec!r}: JobConfig rejects a suggestion ({e})") from None
            searched.update(out)
            auxiliary.update(drop)
            samples.append(out)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if not searched:
            raise SpaceError(f"--space {spec!r}: the space chose no JobConfig parameter")
    finally:
        optuna.logging.set_verbosity(previous)
    return SpaceInfo(spec=spec, searched=sorted(searched), auxiliary=sorted(auxiliary), samples=samples)


# ---------------------------------------------------------------- groups


def parse_cross(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """'attention' -> ('attention', ['causal', 'prefix']); 'lr=1e-4,1e-5' -> explicit values."""
    out = []
    seen = set()
    types_ = job_field_types()
    for item in items or ():
        name, sep, values = item.partition("=")
        name = name.strip()
        if name not in types_:
            raise ValueError(f"--cross: {name!r} is not a JobConfig field")
        if name in seen:
            raise ValueError(f"--cross: {name} given twice")
        seen.add(name)
        if sep:
            vals = [parse_value(name, v.strip(), "--cross") for v in values.split(",") if v.strip()]
        else:
            choices = literal_choices(types_[name][0])
            if choices is None and types_[name][0] is bool:
                choices = (False, True)
            if choices is None:
                raise ValueError(f"--cross {name}: give its values, e.g. --cross {name}=a,b")
            vals = list(choices)
        if len(vals) < 2:
            raise ValueError(f"--cross {name}: needs at least two values")
        out.append((name, vals))
    return out


def build_expansions(replicates: int, base_seed: int, cross: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every suggestion runs once per element: seeds x crossed values (in that order)."""
    if replicates < 1:
        raise ValueError("--replicates must be >= 1")
    axes: list[list[tuple[str, Any]]] = [[(name, v) for v in vals] for name, vals in cross]
    if replicates > 1:
        axes.append([("seed", base_seed + i) for i in range(replicates)])
    if not axes:
        return [{}]
    return [dict(combo) for combo in itertools.product(*axes)]


# ---------------------------------------------------------------- the searcher


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def make_searcher(space: str, metric: str, mode: str, seed: int, expansions: list[dict[str, Any]],
                  max_concurrent: Optional[int]) -> "Any":
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    sampler = TPESampler(seed=seed, constant_liar=True)
    inner = OptunaSearch(space=SpaceFunction(space), metric=metric, mode=mode, sampler=sampler)
    return SweepSearcher(inner, metric=metric, mode=mode, expansions=expansions, max_concurrent=max_concurrent)


def _searcher_base():
    from ray.tune.search import Searcher

    return Searcher


class SweepSearcher(_searcher_base()):
    """OptunaSearch plus outcomes, replicate/cross groups and a saved concurrency limit."""

    def __init__(self, searcher: Any, metric: str, mode: str, expansions: Optional[list[dict]] = None,
                 max_concurrent: Optional[int] = None):
        super().__init__(metric=metric, mode=mode)
        self.searcher = searcher  # the attribute name SearchGenerator looks for to save wrappers
        self.expansions = expansions or [{}]
        self.max_concurrent = max_concurrent
        self.queue: list[tuple[str, int]] = []  # (inner id, member) waiting for a Tune trial
        self.groups: dict[str, dict[str, Any]] = {}
        self.trial_member: dict[str, tuple[str, int]] = {}
        self.live: set[str] = set()
        self.told: dict[str, tuple[str, Optional[float]]] = {}  # inner id -> (state, value)
        self._counter = 0

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
        self.__dict__.update(state)

    def save(self, checkpoint_path: str):
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str):
        self.searcher.restore(checkpoint_path)

    # suggestions
    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None
        if not self.queue:
            inner_id = f"g{self._counter:05d}"
            config = self.searcher.suggest(inner_id)
            if config is None or config == self.FINISHED:
                return config
            self._counter += 1
            params, _meta = split_suggestion(config)
            number = self.searcher._ot_trials[inner_id].number
            self.groups[inner_id] = {"number": number, "params": params, "size": len(self.expansions),
                                     "done": {}}
            self.queue.extend((inner_id, i) for i in range(len(self.expansions)))
        inner_id, member = self.queue.pop(0)
        group = self.groups[inner_id]
        self.trial_member[trial_id] = (inner_id, member)
        self.live.add(trial_id)
        return {**group["params"], **self.expansions[member], GROUP_KEY: group["number"], MEMBER_KEY: member}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        where = self.trial_member.get(trial_id)
        if where is None or len(self.expansions) != 1:
            return  # groups: intermediate values of several runs would collide in one Optuna trial
        value = result.get(self.metric)
        if not _finite(value) or result.get("outcome", "running") != "running":
            return
        try:
            self.searcher.on_trial_result(where[0], {**result, self.metric: float(value),
                                                     "training_iteration": int(result.get("step") or 0)})
        except Exception:
            pass  # intermediate values are informative only

    def classify(self, result: Optional[dict], error: bool) -> tuple[str, Optional[float]]:
        if error:
            return "FAIL", None
        if not result:
            return "PRUNED", None
        outcome = result.get("outcome")
        value = result.get(self.metric)
        if outcome == "ok":
            return ("COMPLETE", float(value)) if _finite(value) else ("FAIL", None)
        if outcome in ("oom", "error"):
            return "FAIL", None
        return "PRUNED", None  # diverged, or stopped early by the scheduler

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        where = self.trial_member.get(trial_id)
        if where is None:
            return
        inner_id, member = where
        group = self.groups[inner_id]
        if member in group["done"] or inner_id in self.told:
            return
        group["done"][member] = self.classify(result, error)
        if len(group["done"]) < group["size"]:
            return
        states = list(group["done"].values())
        values = [v for s, v in states if s == "COMPLETE"]
        if values:
            state, value = "COMPLETE", sum(values) / len(values)
        elif any(s == "PRUNED" for s, _ in states):
            state, value = "PRUNED", None
        else:
            state, value = "FAIL", None
        self.told[inner_id] = (state, value)
        if state == "COMPLETE":
            self.searcher.on_trial_complete(inner_id, result={self.metric: value}, error=False)
        else:
            self.searcher.on_trial_complete(inner_id, result=None, error=(state == "FAIL"))

    @property
    def study(self) -> Any:
        return self.searcher._ot_study


# ---------------------------------------------------------------- early stopping


def _asha_base():
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler


class FinishingASHA(_asha_base()):
    """ASHA that never stops a trial at or past its last step.

    A trial's last evaluation is also its end: stopping it there (plain ASHA stops
    every trial that reaches `max_t`) would kill the job before it returns its
    outcome and predictions. Trials that reach the end finish on their own.
    """

    def on_trial_result(self, tune_controller, trial, result):
        from ray.tune.schedulers import TrialScheduler

        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_scheduler(kind: str, metric: str, mode: str, max_t: Optional[int], grace: Optional[int],
                   reduction_factor: float) -> Any:
    """None (run every trial to the end) or ASHA on `metric`, with `step` as time."""
    if kind in (None, "", "none"):
        return None
    if kind != "asha":
        raise ValueError(f"--early-stop: unknown scheduler {kind!r}; choose none or asha")
    if not max_t:
        raise ValueError("--early-stop asha needs the trial length in steps: give --max-steps")
    max_t = int(max_t)
    grace = int(grace or max(1, max_t // 8))
    if grace >= max_t:
        raise ValueError(f"--asha-grace {grace} must be below the trial length ({max_t} steps)")
    if reduction_factor <= 1:
        raise ValueError("--asha-reduction-factor must be > 1")
    return FinishingASHA(time_attr="step", metric=metric, mode=mode, max_t=max_t, grace_period=grace,
                         reduction_factor=reduction_factor, stop_last_trials=False)
