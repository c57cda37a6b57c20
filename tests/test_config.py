"""Config: TOML round trip, defaults, overrides, and clear errors for bad keys and values."""

from __future__ import annotations

import pytest

from finetune.config import Config, config_from_dict, dump_config, load_config, with_overrides
from finetune.errors import ConfigError


def test_toml_round_trip_keeps_every_value(tmp_path):
    config = with_overrides(
        Config(),
        **{
            "model.backbone": "vgg16",
            "model.hidden_units": [256],
            "recipe.head_lr": 3e-4,
            "augment.rotation": 40,
            "seed": 7,
        },
    )
    path = tmp_path / "config.toml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert config.augment.rotation == 40.0 and isinstance(config.augment.rotation, float)


def test_a_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[recipe]\nfinetune_lr = 1e-5\n")
    config = load_config(path)
    assert config.recipe.finetune_lr == 1e-5
    assert config.recipe.head_lr == Config().recipe.head_lr
    assert config.model == Config().model


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"recipe": {"learning_rate": 1.0}}, "unknown key 'learning_rate' in [recipe]"),
        ({"training": {}}, "unknown section or key 'training'"),
        ({"recipe": {"head_epochs": "five"}}, "recipe.head_epochs must be a whole number"),
        ({"recipe": {"optimizer": "lion"}}, "recipe.optimizer = 'lion' is not one of"),
        ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "must stay below 1"),
        ({"augment": {"enabled": "yes"}}, "augment.enabled must be true or false"),
        ({"augment": {"zoom": 1.5}}, "augment.zoom = 1.5 is outside [0.0, 0.9]"),
        ({"augment": {"rotation": -10}}, "augment.rotation = -10.0 is outside [0.0, 180.0]"),
        ({"model": {"pooling": "mean"}}, "model.pooling = 'mean'"),
    ],
)
def test_bad_configs_are_refused_with_the_key_named(data, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert needle in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[recipe\nx = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_every_example_config_loads():
    from pathlib import Path

    examples = sorted(Path(__file__).parents[1].joinpath("examples").glob("*.toml"))
    assert len(examples) >= 6
    for path in examples:
        load_config(path)
