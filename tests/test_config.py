"""Config loading: the seed's keys, presets, overrides and clear errors."""

from __future__ import annotations

import pytest
from repo_helpers import REPO_ROOT

from qwen_mlx.config import PRESETS, Config
from qwen_mlx.config_file import config_to_yaml, load_config, save_config
from qwen_mlx.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_repo_config_is_the_seeds_full_training_block():
    cfg = load_config(REPO_ROOT / "config.yaml")
    assert cfg.model.path == "models/Qwen/Qwen2.5-3B"
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 32
    assert cfg.training.learning_rate == pytest.approx(5e-5)
    assert cfg.training.num_epochs == 3
    assert cfg.training.batch_size == 1 and cfg.training.gradient_accumulation_steps == 4
    assert cfg.training.warmup_steps == 30


def test_scientific_notation_is_a_number(tmp_path):
    # YAML 1.1 reads 5e-5 as a string; the config must not.
    cfg = load_config(write(tmp_path, "training:\n  learning_rate: 5e-5\n"))
    assert cfg.training.learning_rate == pytest.approx(5e-5)
    assert isinstance(cfg.training.learning_rate, float)


@pytest.mark.parametrize(
    ("preset", "epochs", "lr", "rank"),
    [("quick", 1, 1e-4, 16), ("full", 3, 5e-5, 16), ("enhanced", 5, 3e-5, 32)],
)
def test_presets_are_the_seeds_blocks(preset, epochs, lr, rank):
    cfg = load_config(None, preset)
    assert cfg.training.num_epochs == epochs
    assert cfg.training.learning_rate == pytest.approx(lr)
    assert cfg.lora.rank == rank
    assert cfg.lora.alpha == rank * 2


def test_layers_file_then_preset_then_set(tmp_path):
    path = write(tmp_path, "training:\n  num_epochs: 7\n  seed: 1\n")
    cfg = load_config(
        path, "quick", ["training.learning_rate=2e-4", "lora.target_modules=q_proj,v_proj"]
    )
    assert cfg.training.num_epochs == 1  # preset beats file
    assert cfg.training.seed == 1  # untouched file value kept
    assert cfg.training.learning_rate == pytest.approx(2e-4)  # --set beats preset
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "model:\n  path: x\ntraining:\n  num_epoch: 1\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:4" in message
    assert "did you mean 'training.num_epochs'" in message


def test_unknown_section_suggests_the_right_one(tmp_path):
    with pytest.raises(UserError, match="did you mean 'lora'"):
        load_config(write(tmp_path, "loar:\n  rank: 8\n"))


def test_wrong_type_names_key_value_and_expected_type(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, "lora:\n  rank: sixteen\n"))
    message = str(err.value)
    assert "lora.rank" in message and "'sixteen'" in message and "an integer" in message


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.quantization=3bit", "one of: 4bit, 8bit, none"),
        ("data.valid_ratio=1.5", "[0, 1)"),
        ("training.packing=maybe", "true or false"),
        ("training.backend=tf", "one of: auto, mlx, torch"),
        ("nonsense", "KEY=VALUE"),
    ],
)
def test_bad_overrides_are_clear(override, needle):
    with pytest.raises(UserError, match=None) as err:
        load_config(None, None, [override])
    assert needle in str(err.value)


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"config.yaml:\d+: invalid YAML"):
        load_config(write(tmp_path, "model:\n  path: [unclosed\n"))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, "enhanced", ["data.system_prompt=你是报销助手"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert "你是报销助手" in config_to_yaml(cfg)  # Chinese kept readable


def test_defaults_live_in_the_dataclasses():
    assert Config().training.learning_rate == pytest.approx(5e-5)
    assert set(PRESETS) == {"quick", "full", "enhanced"}
