"""The layering the package docstrings promise: no module imports a layer above it.

Every `*.py` under `trainer/`, `search_spaces/` and `orchestrator/` is found with `rglob` and read with `ast`,
so every import counts wherever it stands: at the top, inside a function or method, or under
`if TYPE_CHECKING:`. Reading the source, not importing it, is what makes a lazy import visible; the count
of modules is exact, so a folder the walk misses (or a package without its `__init__.py`) fails it.

`if TYPE_CHECKING:` imports count: a type named from a layer above is still a dependency on that layer (the
lower module cannot be understood, or type-checked, without the higher one), and the cure is the same as
for any upward import: the type moves down to where both can read it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "search_spaces", "orchestrator")
# What a lone job or a search space must never import, at any depth: the sweep's libraries.
SWEEP_LIBRARIES = ("ray", "optuna")
# Every module of the three packages, `__init__` and `__main__` included. Adding or removing a module
# changes it; a module the walk stops seeing changes it too, which is the point.
MODULE_COUNT = 106

# Each layer and the layers it may import, bottom first. A module belongs to the longest layer name that is
# the module or a package above it. The trainer's base: the contract and the torch-free readings of its
# values (budget, faults), atomic writes, and the MKL pin the package's `__init__` runs.
TRAINER_BASE = ("trainer.job_config", "trainer.budget", "trainer.faults", "trainer.files", "trainer.cpu_math",
                "trainer.model.choices")
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "trainer.model.choices": (),  # the model's own choices, which the contract imports (torch-free)
    "trainer.budget": (),
    "trainer.faults": (),
    "trainer.files": (),
    "trainer.cpu_math": (),
    "trainer.job_config": ("trainer.budget", "trainer.faults", "trainer.model.choices"),
    # the model owns its choices and never reads the job's contract: the contract imports the model's types
    "trainer.model": tuple(m for m in TRAINER_BASE if m != "trainer.job_config"),
    "trainer.memory": ("trainer.model",) + TRAINER_BASE,
    "trainer.data": ("trainer.model",) + TRAINER_BASE,
    "trainer.evaluation": ("trainer.model", "trainer.data") + TRAINER_BASE,
    "trainer": ("trainer",),
    "search_spaces": ("trainer",),
    "orchestrator.results": ("trainer",),
    "orchestrator.cluster": ("trainer",),
    "orchestrator.sweep": ("orchestrator.results", "orchestrator.cluster", "search_spaces", "trainer"),
    "orchestrator.cli": ("orchestrator", "search_spaces", "trainer"),
    "orchestrator": (),
}


def module_name(path: Path) -> str:
    """`trainer/model/__init__.py` -> `trainer.model`; `trainer/job.py` -> `trainer.job`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    """Every module of the three packages, by name."""
    return {module_name(path): path for top in PACKAGES for path in sorted((ROOT / top).rglob("*.py"))}


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Every module `source` imports, at any depth, relative imports resolved. `from a import b` names `a.b`
    when that is a module of `known`, else `a`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return sorted(set(found))


def layer_of(module: str) -> str:
    """The longest layer name that is `module` or a package above it."""
    return max((layer for layer in MAY_IMPORT if module == layer or module.startswith(layer + ".")), key=len)


def within(module: str, layers: tuple[str, ...]) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def upward_imports(imports: dict[str, list[str]]) -> list[str]:
    """`module -> other` for every import of a project module outside the module's own layer and those under
    it, and of Ray or Optuna from the trainer or a search space."""
    problems = []
    for module, others in imports.items():
        own = layer_of(module)
        for other in others:
            top = other.split(".")[0]
            if top in SWEEP_LIBRARIES:
                if within(module, ("trainer", "search_spaces")):
                    problems.append(f"{module} -> {other} (a job and a space must run without the sweep's libraries)")
            elif top in PACKAGES and other not in PACKAGES and not within(other, (own,) + MAY_IMPORT[own]):
                problems.append(f"{module} -> {other}")
    return problems


def test_every_module_imports_only_the_layers_under_it():
    files = source_files()
    known = set(files)
    imports = {name: imports_of(path.read_text(), name, path.name == "__init__.py", known)
               for name, path in files.items()}
    assert upward_imports(imports) == []
    assert len(imports) == MODULE_COUNT, "every module of the three packages is read, and no other"


def test_every_folder_of_modules_is_a_package():
    """A folder without `__init__.py` is no package of the layer map (and was invisible to the old walk)."""
    folders = {path.parent for top in PACKAGES for path in (ROOT / top).rglob("*.py")}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []


def test_an_upward_import_is_named():
    """The check itself, from source text: a lazy import inside a function, a relative one, one under
    TYPE_CHECKING, and Ray or Optuna in a job or a space, each named."""
    sources = {
        "orchestrator.results.study": ("def probe():\n    from ..sweep import spaces\n", False),
        "trainer.job_config": ("class C:\n    def problems(self):\n"
                               "        from trainer.memory.precision import precision_problem\n", False),
        "trainer.model.network": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from trainer.job import run_job\n", False),
        "trainer.job": ("import torch\n\ndef f():\n    import ray.tune\n", False),
        "search_spaces": ("from optuna import Trial\n", True),
        "orchestrator.sweep.search": ("from orchestrator.results.groups import group_state\nimport optuna\n",
                                      False),
        "orchestrator.cli.run": ("from . import plan\nfrom orchestrator.sweep.driver import run\n", False),
    }
    known = {"orchestrator.sweep.spaces", "orchestrator.cli.plan", "trainer.job", "trainer.memory.precision"}
    imports = {name: imports_of(text, name, is_package, known) for name, (text, is_package) in sources.items()}
    assert imports["orchestrator.results.study"] == ["orchestrator.sweep.spaces"]
    assert imports["orchestrator.cli.run"] == ["orchestrator.cli.plan", "orchestrator.sweep.driver"]
    assert upward_imports(imports) == [
        "orchestrator.results.study -> orchestrator.sweep.spaces",
        "trainer.job_config -> trainer.memory.precision",
        "trainer.model.network -> trainer.job",
        "trainer.job -> ray.tune (a job and a space must run without the sweep's libraries)",
        "search_spaces -> optuna (a job and a space must run without the sweep's libraries)"]
