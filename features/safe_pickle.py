"""A restricted unpickler for weight files and annotation pickles we did not write.

`pickle.load` runs any callable a file names. This unpickler resolves only the globals that plain data needs:
containers, numpy arrays and scalars (optional), and torch's tensor-rebuild functions. Anything else (`os.system`,
`builtins.eval`, a project class) stops the load with a `WeightsError` naming the file and the refused global.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import IO, Any

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


def _tensor_from_bytes(data: bytes) -> Any:
    """Stand-in for `torch.storage._load_from_bytes` that reads the nested blob with torch's safe loader."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals; `source` names the file in errors."""

    def __init__(self, file: IO[bytes], *, source: str, allow_numpy: bool = True, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.source = source
        self.allowed = _PLAIN | _TORCH | (_NUMPY if allow_numpy else set())

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _tensor_from_bytes
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            return getattr(torch, name)
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType") and ("numpy", "dtype") in self.allowed:
            return super().find_class(module, name)
        raise WeightsError(
            f"{self.source}: refused to unpickle global {module}.{name}; only plain containers"
            f"{', numpy arrays' if ('numpy', 'ndarray') in self.allowed else ''} and tensors are allowed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsError(f"{self.source}: refused a persistent id in a plain pickle (is it a torch.save file?)")


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
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise WeightsError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from e
