"""The layering the package docstrings promise: importing a module never loads a layer above it.

Every module of `trainer`, `search_spaces` and `orchestrator` is imported on its own (the project's
modules dropped from `sys.modules` in between) and what it loaded is checked against the layers
under it. An upward import, at module level or in an `__init__`, fails here and names the module.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each layer and the layers it may load, bottom first. A module belongs to the longest prefix it starts with.
# cpu_math is loaded by the package's __init__, before anything computes
TRAINER_BASE = ("trainer.job_config", "trainer.files", "trainer.cpu_math")
MAY_LOAD: dict[str, tuple[str, ...]] = {
    "trainer.job_config": ("trainer.cpu_math",),
    "trainer.files": ("trainer.cpu_math",),
    "trainer.cpu_math": (),
    "trainer.model": TRAINER_BASE,
    "trainer.memory": ("trainer.model",) + TRAINER_BASE,
    "trainer.data": ("trainer.model",) + TRAINER_BASE,
    "trainer": ("trainer",),
    "search_spaces": ("search_spaces", "trainer"),
    "orchestrator.results": ("trainer",),
    "orchestrator.cluster": ("trainer",),
    "orchestrator.sweep": ("orchestrator.results", "orchestrator.cluster", "search_spaces", "trainer"),
    "orchestrator.cli": ("orchestrator", "search_spaces", "trainer"),
}
PACKAGES = ("trainer", "search_spaces", "orchestrator")
# What a lone job must never pull in: the sweep's libraries.
SWEEP_LIBRARIES = ("ray", "optuna")

LOADER = """
import importlib, json, pkgutil, sys
PACKAGES = %r
def ours(name): return name.split(".")[0] in PACKAGES
names = []
for top in PACKAGES:
    package = importlib.import_module(top)
    names += [m.name for m in pkgutil.walk_packages(package.__path__, top + ".") if not m.name.endswith("__main__")]
loaded = {}
for name in names:
    for held in [m for m in sys.modules if ours(m) or m.split(".")[0] in ("ray", "optuna")]:
        del sys.modules[held]
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if ours(m) or m in ("ray", "optuna"))
print(json.dumps(loaded))
"""


def layer_of(module: str) -> str:
    """The longest layer name that is `module` or a package above it."""
    candidates = [layer for layer in MAY_LOAD if module == layer or module.startswith(layer + ".")]
    return max(candidates, key=len)


def upward_imports(loaded: dict[str, list[str]]) -> list[str]:
    """`module -> other` for every project module loaded that lies outside the module's own layer and those under it."""
    problems = []
    for module, modules in loaded.items():
        own = layer_of(module)
        allowed = (own,) + MAY_LOAD[own]
        for other in modules:
            if other in ("ray", "optuna"):
                if own.startswith(("trainer", "search_spaces")):
                    problems.append(f"{module} -> {other} (a job must run without the sweep's libraries)")
                continue
            if other.split(".")[0] in PACKAGES and other not in PACKAGES and layer_of(other) not in allowed \
                    and not any(other == a or other.startswith(a + ".") for a in allowed):
                problems.append(f"{module} -> {other}")
    return problems


def test_every_module_imports_only_the_layers_under_it():
    out = subprocess.run([sys.executable, "-c", LOADER % (PACKAGES,)], capture_output=True, text=True,
                         cwd=str(ROOT), check=True)
    loaded = json.loads(out.stdout)
    assert len(loaded) > 80, "every module of the three packages is checked"
    assert upward_imports(loaded) == []


def test_an_upward_import_is_named():
    """The check itself: a model module that loads the job, or a job module that loads Ray, is reported."""
    loaded = {"trainer.model.network": ["trainer.job", "trainer.model.network"],
              "trainer.job": ["ray", "trainer.job"],
              "orchestrator.results.query": ["orchestrator.sweep.sink"],
              "orchestrator.cli.run": ["orchestrator.sweep.driver", "ray"]}
    assert upward_imports(loaded) == [
        "trainer.model.network -> trainer.job",
        "trainer.job -> ray (a job must run without the sweep's libraries)",
        "orchestrator.results.query -> orchestrator.sweep.sink"]
