"""Run configs: YAML → dataclasses, overrides with type conversion, errors that name the key and file."""

import dataclasses

import pytest
import yaml

from tasks.engine.config import OptimConfig, TrainConfig, load_config, save_config
from tasks.errors import ConfigError
from tasks.finetuning import ModelConfig


@dataclasses.dataclass
class DataSection:
    path: str | None = None
    max_length: int = 36
    sizes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunConfig:
    task: str = "demo"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)


def write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_values_fill_nested_dataclasses_and_keep_defaults(tmp_path):
    path = write(tmp_path, {"model": {"preset": "tiny"}, "optim": {"lr": "1e-4", "betas": [0.9, 0.98]}})
    config = load_config(path, RunConfig)
    assert config.model.preset == "tiny"
    assert config.optim.lr == pytest.approx(1e-4) and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.9, 0.98)
    assert config.train.global_batch_size == TrainConfig().global_batch_size


def test_overrides_convert_ints_floats_bools_lists_and_null(tmp_path):
    config = load_config(
        write(tmp_path, {}),
        RunConfig,
        ["train.epochs=3", "optim.lr=2e-5", "train.compile=true", "data.sizes=[1, 2]", "optim.max_grad_norm=null",
         "data.path=some/file.tsv", "optim.weight_decay=0"],
    )
    assert config.train.epochs == 3
    assert config.optim.lr == pytest.approx(2e-5)
    assert config.train.compile is True
    assert config.data.sizes == [1, 2]
    assert config.optim.max_grad_norm is None
    assert config.data.path == "some/file.tsv"
    assert config.optim.weight_decay == 0.0 and isinstance(config.optim.weight_decay, float)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.'?epoch"):
        load_config(path, RunConfig)


def test_unknown_override_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="train.nonsense"):
        load_config(write(tmp_path, {}), RunConfig, ["train.nonsense=1"])


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config(write(tmp_path, {"train": {"epochs": "many"}}), RunConfig)
    with pytest.raises(ConfigError, match="train.compile must be true or false"):
        load_config(write(tmp_path, {}), RunConfig, ["train.compile=3"])


def test_validation_runs_once_at_load(tmp_path):
    with pytest.raises(ConfigError, match="grad_accumulation"):
        load_config(write(tmp_path, {"train": {"global_batch_size": 10, "grad_accumulation": 3}}), RunConfig)
    with pytest.raises(ConfigError, match="precision"):
        load_config(write(tmp_path, {}), RunConfig, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.compile_backend: torch.compile has no backend 'inductr'; it has .*inductor"):
        load_config(write(tmp_path, {}), RunConfig, ["train.compile=true", "train.compile_backend=inductr"])
    assert load_config(write(tmp_path, {}), RunConfig, ["train.compile=true", "train.compile_backend=aot_eager"])


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config(write(tmp_path, {"model": {"overrides": {"num_hidden_layers": 2}}}), RunConfig,
                         ["optim.betas=[0.8, 0.9]"])
    save_config(config, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml", RunConfig) == config


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", RunConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad, RunConfig)


@pytest.mark.parametrize("task", ["vqa", "retrieval", "refcoco", "refcoco+", "refcocog"])
def test_finetuning_configs_give_the_pooled_heads_the_reference_lr(task):
    from pathlib import Path

    from tasks.registry import task_class

    path = Path(__file__).parents[3] / "tasks" / "configs" / f"{task}.yaml"
    config = load_config(path, task_class(task).config_class)
    assert config.optim.head_lr == 1e-4 and config.optim.lr < config.optim.head_lr
    with pytest.raises(ConfigError, match="optim.head_lr"):
        load_config(path, task_class(task).config_class, ["optim.head_lr=-1"])


def test_nested_model_overrides_are_settable_on_the_command_line():
    config = load_config(None, RunConfig, ["model.overrides.v_hidden_size=64", "model.overrides.fixed_t_layer=2"])
    assert config.model.overrides == {"v_hidden_size": 64, "fixed_t_layer": 2}


def test_a_typo_inside_model_overrides_is_an_error_naming_the_field():
    with pytest.raises(ConfigError, match="v_hiden_size.*did you mean 'v_hidden_size'"):
        load_config(None, RunConfig, ["model.overrides.v_hiden_size=64"])
