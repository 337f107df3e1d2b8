"""Run configurations: YAML files → dataclasses, `key=value` overrides, validation once at load.

A run config is a tree of dataclasses (each task module defines its top-level one, e.g. `PretrainConfig`, built
from the shared `TrainConfig` and `OptimConfig` below and the model's `tasks.finetuning.ModelConfig`). Values are
converted to the field's type
(`int`, `float`, `bool`, `str`, lists/tuples of those, `X | None`, nested dataclasses, `dict`); unknown keys and
values of the wrong type are a `ConfigError` naming the key and the file. Dataclasses may define `validate()`,
called once after loading, to check values against each other.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from features.atomic import write_text_atomic
from tasks.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass
class OptimConfig:
    """AdamW and the linear warmup / linear decay schedule."""

    lr: float = 1e-4
    head_lr: float | None = None  # lr of the model's pooled-output heads (reference "vil_" heads); None = lr
    text_lr: float | None = None  # lr of the BERT-initialised text stream (reference meant 0.1 x lr); None = lr
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup: float = 0.1  # fraction of the total optimizer steps (< 1) or a number of steps (>= 1)
    max_grad_norm: float | None = 1.0  # None = no clipping

    def validate(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr must be a positive number, got {self.lr}")
        for key in ("head_lr", "text_lr"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"optim.{key} must be a positive number or null, got {value}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.warmup < 0:
            raise ConfigError(f"optim.warmup must be >= 0, got {self.warmup}")


@dataclasses.dataclass
class TrainConfig:
    """The training loop: batch, length, precision, devices, logging and checkpoints."""

    output_dir: str = "runs/run"
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when smaller)
    global_batch_size: int = 32  # per optimizer step, over all ranks and accumulation steps
    grad_accumulation: int = 1
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with GradScaler)
    compile: bool = False  # torch.compile around the model for training steps
    compile_backend: str = "inductor"  # torch.compile's backend: inductor | cudagraphs | aot_eager (debugging) | ...
    pad_to_multiple: int = 1  # round batches' text and region lengths up to a multiple (8: few compiled shapes)
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 2
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None  # optimizer steps; None = at the end of every epoch
    save_every: int | None = None  # optimizer steps; None = at the end of every epoch
    keep_last: int = 2  # checkpoints kept besides the best
    eval_at_end: bool = True
    group_by_length: bool = False  # batches of similar text length (the task's dataset gives text_lengths)

    def validate(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if self.compile:  # only a compiled run pays for importing torch here
            import torch.compiler

            backends = [b for b in torch.compiler.list_backends(exclude_tags=()) if "TESTING" not in b]
            if self.compile_backend not in backends:
                raise ConfigError(f"train.compile_backend: torch.compile has no backend {self.compile_backend!r}; "
                                  f"it has {', '.join(backends)}")
        for key in ("epochs", "global_batch_size", "grad_accumulation", "log_every", "keep_last", "pad_to_multiple"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "eval_every", "save_every"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1 or null, got {getattr(self, key)}")
        if self.global_batch_size % self.grad_accumulation:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"train.grad_accumulation ({self.grad_accumulation})"
            )


def load_config(path: str | os.PathLike | None, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read a YAML file (or start from defaults when `path` is None), apply `key=value` overrides, validate."""
    source = str(path) if path is not None else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config ({error.strerror})") from error
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not a YAML config (binary data at byte {error.start})") from error
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({yaml_problem(error)})") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    config = from_dict(schema, data, source)
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own text spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def from_dict(schema: type[T], data: dict[str, Any], source: str, prefix: str = "") -> T:
    """Build dataclass `schema` from a mapping, converting values; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key {prefix}{key!r}; expected one of {', '.join(sorted(names))}"
            )
    values = {key: _convert(value, hints[key], source, f"{prefix}{key}") for key, value in data.items()}
    return schema(**values)


def apply_override(config: Any, override: str) -> None:
    """Set a dotted key from a `key=value` string; the value is parsed as YAML (ints, floats, bools, lists, null)."""
    source = "command line"
    if "=" not in override:
        raise ConfigError(f"{source}: override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    target = config
    for depth, part in enumerate(parts):
        if isinstance(target, dict):  # a free-form mapping (e.g. model.overrides): the rest of the key is its path
            for inner in parts[depth:-1]:
                target = target.setdefault(inner, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"{source}: {'.'.join(parts[:-1])!r} is not a mapping in override {override!r}")
            target[parts[-1]] = value
            return
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"{source}: unknown key {'.'.join(parts[: depth + 1])!r} in override {override!r}")
        if depth < len(parts) - 1:
            target = getattr(target, part)
    hint = typing.get_type_hints(type(target))[parts[-1]]
    setattr(target, parts[-1], _convert(value, hint, source, key))


def validate(config: Any, prefix: str = "") -> None:
    """Call `validate()` on every dataclass of the tree, innermost first."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    if hasattr(config, "validate"):
        config.validate()


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the merged config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _convert(value: Any, hint: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {expected}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, source, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(options) == 1 else fail(" or ".join(type_name(a) for a in args))
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(hint, value if value is not None else {}, source, f"{key}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail("an integer")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or math.isnan(number):
            raise fail("a number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"a list of {len(args)} values")
            return tuple(_convert(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        converted = [_convert(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return dict(value)
    raise ConfigError(f"{source}: {key} has an unsupported type {hint!r}")


def type_name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
