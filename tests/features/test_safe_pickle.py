"""The restricted unpickler: data loads, code does not."""

import collections
import io
import os
import pickle

import numpy as np
import pytest
import torch

from features.errors import WeightsError
from features.safe_pickle import safe_load


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_plain_containers_and_numpy_arrays_load(tmp_path):
    data = {"model": collections.OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3)),
            "__author__": "x", "refs": [{"ref_id": 1, "sentences": ["a cat"], "box": (1.5, 2)}],
            "scalar": np.float32(3.5)}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    loaded = safe_load(path)
    np.testing.assert_array_equal(loaded["model"]["w"], data["model"]["w"])
    assert loaded["refs"] == data["refs"] and loaded["scalar"] == np.float32(3.5)


def test_protocol_5_numpy_arrays_load():
    arr = np.linspace(0, 1, 7)
    assert np.array_equal(safe_load(io.BytesIO(pickle.dumps({"a": arr}, protocol=5)))["a"], arr)


def test_pickled_tensor_loads():
    t = torch.arange(5.0)
    assert torch.equal(safe_load(io.BytesIO(pickle.dumps({"t": t})))["t"], t)


def test_os_system_reduce_is_refused_with_file_and_global(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _RunsShell()}))
    with pytest.raises(WeightsError, match=r"evil\.pkl.*refused.*(posix|os)\.system"):
        safe_load(path)


def test_numpy_is_refused_when_not_allowed(tmp_path):
    path = tmp_path / "arr.pkl"
    path.write_bytes(pickle.dumps(np.zeros(2)))
    with pytest.raises(WeightsError, match="refused"):
        safe_load(path, allow_numpy=False)


def test_builtin_eval_is_refused():
    payload = b"cbuiltins\neval\n(S'1+1'\ntR."
    with pytest.raises(WeightsError, match="builtins.eval"):
        safe_load(io.BytesIO(payload))


def test_truncated_or_missing_file_is_one_clear_error(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"a": list(range(100))})[:20])
    with pytest.raises(WeightsError, match="cut.pkl"):
        safe_load(path)
    with pytest.raises(WeightsError, match="nope.pkl"):
        safe_load(tmp_path / "nope.pkl")
