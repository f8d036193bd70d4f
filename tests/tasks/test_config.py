import pytest

from tasks.config import PRESETS, ExperimentConfig, preset_config
from tasks.pipeline import config_from_params


def test_presets_match_the_design_table():
    seed = preset_config("seed", data="hub")
    assert (seed.model, seed.train_size, seed.test_size, seed.max_length, seed.epochs) == (
        "distilbert-base-uncased", 5000, 1000, 128, 2)
    assert (seed.batch_size, seed.ranks, seed.lora_alpha, seed.lora_lr, seed.full_lr) == (
        16, (16,), 16.0, 5e-4, 5e-5)
    assert preset_config("paper").max_length == 512
    assert preset_config("cpu").model == "embedded-minilm"
    assert preset_config("smoke").model == "tiny-distilbert"
    assert set(PRESETS) == {"seed", "paper", "cpu", "smoke"}


def test_overrides_replace_only_what_is_set():
    config = preset_config("cpu", epochs=None, ranks=[4, 8], targets="qv")
    assert config.epochs == 2 and config.ranks == (4, 8) and config.targets == ("qv",)


def test_data_source_defaults_to_env_then_hub(monkeypatch):
    monkeypatch.setenv("LORAFLOW_DATA", "/some/imdb")
    assert preset_config("smoke").data == "/some/imdb"
    monkeypatch.delenv("LORAFLOW_DATA")
    assert preset_config("smoke").data == "hub"


@pytest.mark.parametrize("overrides, message", [
    ({"ranks": [0]}, "rank"),
    ({"ranks": []}, "at least one rank"),
    ({"train_size": 0}, "train_size"),
    ({"max_length": 1024}, "max_length"),
    ({"lora_lr": 2.0}, "lora_lr"),
    ({"baselines": ["zero_shot"]}, "unknown baselines"),
    ({"seeds": [-1]}, "seed"),
    ({"nonsense": 1}, "unknown config fields"),
])
def test_invalid_values_are_refused_with_a_message_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset_config("smoke", **overrides)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*cpu"):
        preset_config("nope")


def test_dict_round_trip_and_variants():
    config = preset_config("smoke", data="x", ranks=[2, 4], targets=["qv", "qkvo"], seeds=[1, 2])
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    assert len(config.lora_variants()) == 2 * 2 * 2
    assert config.full_finetune_variants() == [{"method": "full_finetune", "seed": 1},
                                               {"method": "full_finetune", "seed": 2}]
    assert preset_config("smoke", full_finetune=False).full_finetune_variants() == []


def test_blank_form_fields_keep_the_preset_values():
    config = config_from_params({"preset": "cpu", "model": "", "ranks": [], "epochs": None,
                                 "data": "/d", "train_size": 100})
    assert config.model == "embedded-minilm" and config.ranks == (16,)
    assert config.train_size == 100 and config.data == "/d"
