"""The floors of the package: every module imports only modules of its own floor or of the floors below it.

Data flows one way, from files to configs to modules to search and training to the user; an import from a lower
floor up to a higher one (a back-arrow) makes a light module heavy and ties the lower floor to what is built on it.
The imports are read from the source with ``ast``, function-level and ``TYPE_CHECKING`` imports included (no
module is imported for that); one fresh interpreter then imports every module below the top floor and checks what
actually got loaded, which catches imports that no ``import`` statement shows.

A new module gets a floor in ``FLOORS``; the tests fail until it has one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxencdec"

# (floor name, modules), lowest first.
FLOORS = (
    ("foundations: files, versions, errors, field checks, input checks; each package's empty __init__", (
        "jaxencdec.version", "jaxencdec.errors", "jaxencdec.fields", "jaxencdec.paths", "jaxencdec.storage",
        "jaxencdec.inputs", "jaxencdec.assets", "jaxencdec.visualize",
        "jaxencdec.checkpoint", "jaxencdec.generation", "jaxencdec.models", "jaxencdec.nn", "jaxencdec.parallel",
        "jaxencdec.train")),
    ("configs, building blocks and devices", (
        "jaxencdec.spec", "jaxencdec.architectures", "jaxencdec.bart_architectures", "jaxencdec.llm_architectures",
        "jaxencdec.config",
        "jaxencdec.nn.layers", "jaxencdec.nn.attention", "jaxencdec.parallel.mesh", "jaxencdec.parallel.shard",
        "jaxencdec.parallel.topology", "jaxencdec.parallel.libtpu_flags")),
    ("models", (
        "jaxencdec.models.layout", "jaxencdec.models.positions", "jaxencdec.models.transformer",
        "jaxencdec.models.encoder_decoder")),
    ("checkpoints, generation, tokenizer", (
        "jaxencdec.checkpoint.hub", "jaxencdec.checkpoint.formats", "jaxencdec.checkpoint.weights",
        "jaxencdec.checkpoint.names", "jaxencdec.checkpoint.convert",
        "jaxencdec.generation.config", "jaxencdec.generation.processors", "jaxencdec.generation.search",
        "jaxencdec.generation.api", "jaxencdec.generation.serving", "jaxencdec.generation.export",
        "jaxencdec.tokenizer_files", "jaxencdec.tokenizer")),
    ("the model", (
        "jaxencdec.loading", "jaxencdec.modeling")),
    ("training", (
        "jaxencdec.train.config", "jaxencdec.train.data", "jaxencdec.train.batches", "jaxencdec.train.packing",
        "jaxencdec.train.pipeline",
        "jaxencdec.train.metrics", "jaxencdec.train.flops", "jaxencdec.train.step", "jaxencdec.train.checkpoints",
        "jaxencdec.train.preemption",
        "jaxencdec.train.model_bundle", "jaxencdec.train.compile", "jaxencdec.train.loop")),
    ("entry points: the package's public names, the command line, the demo", (
        "jaxencdec", "jaxencdec.cli", "jaxencdec.demo")),
)
FLOOR = {module: level for level, (_, modules) in enumerate(FLOORS) for module in modules}
TOP = len(FLOORS) - 1


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _where(module: str) -> str:
    level = FLOOR[module]
    return f"floor {level}: {FLOORS[level][0]}"


def _imports(module: str, source: str, modules: set[str]) -> list[tuple[int, str, str]]:
    """``(line, imported module, statement)`` for every import of a package module in ``source``, wherever it
    stands; ``from jaxencdec import paths`` imports ``jaxencdec.paths``, ``from jaxencdec import X`` for a name
    ``X`` that is no module imports the package itself."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                is_package = any(other.startswith(module + ".") for other in modules)
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        statement = ast.get_source_segment(source, node) or ""
        found += [(node.lineno, target, " ".join(statement.split())) for target in dict.fromkeys(targets)
                  if target == "jaxencdec" or target.startswith("jaxencdec.")]
    return found


def back_arrows(sources: dict[str, str]) -> list[str]:
    """A line per import in ``sources`` (module name -> source text) of a module from a higher floor, or of a
    module that has no floor."""
    modules = set(sources)
    problems = []
    for module, source in sources.items():
        if module not in FLOOR:
            problems.append(f"{module} has no floor in FLOORS")
            continue
        for line, target, statement in _imports(module, source, modules):
            if target not in FLOOR:
                problems.append(f"{module}:{line} `{statement}` imports {target}, which has no floor in FLOORS")
            elif FLOOR[target] > FLOOR[module]:
                problems.append(f"{module} ({_where(module)}) imports {target} ({_where(target)}) at line {line}: "
                                f"`{statement}`; move what it needs to floor {FLOOR[module]} or lower")
    return problems


def test_every_module_has_a_floor():
    modules = set(_sources())
    unassigned = sorted(modules - set(FLOOR))
    assert not unassigned, f"modules without a floor: {', '.join(unassigned)}; add each to FLOORS in {__file__}"
    stale = sorted(set(FLOOR) - modules)
    assert not stale, f"FLOORS names modules that do not exist: {', '.join(stale)}"
    twice = sorted(m for m in FLOOR if sum(m in members for _, members in FLOORS) > 1)
    assert not twice, f"modules on two floors: {', '.join(twice)}"


def test_no_module_imports_from_a_higher_floor():
    problems = back_arrows({module: path.read_text(encoding="utf-8") for module, path in _sources().items()})
    assert not problems, "back-arrows:\n" + "\n".join(problems)


def test_a_back_arrow_is_named_with_both_floors():
    """The check itself: a function-level import of the model from the config is reported."""
    sources = {"jaxencdec.config": "def load():\n    from jaxencdec.modeling import EncoderDecoderModel\n",
               "jaxencdec.modeling": "from jaxencdec import config\n"}
    assert back_arrows(sources) == [
        "jaxencdec.config (floor 1: configs, building blocks and devices) imports jaxencdec.modeling (floor 4: the "
        "model) at line 2: `from jaxencdec.modeling import EncoderDecoderModel`; move what it needs to floor 1 or "
        "lower"]


# Imports each module named on the command line in turn, every jaxencdec module forgotten between two (the third
# parties stay loaded: jax is imported once), and prints which package modules each one loaded.
_LOADED = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    for module in [m for m in sys.modules if m == "jaxencdec" or m.startswith("jaxencdec.")]:
        del sys.modules[module]
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m == "jaxencdec" or m.startswith("jaxencdec."))
print(json.dumps(loaded))
"""


def test_importing_a_module_loads_nothing_from_a_higher_floor():
    below_top = [module for module in FLOOR if FLOOR[module] < TOP]
    run = subprocess.run([sys.executable, "-c", _LOADED, *below_top], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=300)
    assert run.returncode == 0, run.stderr
    problems = []
    for module, loaded in json.loads(run.stdout.splitlines()[-1]).items():
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for other in sorted(set(loaded) - parents):
            if FLOOR.get(other, TOP) > FLOOR[module]:
                problems.append(f"importing {module} ({_where(module)}) loads {other} ({_where(other)})")
    assert not problems, "\n".join(problems)
