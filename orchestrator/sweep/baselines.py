"""Known-good starting points a sweep runs first (`--enqueue`), so that its answer is judged against the recipe
users would otherwise copy.

A baseline is a set of JobConfig settings: the official fine-tuning recipe of the model being swept (`official`)
or each entry of a JSON file. It is fitted to the sweep before anything runs:
- a setting the space searches under the same name is handed to Optuna as an enqueued trial (a categorical value
  the space does not offer becomes its nearest offered value, a number outside the range its nearest bound), so
  Optuna learns from the baseline like from any proposal;
- a setting the sweep fixes (a flag or --set: its budget, data and model) or crosses keeps the sweep's values, so
  the comparison is fair;
- any other setting (an optimizer, betas the space does not search) is applied to the baseline's runs only.
Every adjustment is said before the sweep starts. Free of Ray and Optuna.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from orchestrator.results.job_values import check_value, normalize_value
from trainer.job_config import JobConfig
from trainer.model.tokenizer_source import DATED_REVISION

OFFICIAL = "official"
# Read from the official code (vikhyat/moondream): the fine-tuning notebook of 2024-05-08 for the 2024 revisions
# (batch 8 x grad_accum 2, lr 1e-5, bitsandbytes Adam8bit betas 0.9/0.95 eps 1e-6, text decoder only; test exact
# match 78.65 %), and `finetune_text.py` for the 2025 revisions (batch 1 x grad_accum 128, lr 3e-6, AdamW8bit with
# the same betas and eps). Epochs are the sweep's budget, never the recipe's.
NOTEBOOK_2024 = {"lr": 1e-5, "batch_size": 8, "grad_accum": 2, "optimizer": "adamw8bit", "adam_beta1": 0.9,
                 "adam_beta2": 0.95, "adam_eps": 1e-6, "train_scope": "text"}
FINETUNE_TEXT_2025 = {"lr": 3e-6, "batch_size": 1, "grad_accum": 128, "optimizer": "adamw8bit", "adam_beta1": 0.9,
                      "adam_beta2": 0.95, "adam_eps": 1e-6, "train_scope": "text"}


class BaselineError(ValueError):
    """An --enqueue that cannot be used: the message names the flag, the file and the entry."""


@dataclass
class Baseline:
    """One baseline fitted to a sweep: what goes to Optuna, what applies to its runs only, and what was changed."""

    label: str
    params: dict[str, Any]  # Optuna parameters of the space, enqueued
    extra: dict[str, Any]  # settings neither searched, fixed nor crossed: applied to the baseline's runs only
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in {**self.params, **self.extra}.items())
        return f"baseline {self.label}: {settings or 'the sweep as it is'}" + \
            "".join(f"\n  {note}" for note in self.notes)


def official_recipe(revision: Optional[str]) -> tuple[str, dict[str, Any]]:
    """(label, settings) of the official recipe for a model at `revision`: the 2025 script from 2025-01-09 on,
    else the 2024 notebook (also for presets and shipped bases, which have no recipe of their own)."""
    if revision and DATED_REVISION.match(revision) and revision >= "2025-01-09":
        return "official (finetune_text.py, 2025)", dict(FINETUNE_TEXT_2025)
    return "official (notebook, 2024-05-08)", dict(NOTEBOOK_2024)


def read_baselines(spec: str, revision: Optional[str]) -> list[tuple[str, dict[str, Any]]]:
    """`official`, or a JSON file holding a list of settings objects (each may name itself with "name")."""
    if spec == OFFICIAL:
        return [official_recipe(revision)]
    path = Path(spec).expanduser()
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"--enqueue {spec}: no such file (give `official` or a JSON file)") from None
    except (OSError, ValueError) as e:
        raise BaselineError(f"--enqueue {spec}: not readable JSON ({e})") from None
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise BaselineError(f"--enqueue {spec}: expected a list of objects of settings, e.g. "
                            '[{"lr": 1e-5, "grad_accum": 2}]')
    out: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        label = str(entry.pop("name", f"{path.name}[{i}]"))
        first = next((j for j, (other, _) in enumerate(out) if other == label), None)
        if first is not None:  # the trials table and --vs-baseline tell baselines apart by name
            raise BaselineError(f"--enqueue {spec}: entries {first} and {i} are both named {label!r}; give each "
                                'its own "name"')
        out.append((label, entry))
    return out


def _nearest_choice(value: Any, choices: Sequence[Any]) -> Any:
    if value in choices:
        return value
    numeric = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if isinstance(value, (int, float)) and numeric:
        return min(numeric, key=lambda c: abs(math.log(max(c, 1e-300)) - math.log(max(value, 1e-300)))
                   if c > 0 and value > 0 else abs(c - value))
    return None


def fit_baseline(label: str, settings: dict[str, Any], *, distributions: dict[str, Any], searched: Sequence[str],
                 fixed: dict[str, Any], crossed: Sequence[str]) -> Baseline:
    """Fit one baseline to the sweep (see the module docstring); raises BaselineError naming a bad setting."""
    baseline = Baseline(label, {}, {})
    for name, raw in settings.items():
        why = check_value(name, raw)
        if why:
            raise BaselineError(f"--enqueue {label}: {why}")
        value = normalize_value(name, raw)
        distribution = distributions.get(name)
        if distribution is not None:
            baseline.params[name] = _fit_to_distribution(label, name, value, distribution, baseline.notes)
        elif name in searched:
            baseline.notes.append(f"{name}={value}: not applied (the space derives {name} from other parameters)")
        elif name in crossed:
            baseline.notes.append(f"{name}={value}: not applied (--cross runs every value of {name})")
        elif name in fixed:
            if fixed[name] != value:
                baseline.notes.append(f"{name}={value}: kept at the sweep's {fixed[name]} (a fixed setting)")
        else:
            baseline.extra[name] = value
    try:
        JobConfig.from_dict({**fixed, **baseline.params, **baseline.extra})
    except ValueError as e:
        raise BaselineError(f"--enqueue {label}: {e}") from None
    return baseline


def _fit_to_distribution(label: str, name: str, value: Any, distribution: Any, notes: list[str]) -> Any:
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        fitted = _nearest_choice(value, list(choices))
        if fitted is None:
            raise BaselineError(f"--enqueue {label}: {name}={value!r} is not among the space's choices "
                                f"({', '.join(map(str, choices))})")
        if fitted != value:
            notes.append(f"{name}={value}: the space offers {', '.join(map(str, choices))}; using {fitted}")
        return fitted
    low, high = distribution.low, distribution.high
    fitted = min(max(value, low), high)
    if fitted != value:
        notes.append(f"{name}={value}: outside the space's range [{low:g}, {high:g}]; using {fitted:g}")
    return type(low)(fitted) if isinstance(low, int) else float(fitted)


def plan_baselines(spec: Optional[str], revision: Optional[str], *, distributions: dict[str, Any],
                   searched: Sequence[str], fixed: dict[str, Any], crossed: Sequence[str],
                   num_samples: int) -> list[Baseline]:
    """The baselines of `--enqueue spec`, fitted to the sweep. Each is one of the sweep's `num_samples` proposals
    (Optuna runs enqueued trials first), so more baselines than proposals is refused: the rest would be announced
    and never run."""
    if not spec:
        return []
    entries = read_baselines(spec, revision)
    if len(entries) > num_samples:
        raise BaselineError(f"--enqueue {spec}: {len(entries)} baselines but --num-samples {num_samples}; each "
                            f"baseline is one of the proposals: give --num-samples {len(entries)} or more")
    return [fit_baseline(label, settings, distributions=distributions, searched=searched, fixed=fixed,
                         crossed=crossed) for label, settings in entries]
