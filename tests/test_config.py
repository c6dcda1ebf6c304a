"""Configuration: YAML loading, dotted overrides, and one-line errors that name the key."""

from pathlib import Path

import pytest

from ptxlab.config import Config, ConfigError, load_config

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def test_default_yaml_is_the_schema_default():
    assert load_config(EXPERIMENTS / "default.yaml") == Config()


def test_paper_yaml_is_table_3_of_the_study():
    paper = load_config(EXPERIMENTS / "paper.yaml")
    assert (paper.model.arch, paper.model.encoder, paper.model.encoder_weights) == (
        "Unet", "efficientnet-b4", "imagenet")
    assert paper.data.image_size == 512 and paper.data.val_fraction == 0.15
    assert paper.train.batch_size == 32 and paper.train.epochs == 300
    assert (paper.optim.lr, paper.optim.lr_min) == (1e-4, 1e-6)
    assert paper.loss.bce_weight == paper.loss.dice_weight == 1.0
    assert paper.train.amp and paper.train.early_stopping_patience == 20
    assert paper.augment.preset == "paper" and paper.augment.strength == 1.0


def test_overrides_are_typed_and_nested():
    config = load_config(None, ["train.batch_size=8", "optim.lr=3e-4",
                                "model.decoder_channels=[32,16]", "data.test_source=null"])
    assert config.train.batch_size == 8
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.model.decoder_channels == [32, 16]
    assert config.data.test_source is None


def test_override_beats_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n")
    assert load_config(path, ["train.epochs=5"]).train.epochs == 5
    assert load_config(path).train.epochs == 3


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.bogus=1", "unknown key 'train.bogus': train has epochs"),
        ("nosuch.key=1", "unknown key 'nosuch': the top level has seed, data"),
        ("augment.preset=heavy", "augment.preset: got 'heavy', allowed: 'none', 'light'"),
        ("train.batch_size=0", "train.batch_size: Input should be greater than or equal to 1"),
        ("train.epochs", "expected KEY=VALUE"),
        ("train.epochs.x=1", "key 'train.epochs' is a value, not a section"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: no such config file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: train.epoch: unknown key"):
        load_config(unknown)


def test_flat_params_cover_every_key():
    flat = Config().flat()
    assert flat["train.batch_size"] == 16
    assert flat["data.synthetic.n_images"] == 320
    assert all(not isinstance(value, dict) for value in flat.values())
