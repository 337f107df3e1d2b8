"""Run checkpoints: the directory layout, model weights, every RNG's state, and the trainer's position."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_model
from torch import nn

from features.atomic import atomic_path
from tasks.engine.config import save_config, to_dict
from tasks.engine.run_record import RUN_RECORD, write_run_record
from tasks.errors import ResumeError

STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "step-"
CONFIG_FILE = "run_config.yaml"
# what a resumed run may change: how long and where it runs, how often it logs, evaluates and saves
RESUMABLE_KEYS = frozenset(f"train.{key}" for key in (
    "output_dir", "epochs", "max_steps", "compile", "compile_backend", "device", "num_workers", "log_every", "eval_every",
    "save_every", "keep_last", "eval_at_end"))



def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, as tensors and numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], state["numpy_has_gauss"],
         state["numpy_gauss"])
    )
    random.setstate((state["python_version"], tuple(state["python_internal"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise ResumeError(f"{path}: no checkpoint to resume from (no {STATE_FILE} here or in checkpoints/)")
    return found[-1]


@runtime_checkable
class SavesPretrained(Protocol):
    """A model that writes itself as a loadable directory (Hugging Face's config.json + model.safetensors)."""

    def save_pretrained(self, save_directory: str | os.PathLike) -> None: ...


def save_model_weights(model: nn.Module, directory: Path) -> None:
    """`save_pretrained` for models that declare it (`SavesPretrained`), the bare safetensors weights otherwise."""
    if isinstance(model, SavesPretrained):
        model.save_pretrained(directory)
    else:
        save_model(model, str(directory / "model.safetensors"))


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load `model.safetensors` into `model`; keys missing only because their weight is tied are fine."""
    file = directory / "model.safetensors"
    if not file.is_file():
        raise ResumeError(f"{directory}: no model.safetensors")
    try:
        weights = load_file(str(file), device="cpu")
    except Exception as error:  # safetensors raises its own error type for truncated or foreign files
        raise ResumeError(f"{file}: cannot read the weights ({str(error).strip().splitlines()[0][:200]})") from error
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shapes of another model or task
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ResumeError(f"{file}: weights do not match the model, a checkpoint of another task or model? "
                          f"({detail[:160]})") from error
    loaded = {id(t) for name, t in model.state_dict(keep_vars=True).items() if name in weights}
    params = model.state_dict(keep_vars=True)
    untied = [k for k in missing if id(params[k]) not in loaded]
    if untied or unexpected:
        raise ResumeError(
            f"{file}: weights do not match the model (missing {untied[:5]}, unexpected {list(unexpected)[:5]})"
        )





@dataclass
class TrainerState:
    """Where the run is: optimizer steps done, the data position, the best evaluation so far."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_value: float | None = None
    best_step: int | None = None




def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def write_checkpoint(run_dir: Path, state: TrainerState, model: nn.Module, trainer_state: dict[str, Any],
                     run_config: Any = None, run_record: Mapping[str, Any] | None = None) -> Path:
    """Write `checkpoints/step-N` atomically: a temporary directory, renamed once complete.

    Beside the weights: the run config (`run_config.yaml`) and the run record (`run.json`), so that the directory
    alone says what it is.
    """
    final = checkpoint_path(run_dir, state.step)
    with atomic_path(final, folder=True) as tmp:
        tmp.mkdir()
        save_model_weights(model, tmp)
        if run_config is not None:
            save_config(run_config, tmp / CONFIG_FILE)
        if run_record is not None:
            write_run_record(tmp, run_record)
        torch.save({"state": vars(state).copy(), **trainer_state}, tmp / STATE_FILE)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Delete all checkpoints but the last `keep_last` and the best."""
    found = list_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    if best_step is not None:
        keep.add(checkpoint_path(run_dir, best_step))
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def check_resumed_config(path: Path, run_config: Any, run_record: Mapping[str, Any] | None = None) -> None:
    """Refuse (`ResumeError`) to resume checkpoint `path` of another task (its `run.json`), or under a config that
    differs from the one it was trained with in anything but `RESUMABLE_KEYS`, naming every key that differs and
    both values."""
    if run_record is not None and (path / RUN_RECORD).is_file():
        try:
            saved_task = json.loads((path / RUN_RECORD).read_text(encoding="utf-8")).get("task")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
            raise ResumeError(f"{path / RUN_RECORD}: cannot read the checkpoint's run record ({error})") from error
        if saved_task != run_record.get("task"):
            raise ResumeError(f"--resume {path}: a checkpoint of another task ({saved_task}); this run trains "
                              f"{run_record.get('task')}")
    saved_file = path / CONFIG_FILE
    if run_config is None or not saved_file.is_file():
        return
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ResumeError(f"{saved_file}: cannot read the checkpoint's config ({error})") from error
    if not isinstance(saved, dict):
        raise ResumeError(f"{saved_file}: not a run config (a mapping of sections)")
    old, new = _flat(saved), _flat(to_dict(run_config))
    differs = [key for key in sorted(set(old) | set(new)) if key not in RESUMABLE_KEYS and old.get(key) != new.get(key)]
    if differs:
        shown = "; ".join(f"{key} {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}" for key in differs[:4])
        more = f" and {len(differs) - 4} more" if len(differs) > 4 else ""
        raise ResumeError(f"--resume {path}: this run's config differs from the checkpoint's ({shown}{more}); "
                          f"resume with the checkpoint's config ({saved_file}) or start a new run")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return flat


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory (weights_only load); unreadable files are a ResumeError."""
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ResumeError(f"{path / STATE_FILE}: cannot read trainer state ({error})") from error
