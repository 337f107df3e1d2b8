"""A restricted unpickler for weight files and annotation pickles we did not write.

`pickle.load` runs any callable a file names. This unpickler resolves only the globals that plain data needs:
containers, numpy arrays and scalars (optional), and torch's tensor-rebuild functions. Anything else (`os.system`,
`builtins.eval`, a project class) stops the load with a `WeightsError` naming the file and the refused global.

Allowed callables that take a size (`bytearray(n)`, `numpy.ndarray(shape)`, numpy's `_reconstruct`, torch's
typed storages) may together allocate at most `ALLOCATION_FACTOR` times the pickle's own size (plus 1 MiB):
real data is stored in the file, so a 30-byte pickle asking for 3 GiB is refused instead of allocating it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import warnings
from typing import IO, Any

import numpy as np
import torch

from features.errors import WeightsError

_PLAIN = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("__builtin__", "bytearray"),
}

_NUMPY = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}

_TORCH = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
}


ALLOCATION_FACTOR = 16
_SLACK_BYTES = 1 << 20
_SIZED = {("builtins", "bytearray"), ("__builtin__", "bytearray"), ("numpy", "ndarray"),
          ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}


def _tensor_from_bytes(data: bytes) -> Any:
    """Stand-in for `torch.storage._load_from_bytes` that reads the nested blob with torch's safe loader."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals; `source` names the file in errors."""

    def __init__(self, file: IO[bytes], *, source: str, allow_numpy: bool = True, encoding: str = "latin1",
                 size: int | None = None):
        """`size`: the pickle's length in bytes, which bounds what it may allocate (None: measured if seekable)."""
        super().__init__(file, encoding=encoding)
        self.source = source
        self.allowed = _PLAIN | _TORCH | (_NUMPY if allow_numpy else set())
        if size is None:
            size = _stream_size(file)
        self.size = size
        self.budget = math.inf if size is None else ALLOCATION_FACTOR * size + _SLACK_BYTES

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _tensor_from_bytes
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            storage = getattr(torch, name)
            with warnings.catch_warnings():  # typed storages are deprecated; old pickles still name them
                warnings.simplefilter("ignore")
                dtype = getattr(storage, "dtype", torch.uint8)
            itemsize = torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 1
            return self._bounded(storage, f"{module}.{name}", lambda *args, **kw: _count(args[:1]) * itemsize)
        if (module, name) in _SIZED and (module, name) in self.allowed:
            found = super().find_class(module, name)
            if name == "bytearray":
                return self._bounded(found, "bytearray", lambda *args, **kw: _count(args[:1]))
            shape = (lambda *args, **kw: args[0]) if name == "ndarray" else (lambda *args, **kw: args[1])
            dtype = (lambda args, kw: kw.get("dtype", args[1] if len(args) > 1 else float)) if name == "ndarray" \
                else (lambda args, kw: args[2])
            return self._bounded(found, f"{module}.{name}", lambda *args, **kw: _elements(shape(*args, **kw))
                                 * _itemsize(dtype(args, kw)))
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType") and ("numpy", "dtype") in self.allowed:
            return super().find_class(module, name)
        raise WeightsError(
            f"{self.source}: refused to unpickle global {module}.{name}; only plain containers"
            f"{', numpy arrays' if ('numpy', 'ndarray') in self.allowed else ''} and tensors are allowed"
        )

    def _bounded(self, function: Any, what: str, nbytes: Any) -> _Bounded:
        """`function`, refusing calls whose allocation (`nbytes(*args)`) would overrun the file's budget."""
        return _Bounded(self, function, what, nbytes)

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsError(f"{self.source}: refused a persistent id in a plain pickle (is it a torch.save file?)")


class _Bounded:
    """An allowed callable whose calls are charged to the unpickler's allocation budget. Passed as an argument
    (`_reconstruct(numpy.ndarray, ...)` names the class), it stands for the callable itself."""

    def __init__(self, owner: RestrictedUnpickler, function: Any, what: str, nbytes: Any):
        self.owner, self.function, self.what, self.nbytes = owner, function, what, nbytes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.function if isinstance(a, _Bounded) else a for a in args)
        try:
            wanted = int(self.nbytes(*args, **kwargs))
        except (IndexError, TypeError, ValueError, OverflowError):
            wanted = 0  # not a size argument (bytes to copy, a shape the callee itself rejects)
        owner = self.owner
        if wanted > owner.budget:
            raise WeightsError(f"{owner.source}: {self.what} asks for {wanted:,} bytes in a pickle of "
                               f"{owner.size:,} bytes; refused (a damaged or hostile file)")
        owner.budget -= max(wanted, 0)
        return self.function(*args, **kwargs)


def safe_load(path_or_file: str | os.PathLike | IO[bytes], *, allow_numpy: bool = True, encoding: str = "latin1") -> Any:
    """Unpickle a file that may come from anywhere, allowing only data (see the module docstring).

    `encoding` decodes Python 2 byte strings (and numpy arrays pickled by Python 2); latin1 keeps bytes intact.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        source = os.fspath(path_or_file)
        try:
            with open(source, "rb") as f:
                return _load(f, source, allow_numpy, encoding)
        except OSError as e:
            raise WeightsError(f"{source}: cannot read ({e.strerror or e})") from e
    source = getattr(path_or_file, "name", "<stream>")
    return _load(path_or_file, str(source), allow_numpy, encoding)


def _load(f: IO[bytes], source: str, allow_numpy: bool, encoding: str) -> Any:
    try:
        return RestrictedUnpickler(f, source=source, allow_numpy=allow_numpy, encoding=encoding).load()
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, RuntimeError,
            MemoryError, OverflowError, IndexError, KeyError) as e:
        raise WeightsError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from e


def _stream_size(file: IO[bytes]) -> int | None:
    """Bytes left in a seekable stream (None when it cannot tell)."""
    try:
        here = file.tell()
        end = file.seek(0, io.SEEK_END)
        file.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
    return end - here


def _count(args: tuple) -> int:
    """The first argument when it is a count (an int), else 0."""
    return int(args[0]) if args and isinstance(args[0], (int, np.integer)) else 0


def _elements(shape: Any) -> int:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    return math.prod(int(d) for d in dims)


def _itemsize(dtype: Any) -> int:
    return np.dtype(dtype).itemsize
