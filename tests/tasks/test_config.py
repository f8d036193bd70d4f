"""ExperimentConfig: presets, overrides, every field typed and bounded, the same-tuning-budget
rule and the sweep limit; config_from_params for the trigger form."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tasks import registry
from tasks.config import (
    BOUNDS,
    DEFAULT_PRESET,
    MAX_VARIANTS,
    PRESETS,
    RANDOM_MODELS,
    ExperimentConfig,
    preset_config,
)
from tasks.pipeline import config_from_params


def test_presets_match_the_design_table():
    seed = preset_config("seed", data="hub")
    assert (seed.model, seed.train_size, seed.val_size, seed.test_size, seed.max_length,
            seed.epochs) == ("distilbert-base-uncased", 5000, 500, 1000, 128, 2)
    assert (seed.batch_size, seed.ranks, seed.lora_alpha, seed.lora_lr, seed.full_lr,
            seed.targets, seed.warmup_steps, seed.weight_decay, seed.seeds) == (
        16, (16,), 16.0, (5e-4,), (5e-5,), ("qkvo",), 100, 0.01, (42,))
    paper = preset_config("paper")
    assert (paper.train_size, paper.val_size, paper.test_size, paper.max_length,
            paper.epochs) == (22402, 2500, 24676, 512, 3)  # every distinct review
    cpu = preset_config("cpu")
    assert (cpu.model, cpu.train_size, cpu.test_size, cpu.max_length) == ("embedded-minilm", 2000,
                                                                           1000, 128)
    # from the validation sweep (bench/experiments/cpu_lr_sweep.md)
    assert (cpu.lora_lr, cpu.full_lr) == ((2e-3,), (1e-4,))
    smoke = preset_config("smoke")
    assert (smoke.model, smoke.train_size, smoke.test_size, smoke.max_length, smoke.epochs) == (
        "tiny-distilbert", 256, 128, 64, 1)
    assert smoke.model in RANDOM_MODELS
    assert set(PRESETS) == {"seed", "paper", "cpu", "smoke"} and DEFAULT_PRESET == "cpu"
    for name in PRESETS:
        assert preset_config(name).precision == "auto"


def test_every_preset_fits_imdbs_splits():
    """Validation is drawn from IMDB's 25,000 training reviews, beside the training subset."""
    for name in PRESETS:
        config = preset_config(name)
        assert config.train_size + config.val_size <= 25_000, name
        assert config.test_size <= 25_000, name


def test_presets_run_the_registrys_default_methods():
    for name in PRESETS:
        assert preset_config(name).methods == registry.default_methods(name)
    assert {"majority", "tfidf_logreg", "seed_heuristic", "lora", "full_finetune"} <= set(
        preset_config("smoke").methods)


def test_overrides_replace_only_what_is_set():
    config = preset_config("cpu", epochs=None, ranks=[4, 8], targets="qv", lora_lr=[1e-3])
    assert config.epochs == 2 and config.ranks == (4, 8) and config.targets == ("qv",)
    assert config.lora_lr == (1e-3,)
    again = config.with_overrides(epochs=3, ranks=None)
    assert again.epochs == 3 and again.ranks == (4, 8)


def test_data_source_defaults_to_env_then_hub(monkeypatch):
    monkeypatch.setenv("LORAFLOW_DATA", "/some/imdb")
    assert preset_config("smoke").data == "/some/imdb"
    monkeypatch.delenv("LORAFLOW_DATA")
    assert preset_config("smoke").data == "hub"


def test_target_sets_are_normalised():
    assert preset_config("smoke", targets=["q_lin, v_lin", " qv "]).targets == ("q_lin,v_lin",
                                                                              "qv")


@pytest.mark.parametrize("overrides, message", [
    ({"ranks": [0]}, "rank"),
    ({"ranks": [2048]}, "rank"),
    ({"ranks": []}, "ranks must list at least one value"),
    ({"ranks": [4, 4]}, "ranks lists a value twice"),
    ({"ranks": [True]}, "ranks must hold int"),
    ({"ranks": ["4"]}, "ranks must hold int"),
    ({"train_size": 0}, "train_size"),
    ({"train_size": True}, "train_size"),
    ({"val_size": 0}, "val_size"),
    ({"val_size": 2.5}, "val_size"),
    ({"test_size": False}, "test_size"),
    ({"epochs": True}, "epochs"),
    ({"epochs": "3"}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_length": 1024}, "max_length"),
    ({"max_length": 4}, "max_length"),
    ({"warmup_steps": -5}, "warmup_steps"),
    ({"weight_decay": -1}, "weight_decay"),
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": True}, "lora_dropout"),
    ({"data_seed": -1}, "data_seed"),
    ({"data_seed": 2**32}, "data_seed"),
    ({"lora_lr": 2.0}, "lora_lr"),
    ({"lora_lr": [0]}, "lora_lr"),
    ({"full_lr": [float("inf")]}, "full_lr"),
    ({"seeds": [-1]}, "seed"),
    ({"seeds": [2**31]}, "seed"),
    ({"precision": "fp8"}, "precision"),
    ({"truncation": "middle"}, "truncation must be one of"),
    ({"model": ""}, "model"),
    ({"data": "  "}, "data"),
    ({"targets": ["q/v"]}, "target set"),
    ({"methods": ["distillation"]}, "unknown method 'distillation'"),
    ({"methods": []}, "methods must list at least one value"),
    ({"methods": ["lora", "lora"]}, "methods lists a value twice"),
    ({"baselines": ["majority"]}, "unknown config fields \\['baselines'\\]"),
    ({"full_finetune": False}, "unknown config fields"),
    ({"nonsense": 1}, "unknown config fields"),
])
def test_invalid_values_are_refused_with_a_message_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset_config("smoke", **overrides)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_every_bounded_field_refuses_values_outside_its_bounds_and_of_the_wrong_type(name):
    kind, low, high = BOUNDS[name]
    base = preset_config("smoke", data="x")
    step = 1 if kind is int else 1e-6 * max(1.0, abs(high))
    for bad in (low - step, high + 2 * step, True, "1", None):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(base, **{name: bad})
    for good in (low, high):  # the bounds themselves are allowed
        assert getattr(dataclasses.replace(base, **{name: kind(good)}), name) == kind(good)


def test_every_field_of_the_config_is_checked():
    """Each field is a tuple field, a bounded number, or one of the checked strings: a new
    field cannot be added without deciding how it is validated."""
    from tasks.config import _TUPLE_FIELDS

    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    assert names == set(_TUPLE_FIELDS) | set(BOUNDS) | {"preset", "model", "data", "precision",
                                                                "truncation"}


def test_unequal_learning_rate_counts_break_the_same_tuning_budget():
    with pytest.raises(ValueError, match="same tuning budget.*lora_lr: 2.*full_lr: 1"):
        preset_config("smoke", lora_lr=[1e-3, 2e-3], full_lr=[5e-5])
    # without full fine-tuning there is nothing to be fair to
    config = preset_config("smoke", lora_lr=[1e-3, 2e-3], methods=["majority", "lora"])
    assert config.lora_lr == (1e-3, 2e-3)
    both = preset_config("smoke", lora_lr=[1e-3, 2e-3], full_lr=[3e-5, 5e-5])
    assert len([v for v in both.variants() if v.method == "lora"]) == 2
    assert len([v for v in both.variants() if v.method == "full_finetune"]) == 2


def test_a_sweep_over_max_variants_is_refused_with_the_number_asked_for():
    ranks, seeds = list(range(1, 27)), list(range(20))
    sizes = {"rank": len(ranks), "targets": 1, "lr": 1, "seed": len(seeds)}
    n = sum(math.prod(sizes[d] for d in registry.METHODS[m].dims)
            for m in preset_config("smoke").methods)
    assert n > MAX_VARIANTS
    with pytest.raises(ValueError, match=f"the sweep asks for {n} variants; at most {MAX_VARIANTS}"):
        preset_config("smoke", ranks=ranks, seeds=seeds)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*cpu"):
        preset_config("nope")


def test_dict_round_trip_and_variants():
    config = preset_config("smoke", data="x", ranks=[2, 4], targets=["qv", "qkvo"], seeds=[1, 2])
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown config fields \\['extra'\\]"):
        ExperimentConfig.from_dict({**config.to_dict(), "extra": 1})
    variants = config.variants()
    assert len([v for v in variants if v.method == "lora"]) == 2 * 2 * 2
    assert [v.name for v in variants if v.method == "full_finetune"] == [
        "full_finetune_lr5e-4_s1", "full_finetune_lr5e-4_s2"]
    assert len(variants) == len({v.name for v in variants})
    encoder = config.method_variants(encoder=True)
    other = config.method_variants(encoder=False)
    assert sorted(encoder + other, key=variants.index) == variants
    assert all(registry.METHODS[v.method].uses_encoder for v in encoder)
    assert not any(registry.METHODS[v.method].uses_encoder for v in other)


def test_blank_form_fields_keep_the_preset_values():
    config = config_from_params({"preset": "cpu", "model": "", "ranks": [], "epochs": None,
                                 "methods": [], "lora_lr": None, "data": "/d",
                                 "train_size": 100})
    cpu = preset_config("cpu")
    assert config.model == cpu.model and config.ranks == cpu.ranks
    assert config.methods == cpu.methods and config.lora_lr == cpu.lora_lr
    assert config.train_size == 100 and config.data == "/d"
    assert config_from_params({}).preset == DEFAULT_PRESET
    assert config_from_params({"preset": None, "epochs": 3}).preset == DEFAULT_PRESET
    with pytest.raises(ValueError, match="unknown config fields \\['rank'\\]"):
        config_from_params({"preset": "smoke", "rank": 8})


@pytest.mark.parametrize("text, kind, expected", [
    ("5e-4, 2e-3", float, (5e-4, 2e-3)),
    ("5e-4\n2e-3\n", float, (5e-4, 2e-3)),
    (" 0.001 ;.002 ", float, (1e-3, 2e-3)),
    ("4,8, 16", int, (4, 8, 16)),
    ("1\n2", int, (1, 2)),
])
def test_sweep_lists_typed_as_text_are_parsed_like_lists(text, kind, expected):
    from tasks.config import parse_list

    assert tuple(parse_list("x", text, kind)) == expected
    field = "lora_lr" if kind is float else "ranks"
    assert getattr(preset_config("smoke", methods=["lora"], **{field: text}), field) == expected


@pytest.mark.parametrize("overrides, message", [
    ({"lora_lr": "1e-3, fast"}, "lora_lr: 'fast' is not a number"),
    ({"ranks": "4, 8.5"}, "ranks: '8.5' is not an integer"),
    ({"seeds": "1, 1"}, "seeds lists a value twice"),
    ({"ranks": "0, 4"}, r"LoRA ranks must be integers in \[1, 1,024\], got \[0\]"),
    ({"full_lr": "2"}, r"full_lr values must lie in \(0, 1\), got \[2.0\]"),
])
def test_typed_sweep_lists_are_checked_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset_config("smoke", methods=["lora", "full_finetune"], **overrides)


def test_typed_text_matches_the_forms_pattern_exactly_when_it_parses():
    """The trigger form refuses with the same rule prepare applies (no value that passes
    the form fails to parse, none that parses is refused)."""
    import re

    from tasks.config import INTEGER_PATTERN, NUMBER_PATTERN, list_pattern, parse_list

    for kind, item in ((float, NUMBER_PATTERN), (int, INTEGER_PATTERN)):
        for text in ("1e-3", "1e-3,2e-3", "1, 2", "1\n2\n", ".5", "5.", "1e5", "x", "1,,2",
                     "1 - 2", "-1", "1.5.2", "0x10", "2 3 ; 4", "nan", "inf", "1_000"):
            try:
                parse_list("f", text, kind)
                parses = True
            except ValueError:
                parses = False
            assert bool(re.match(list_pattern(item), text)) == parses, (kind, text)
