"""The package's layers point one way: a module imports only from its own layer or the ones below it.

    errors, protocol, known_warnings    the suite's errors; the evaluation protocol (inputs, own head, metric keys)
    models                              plain nn.Modules: no Hydra, no Lightning
    data                                loaders, the batch contract (data/batch.py), device-side transforms
    checkpoint                          reading a checkpoint: upgrade_checkpoint, rebuild_config
    tasks                               LightningModules
    eval                                tables, reports, the linear probe, predict
    callbacks, preemption               Lightning callbacks of a run
    config                              the run's config checks
    run, xla                            what train.py / evaluate.py do (and the TPU loop)

Read with `ast` (every import, also inside functions), so the test imports nothing and names the offending line."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "zorro"

LAYERS = [
    {"errors", "protocol", "known_warnings"},
    {"models"},
    {"data"},
    {"checkpoint"},
    {"tasks"},
    {"eval"},
    {"callbacks", "preemption"},
    {"config"},
    {"run", "xla"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def unit(module: str) -> str:
    """The layer unit of `zorro.a.b`: its package below zorro, or the top-level module (`zorro` itself: '')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = SRC):
    """(line, imported zorro module) of every import in `path`, relative ones resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            # `from . import preemption` / `from zorro import models` import modules named like the names
            targets = [source] + [f"{source}.{a.name}" for a in node.names if not node.module or node.level == 0
                                  and source == "zorro"]
        else:
            continue
        for target in targets:
            if target == "zorro" or target.startswith("zorro."):
                yield node.lineno, target


def violations(root: Path = SRC) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        own = unit(module_name(path, root))
        if own not in RANK:
            if own:  # a module the layer list does not place
                found.append(f"{path.relative_to(root.parent)}: not in tests/test_layers.py LAYERS")
            continue
        for line, target in imported_modules(path, root):
            other = unit(target)
            if other in RANK and RANK[other] > RANK[own]:
                found.append(f"{path.relative_to(root.parent)}:{line}: {own} (layer {RANK[own]}) imports {target} "
                             f"(layer {RANK[other]})")
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    assert violations() == []


def test_the_check_names_an_upward_import_and_its_line(tmp_path):
    """The check itself: a task importing the eval layer (inside a function, too) is named with its line."""
    root = tmp_path / "zorro"
    (root / "tasks").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "__init__.py").write_text("")
    (root / "tasks" / "__init__.py").write_text("")
    (root / "eval" / "__init__.py").write_text("")
    (root / "eval" / "tables.py").write_text("from ..tasks import base\n")  # downward: fine
    (root / "tasks" / "base.py").write_text("import torch\n\n\ndef f():\n    from ..eval.tables import own_head\n")
    (root / "tasks" / "other.py").write_text("from zorro import run\n")
    (root / "stray.py").write_text("")
    assert violations(root) == [
        "zorro/stray.py: not in tests/test_layers.py LAYERS",
        "zorro/tasks/base.py:5: tasks (layer 4) imports zorro.eval.tables (layer 5)",
        "zorro/tasks/other.py:1: tasks (layer 4) imports zorro.run (layer 8)",
    ]


@pytest.mark.parametrize("module", ["zorro.errors", "zorro.protocol"])
def test_the_bottom_layer_imports_no_other_zorro_module(module):
    path = SRC / f"{module.split('.')[1]}.py"
    assert [t for _, t in imported_modules(path)] == []
