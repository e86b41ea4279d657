"""The layering the package docstrings promise: no module imports a layer above it.

Every `*.py` under `trainer/`, `search_spaces/` and `orchestrator/` is found with `rglob` and read with `ast`,
so every import counts wherever it stands: at the top, inside a function or method, or under
`if TYPE_CHECKING:`. Reading the source, not importing it, is what makes a lazy import visible; the count
of modules is exact, so a folder the walk misses (or a package without its `__init__.py`) fails it.

`if TYPE_CHECKING:` imports count: a type named from a layer above is still a dependency on that layer (the
lower module cannot be understood, or type-checked, without the higher one), and the cure is the same as
for any upward import: the type moves down to where both can read it.

An import inside a function (a lazy import) hides a dependency from the top of the module, so only a heavy one
may stay there: a library of HEAVY_LIBRARIES, or a project module whose loading loads one. Everything else is
imported at the top, which keeps the architecture readable and `mdsweep --help` free of torch, Ray and Optuna.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "search_spaces", "orchestrator")
# What a lone job or a search space must never import, at any depth: the sweep's libraries.
SWEEP_LIBRARIES = ("ray", "optuna")
# Every module of the three packages, `__init__` and `__main__` included. Adding or removing a module
# changes it; a module the walk stops seeing changes it too, which is the point.
MODULE_COUNT = 121

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
    "trainer.parallel": ("trainer.model", "trainer.data") + TRAINER_BASE,
    "trainer": ("trainer",),
    "search_spaces": ("trainer",),
    "orchestrator.results": ("trainer",),
    "orchestrator.cluster": ("trainer",),
    "orchestrator.tracking": ("orchestrator.results", "orchestrator.cluster", "trainer"),
    "orchestrator.sweep": ("orchestrator.results", "orchestrator.cluster", "orchestrator.tracking", "search_spaces",
                           "trainer"),
    "orchestrator.cli": ("orchestrator", "search_spaces", "trainer"),
    "orchestrator": (),
}


# The third-party libraries a function may import late, so that `mdsweep --help` and the light commands do not
# load them: each takes 10 ms or more to import (python -X importtime, one import alone: torch, ray and
# transformers take seconds; pyarrow ~240 ms, optuna ~210 ms, numpy ~85 ms, tqdm ~40 ms (it reads package metadata
# for its version), plotly ~40 ms, psutil ~18 ms, PIL.Image ~13 ms, tokenizers ~11 ms), or what the project
# imports of it does (captcha loads PIL; peft, bitsandbytes and safetensors' torch helpers load torch;
# huggingface_hub's downloads load its HTTP stack; the trackers of the optional extras take seconds: mlflow about
# 3 s, wandb and tensorboard each over a second). Every other import, the standard library's and the project's
# light modules included, belongs at the top of its module. Each is imported by some module of the project.
HEAVY_LIBRARIES = ("torch", "ray", "optuna", "pyarrow", "numpy", "transformers", "PIL", "safetensors", "tokenizers",
                   "huggingface_hub", "captcha", "peft", "bitsandbytes", "plotly", "tqdm", "psutil", "mlflow",
                   "wandb", "tensorboard")
# A light import a function may still make, by module: {"module": ("imported", ...)}, each with its reason in a
# comment here and at the import. None today.
LAZY_EXCEPTIONS: dict[str, tuple[str, ...]] = {}


def module_name(path: Path) -> str:
    """`trainer/model/__init__.py` -> `trainer.model`; `trainer/job.py` -> `trainer.job`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    """Every module of the three packages, by name."""
    return {module_name(path): path for top in PACKAGES for path in sorted((ROOT / top).rglob("*.py"))}


def from_module(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` reads from, a relative one resolved against `package`."""
    if not node.level:
        return node.module or ""
    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Every module `source` imports, at any depth, relative imports resolved. `from a import b` names `a.b`
    when that is a module of `known`, else `a`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = from_module(node, package)
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


def is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def run_at_load(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes under `node` that loading the module runs: its statements and class bodies, and the decorators
    and default values of its functions; not the functions' bodies, nor an `if TYPE_CHECKING:` block."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            parts = [*getattr(child, "decorator_list", []), *child.args.defaults,
                     *(d for d in child.args.kw_defaults if d is not None)]
        elif isinstance(child, ast.If) and is_type_checking(child.test):
            parts = child.orelse
        else:
            parts = [child]
        for part in parts:
            yield part
            yield from run_at_load(part)


def lazy_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements inside a function or method (one in a nested function once)."""
    found = {id(node): node for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    return sorted(found.values(), key=lambda node: node.lineno)


def heavy_modules(sources: dict[str, tuple[str, bool]]) -> set[str]:
    """The modules of `sources` ({name: (text, is_package)}) whose loading loads a library of HEAVY_LIBRARIES, at
    any depth: through an import outside functions (those under `if TYPE_CHECKING:` aside), their package's
    `__init__`, or a function they call while loading (`class StateBackup(tune_callback_base()):` imports Tune's
    Callback)."""
    known = set(sources)
    trees = {name: ast.parse(text) for name, (text, _) in sources.items()}
    called_imports: dict[tuple[str, str], set[str]] = {  # (module, function) -> what the function imports
        (name, fn.name): {m for node in lazy_imports(ast.Module(body=[fn], type_ignores=[]))
                          for m in imports_of(ast.unparse(node), name, sources[name][1], known)}
        for name, tree in trees.items() for fn in tree.body
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))}
    loads: dict[str, set[str]] = {}
    for name, tree in trees.items():
        is_package = sources[name][1]
        at_load = list(run_at_load(tree))
        functions = {fn: (name, fn) for module, fn in called_imports if module == name}  # name -> (module, function)
        modules: dict[str, str] = {}  # a name bound to a module -> the module
        loads[name] = {name.rpartition(".")[0]} - {""}
        for node in at_load:
            if isinstance(node, ast.Import):  # `import a.b` binds `a`, `import a.b as c` binds `c` to `a.b`
                modules.update({alias.asname or alias.name.split(".")[0]: alias.name if alias.asname
                                else alias.name.split(".")[0] for alias in node.names})
            elif isinstance(node, ast.ImportFrom):
                base = from_module(node, name if is_package else name.rpartition(".")[0])
                for alias in node.names:
                    bound = alias.asname or alias.name
                    if f"{base}.{alias.name}" in known:
                        modules[bound] = f"{base}.{alias.name}"
                    else:
                        functions[bound] = (base, alias.name)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                loads[name].update(imports_of(ast.unparse(node), name, is_package, known))
        for node in at_load:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                loads[name].update(called_imports.get(functions.get(node.func.id), ()))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in modules:
                loads[name].update(called_imports.get((modules[node.func.value.id], node.func.attr), ()))
    heavy = set()
    for name in sources:
        seen, todo = set(), [name]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += loads.get(module, ())
        if any(module.split(".")[0] in HEAVY_LIBRARIES for module in seen):
            heavy.add(name)
    return heavy


def lazy_import_problems(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """`module -> imported (line N)` for every import inside a function of what is not heavy: neither a library
    of HEAVY_LIBRARIES nor a module of `sources` that loads one (`heavy_modules`), nor excepted by
    LAZY_EXCEPTIONS."""
    known, heavy = set(sources), heavy_modules(sources)
    problems = []
    for name, (text, is_package) in sources.items():
        for node in lazy_imports(ast.parse(text)):
            for other in imports_of(ast.unparse(node), name, is_package, known):
                if not (other.split(".")[0] in HEAVY_LIBRARIES or other in heavy
                        or within(other, LAZY_EXCEPTIONS.get(name, ()))):
                    problems.append(f"{name} -> {other} (line {node.lineno})")
    return problems


def project_sources() -> dict[str, tuple[str, bool]]:
    return {name: (path.read_text(), path.name == "__init__.py") for name, path in source_files().items()}


def test_only_heavy_imports_are_lazy():
    """An import inside a function is of a heavy library or of a project module that loads one; every other
    import is at the top of its module, where the reader (and the layer map) sees it."""
    sources = project_sources()
    assert lazy_import_problems(sources) == []
    imported = {other.split(".")[0] for name, (text, is_package) in sources.items()
                for other in imports_of(text, name, is_package, set(sources))}
    assert [lib for lib in HEAVY_LIBRARIES if lib not in imported] == [], "a heavy library no module imports"


def test_the_light_modules_load_no_heavy_library():
    """What `heavy_modules` calls light, loaded for real with the CLI's parser built (what `mdsweep --help` does):
    no heavy library is loaded. A way of loading one that the reading misses would let a heavy import move to the
    top of a light module, and into `mdsweep --help`."""
    heavy = heavy_modules(project_sources())
    light = sorted(m for m in source_files() if m not in heavy and not m.endswith("__main__"))
    code = (f"import importlib, sys\n"
            f"for name in {light!r} + ['build_parser']:\n"
            f"    if name == 'build_parser':\n"
            f"        importlib.import_module('orchestrator.cli.main').build_parser()\n"
            f"    else:\n"
            f"        importlib.import_module(name)\n"
            f"    loaded = [lib for lib in {HEAVY_LIBRARIES!r} if lib in sys.modules]\n"
            f"    if loaded:\n"
            f"        print(name, 'loads', *loaded)\n"
            f"        break\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "orchestrator.cli.main" in light and "orchestrator.cli.run" in light


def test_a_light_lazy_import_is_named():
    """The check itself, from source text: inside a function, the standard library and a light project module
    are named; a heavy library is not, nor a module that loads one at its top (in a `try:` too) or through a
    function it calls while loading; an import under TYPE_CHECKING makes no module heavy."""
    sources = {
        "orchestrator.cli.query": ("import sys\n\ndef table():\n    import json\n    import pyarrow.compute as pc\n"
                                   "    from orchestrator.results import store\n"
                                   "    from ..results.ranking import best_trial\n", False),
        "orchestrator.results.store": ("try:\n    import pyarrow\nexcept ImportError:\n    pyarrow = None\n", False),
        "orchestrator.results.ranking": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
                                         False),
        "orchestrator.cluster.tune_internals": ("def callback_base():\n    from ray.tune import Callback\n\n"
                                                "    return Callback\n", False),
        "orchestrator.cluster.tune_state": ("from .tune_internals import callback_base\n\n"
                                            "class Backup(callback_base()):\n    pass\n", False),
        "orchestrator.sweep.sink": ("from orchestrator.cluster import tune_internals as ti\n\n"
                                    "class Sink(ti.callback_base()):\n    pass\n", False),
        "orchestrator.sweep.progress": ("import orchestrator.cluster.tune_internals as internals\n\n"
                                        "Base = internals.callback_base()\n", False),
        "orchestrator.sweep.driver": ("class Driver:\n    def run(self):\n"
                                      "        from orchestrator.cluster.tune_state import Backup\n"
                                      "        from orchestrator.sweep import sink\n"
                                      "        from orchestrator.cluster.tune_internals import callback_base\n", False),
    }
    assert heavy_modules(sources) == {"orchestrator.results.store", "orchestrator.cluster.tune_state",
                                      "orchestrator.sweep.sink", "orchestrator.sweep.progress"}
    assert lazy_import_problems(sources) == [
        "orchestrator.cli.query -> json (line 4)",
        "orchestrator.cli.query -> orchestrator.results.ranking (line 7)",
        "orchestrator.sweep.driver -> orchestrator.cluster.tune_internals (line 5)"]


MAX_MODULES_PER_FOLDER = 15


def test_no_folder_holds_more_than_15_modules():
    """A folder past 15 modules (its `__init__` counted) no longer reads as one room: split it by job."""
    folders: dict[str, int] = {}
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            folder = str(path.parent.relative_to(ROOT))
            folders[folder] = folders.get(folder, 0) + 1
    assert {f: n for f, n in folders.items() if n > MAX_MODULES_PER_FOLDER} == {}
