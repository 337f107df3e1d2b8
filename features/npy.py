"""`.npy` files read without trusting their header: the shape it declares must fit in the file.

`np.load` allocates whatever the header declares before reading, so a 100-byte file claiming a [10^9, 2048] array
asks for terabytes. `load_array` reads the header first and refuses a shape larger than the bytes that follow it,
an object dtype (a pickle; read those through `features.safe_pickle`) or a file that is not `.npy` at all.
"""

from __future__ import annotations

import math
import os
from typing import BinaryIO

import numpy as np

from features.errors import FeaturesError


class ArrayFileError(FeaturesError):
    """A `.npy` file that cannot be read as the plain array its header declares."""


def read_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from the header of the .npy file open at `f`, leaving `f` at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def load_array(path: str | os.PathLike) -> np.ndarray:
    """The plain (non-object) array stored in `path`, after checking its header against the file's size."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            try:
                shape, fortran, dtype = read_header(f)
            except (ValueError, EOFError, SyntaxError) as error:
                raise ArrayFileError(f"{path}: not a numpy .npy file ({error})") from None
            if dtype.hasobject:
                raise ArrayFileError(f"{path}: holds {dtype} (pickled) data, expected a plain numeric array")
            available = os.fstat(f.fileno()).st_size - f.tell()
            declared = math.prod(shape) * dtype.itemsize
            if declared > available:
                raise ArrayFileError(f"{path}: its header declares a {list(shape)} {dtype} array ({declared:,} bytes) "
                                     f"but only {available:,} bytes follow; the file is truncated or damaged")
            count = math.prod(shape)
            data = np.frombuffer(f.read(declared), dtype=dtype, count=count) if count else np.empty(0, dtype)
    except OSError as error:
        raise ArrayFileError(f"{path}: cannot read ({error.strerror or error})") from None
    return data.reshape(shape, order="F" if fortran else "C").copy()
