"""Every output goes through the output helper (issue 24: "make it impossible by construction"), read from the
sources (an ast walk; nothing is imported).

A call in library code that writes a file (`open(..., "w")`, `.write_text`, `.write_bytes`, `np.save`,
`torch.save`, `save_file`, `.savefig`, an image's `.save`, `h5py.File(..., "w")`, `faiss.write_index`) must write
the temporary that `features.atomic.atomic_path` yields: its target names a variable bound by an enclosing
`with atomic_path(...) as NAME` (or by a `with open(NAME ...)` inside one). The few writers that do otherwise are
listed in `DIRECT_WRITERS` with the reason; a new command that writes straight to its output fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("vilbert", "features", "tasks")

# module:function -> why it may write without atomic_path
DIRECT_WRITERS = {
    "features.atomic:atomic_path": "the helper itself: the ownership marker inside the temporary folder",
    "features.store:FeatureStoreWriter.__init__": "HDF5 writes the temporary from temporary_path(); close() renames",
    "features.extract:_Run.log": "the errors log, appended line by line while the run goes on",
    "features.detector_training:_log": "the training log, appended one line per checkpoint",
    "tasks.engine.trainer:Trainer._log": "metrics.jsonl, appended one line per logging step",
    "tasks.runners.serve:Demo._admit": "an upload, inside the request's own temporary directory",
    "features.atomic:claim_folder": "the helper itself: the ownership marker of a folder filled in place",
    "features.importing:import_features.bad": "the errors log, appended line by line while the import goes on",
    "features.store:FeatureStoreWriter.close": "renames the finished temporary (temporary_path) onto the store",
    "features.store:ResumableStoreWriter.finish": "renames its one sealed part (written atomically) onto the store",
    "tasks.shapes.study:prepare_world": "renames the finished features store to its final name (the done marker)",
    "tasks.runners.converted_checkpoint:copy_tokenizer": "copies into the folder its caller's atomic_path yields",
}

WRITING_FUNCTIONS = {"save", "save_file", "write_index"}  # np.save, torch.save, safetensors, faiss
WRITING_METHODS = {"write_text", "write_bytes", "savefig"}
COPIES = {"copy", "copy2", "copyfile", "copytree", "move", "replace", "rename"}  # shutil.*, os.replace, Path.rename
IN_MEMORY = {"BytesIO", "StringIO"}  # a buffer is not a file


def _qualname(stack: list[ast.AST]) -> str:
    return ".".join(node.name for node in stack if isinstance(node, (ast.FunctionDef, ast.ClassDef,
                                                                      ast.AsyncFunctionDef)))


def _names(node: ast.AST | None) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()


def _write_target(call: ast.Call) -> ast.AST | None | bool:
    """The expression a writing call writes to; False when the call does not write a file."""
    func = call.func
    mode = next((k.value for k in call.keywords if k.arg == "mode"), call.args[1] if len(call.args) > 1 else None)
    mode = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else None
    if isinstance(func, ast.Name) and func.id == "open":
        return call.args[0] if mode and set(mode) & set("wax+") else False
    if isinstance(func, ast.Attribute) and func.attr == "open" and not isinstance(func.value, ast.Name):
        mode = call.args[0].value if call.args and isinstance(call.args[0], ast.Constant) else mode  # Path.open
        return func.value if isinstance(mode, str) and set(mode) & set("wax+") else False
    if isinstance(func, ast.Attribute) and func.attr in COPIES:
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        if owner in ("shutil", "os"):
            return call.args[1] if len(call.args) > 1 else None
        return call.args[0] if func.attr == "rename" and call.args else False  # Path.rename(target)
    if isinstance(func, ast.Attribute) and func.attr == "File" and isinstance(func.value, ast.Name) \
            and func.value.id == "h5py":
        return call.args[0] if mode and set(mode) & set("wax+") else False
    if isinstance(func, ast.Attribute) and func.attr in WRITING_METHODS:
        return call.args[0] if func.attr == "savefig" else func.value
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in WRITING_FUNCTIONS:
        if name == "save" and isinstance(func, ast.Attribute):  # np.save(f, a), torch.save(obj, f), image.save(f)
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            index = 1 if owner == "torch" else 0
        else:
            index = 1  # save_file(tensors, path), write_index(index, path)
        return call.args[index] if len(call.args) > index else None
    return False


class _Finder(ast.NodeVisitor):
    def __init__(self, module: str):
        self.module = module
        self.stack: list[ast.AST] = []
        self.safe: list[set[str]] = [set()]  # names bound to atomic temporaries, per enclosing with-block
        self.found: list[str] = []
        self.buffers: set[str] = set()  # names of in-memory buffers (io.BytesIO) in this module

    def _scoped(self, node):
        self.stack.append(node)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_With(self, node: ast.With) -> None:
        bound = set().union(*self.safe)
        added = set()
        for item in node.items:
            call = item.context_expr
            atomic = isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", None)) \
                == "atomic_path"
            if item.optional_vars is not None and (atomic or _names(call) & (bound | added)):
                added |= _names(item.optional_vars)
        self.safe.append(added)
        self.generic_visit(node)
        self.safe.pop()

    def visit_Assign(self, node: ast.Assign) -> None:
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) in IN_MEMORY:
            self.buffers |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        target = _write_target(node)
        if target is not False:
            where = f"{self.module}:{_qualname(self.stack)}"
            if where not in DIRECT_WRITERS and not (_names(target) & set().union(self.buffers, *self.safe)):
                self.found.append(f"{where} (line {node.lineno}): {ast.unparse(node)[:90]}")
        self.generic_visit(node)


def _library_files():
    for package in LIBRARY:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_every_file_output_goes_through_the_output_helper():
    found = []
    for path in _library_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        finder = _Finder(module)
        finder.visit(ast.parse(path.read_text(encoding="utf-8")))
        found += finder.found
    assert not found, "writes outside features.atomic.atomic_path (write its temporary, or list the writer in " \
                      "DIRECT_WRITERS with the reason):\n" + "\n".join(found)


class _Definitions(ast.NodeVisitor):
    def __init__(self, module: str):
        self.module, self.stack, self.names = module, [], set()

    def _scoped(self, node):
        self.stack.append(node)
        self.names.add(f"{self.module}:{_qualname(self.stack)}")
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped


def test_the_direct_writers_listed_still_exist():
    """An entry of DIRECT_WRITERS whose function is gone (renamed, moved) would let a new one slip in under its name."""
    defined = set()
    for path in _library_files():
        definitions = _Definitions(".".join(path.relative_to(ROOT).with_suffix("").parts))
        definitions.visit(ast.parse(path.read_text(encoding="utf-8")))
        defined |= definitions.names
    assert sorted(set(DIRECT_WRITERS) - defined) == []
