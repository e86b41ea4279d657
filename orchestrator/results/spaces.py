"""Search spaces: finding them, and validating them before anything is scheduled.

A search space is an Optuna define-by-run function, `space(trial) -> dict`, whose
returned keys are JobConfig fields and whose values are constants. Suggestions the
function makes but does not return (e.g. a `log_lr` it turns into `lr`) are kept
by Optuna as parameters but not passed to the job. A function returning None
passes every suggestion, which then must be a JobConfig field.

Here, under both the sweep and its readers, because both run a space: the sweep to search it and check it
before anything is scheduled, `mdsweep study` to probe it again for each parameter's range. The suggestion
keys (`_group`, `_member`, ...) live here for the same reason. Ray-free; Optuna only inside `validate_space`.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.results.job_values import check_value, normalize_value
from trainer.job_config import JobConfig

DEFAULT_SPACE = "captcha"
SPACE_PACKAGE = "search_spaces"
GROUP_KEY = "_group"
MEMBER_KEY = "_member"
DROP_KEY = "_drop"
BASELINE_KEY = "_baseline"  # the label of the --enqueue baseline a trial runs
BASELINE_EXTRA_KEY = "_baseline_extra"  # the settings applied to that baseline only (not searched)


class SpaceError(ValueError):
    """A search space that cannot be used; raised before anything is scheduled."""


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
    # each Optuna parameter the space suggests, with its distribution (the union over the probes)
    distributions: dict[str, Any] = field(default_factory=dict)


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
        distributions: dict[str, Any] = {}
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
            try:
                JobConfig.from_dict({**fixed, **{k: normalize_value(k, v) for k, v in out.items()}})
            except Exception as e:
                raise SpaceError(f"--space {spec!r}: JobConfig rejects a suggestion ({e})") from None
            searched.update(out)
            auxiliary.update(drop)
            samples.append(out)
            distributions.update(trial.distributions)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if not searched:
            raise SpaceError(f"--space {spec!r}: the space chose no JobConfig parameter")
    finally:
        optuna.logging.set_verbosity(previous)
    return SpaceInfo(spec=spec, searched=sorted(searched), auxiliary=sorted(auxiliary), samples=samples,
                     distributions=distributions)
