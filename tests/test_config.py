"""Run config: presets, overrides, validation messages, JSON round trip."""

import pytest

from keras_tune import config as config_lib
from keras_tune.models import families
from keras_tune.errors import UserError


def test_every_preset_loads_and_validates():
    names = config_lib.list_presets()
    assert {"gemma_7b_en", "gemma2_9b_en", "gemma3_270m", "gemma3_270m_offline", "gemma_tiny"} <= set(names)
    for name in names:
        config = config_lib.load_config(name)
        assert config.preset == name
        assert config.model.family in families.names()


def test_overrides_parse_to_field_types():
    config = config_lib.load_config(
        "gemma_tiny",
        overrides={"lora.rank": "8", "lora.targets": "query,key", "optimizer.learning_rate": "3e-4", "train.resume": "true"},
    )
    assert config.lora.rank == 8
    assert config.lora.targets == ("query", "key")
    assert config.optimizer.learning_rate == pytest.approx(3e-4)
    assert config.train.resume is True


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"distribution.mesh": "0x8"}, "--mesh 0x8: both axes must be at least 1"),
        ({"distribution.mesh": "eight"}, "--mesh 'eight' is not of the form BxM"),
        ({"lora.rank": -1}, "--lora-rank -1: expected 0"),
        ({"lora.targets": ("query", "mlp")}, "--lora-targets: unknown ['mlp']"),
        ({"optimizer.learning_rate": 0.0}, "--learning-rate 0.0"),
        ({"data.name": "wiki"}, "--data 'wiki'; expected one of"),
        ({"lora.rnk": 2}, "unknown config field 'lora.rnk'"),
        ({"optimizer.beta_1": "fast"}, "--set optimizer.beta_1=fast"),
    ],
)
def test_bad_values_raise_one_line_user_errors(overrides, fragment):
    with pytest.raises(UserError) as error:
        config_lib.load_config("gemma_tiny", overrides=overrides)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_preset_names_close_matches():
    with pytest.raises(UserError, match="unknown preset 'gemma_8b_en'.*gemma_"):
        config_lib.load_config("gemma_8b_en")


def test_copied_preset_file_is_a_config(tmp_path):
    source = (config_lib.preset_dir() / "gemma_tiny.py").read_text()
    copy = tmp_path / "my_preset.py"
    copy.write_text(source.replace("num_layers=2", "num_layers=3"))
    config = config_lib.load_config(config_file=str(copy))
    assert config.model.arch.num_layers == 3
    with pytest.raises(UserError, match="defines no get_config"):
        (tmp_path / "empty.py").write_text("x = 1\n")
        config_lib.load_config(config_file=str(tmp_path / "empty.py"))


def test_json_round_trip():
    config = config_lib.load_config("gemma2_tiny", overrides={"lora.targets": ("query", "value", "ffw_linear")})
    again = config_lib.from_json(config_lib.to_json(config))
    assert again.to_dict() == config.to_dict()
