"""The method registry and the Variant value: names that round-trip, refused values, the
sweep product, exact learning-rate text."""

from __future__ import annotations

import itertools

import pytest

from tasks import registry
from tasks.registry import METHODS, SWEEP_DIMS, Variant, enumerate_variants, format_lr

SAMPLE_VALUES = {"rank": 16, "targets": "q_lin,v_lin", "lr": 5e-4, "seed": 42}


def _one_variant(name: str) -> Variant:
    """A variant of method `name` with a value on each of its dimensions."""
    return Variant(name, **{d: SAMPLE_VALUES[d] for d in METHODS[name].dims})


@pytest.mark.parametrize("name", list(METHODS))
def test_every_methods_variant_name_round_trips_through_parse(name):
    variant = _one_variant(name)
    assert variant.name.startswith(name)
    assert Variant.parse(variant.name) == variant
    assert Variant.from_dict(variant.to_dict()) == variant
    assert variant.to_dict()["name"] == variant.name


@pytest.mark.parametrize("variant, name, config_name", [
    (Variant("lora", rank=16, targets="qkvo", lr=5e-4, seed=42), "lora_r16_qkvo_lr5e-4_s42",
     "lora_r16_qkvo_lr5e-4"),
    (Variant("lora", rank=8, targets="q_lin, v_lin", lr=2e-3, seed=0),
     "lora_r8_q_lin+v_lin_lr2e-3_s0", "lora_r8_q_lin+v_lin_lr2e-3"),
    (Variant("full_finetune", lr=5e-5, seed=7), "full_finetune_lr5e-5_s7", "full_finetune_lr5e-5"),
    (Variant("majority"), "majority", "majority"),
    (Variant("tfidf_logreg"), "tfidf_logreg", "tfidf_logreg"),
])
def test_variant_names_follow_the_pinned_formats(variant, name, config_name):
    assert variant.name == name and variant.config_name == config_name
    assert Variant.parse(name) == variant


def test_variant_labels_are_for_people():
    lora = Variant("lora", rank=16, targets="qkvo", lr=5e-4, seed=42)
    assert lora.label() == "LoRA r=16 qkvo, lr 5e-4, seed 42"
    assert lora.label(seed=False) == "LoRA r=16 qkvo, lr 5e-4"
    assert Variant("majority").label() == "majority class"


def test_targets_with_underscores_and_dots_parse_back():
    for targets in ("q_lin", "attention.q_lin,attention.v_lin", "query,key,value", "all-linear"):
        v = Variant("lora", rank=2, targets=targets, lr=1e-3, seed=1)
        assert Variant.parse(v.name).targets == targets


@pytest.mark.parametrize("name", [
    "", "lora", "lora_r16_qkvo_s42", "lora_r0x_qkvo_lr5e-4_s42", "full_finetune_s42",
    "full_finetune_lr5e-5", "majority_s42", "bitfit_lr1e-3_s1x", "adapter_r4", "majority_",
    "lora_r16_qkvo_lr5e-4_s42_extra", "lora_r0_qkvo_lr5e-4_s42",
])
def test_names_of_no_variant_are_refused(name):
    with pytest.raises(ValueError):
        Variant.parse(name)


@pytest.mark.parametrize("kwargs, word", [
    ({"method": "adapter"}, "unknown method 'adapter'"),
    ({"method": "lora", "targets": "qkvo", "lr": 5e-4, "seed": 1}, "'rank'"),
    ({"method": "full_finetune", "rank": 4, "lr": 5e-5, "seed": 1}, "take no 'rank'"),
    ({"method": "majority", "seed": 42}, "take no 'seed'"),
    ({"method": "lora", "rank": 0, "targets": "qkvo", "lr": 5e-4, "seed": 1}, "rank"),
    ({"method": "lora", "rank": True, "targets": "qkvo", "lr": 5e-4, "seed": 1}, "rank"),
    ({"method": "lora", "rank": 2.0, "targets": "qkvo", "lr": 5e-4, "seed": 1}, "rank"),
    ({"method": "lora", "rank": 4, "targets": "", "lr": 5e-4, "seed": 1}, "target set"),
    ({"method": "lora", "rank": 4, "targets": "q/v", "lr": 5e-4, "seed": 1}, "target set"),
    ({"method": "lora", "rank": 4, "targets": "qkvo", "lr": 0, "seed": 1}, "learning rate"),
    ({"method": "lora", "rank": 4, "targets": "qkvo", "lr": 1.5, "seed": 1}, "learning rate"),
    ({"method": "full_finetune", "lr": 5e-5, "seed": -1}, "seed"),
    ({"method": "full_finetune", "lr": 5e-5, "seed": False}, "seed"),
])
def test_invalid_variant_dimensions_are_refused_naming_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Variant(**kwargs)


def test_unknown_method_error_names_the_known_ones():
    with pytest.raises(ValueError, match="expected one of " + ", ".join(METHODS)):
        registry.method("distillation")


def test_enumerate_variants_covers_the_sweep_product_in_registry_order():
    values = {"rank": [4, 8], "targets": ["qv", "qkvo"], "seed": [1, 2, 3],
              "lora_lr": [1e-3, 2e-3], "full_lr": [3e-5, 5e-5]}
    variants = enumerate_variants(list(reversed(METHODS)), values)
    names = [v.name for v in variants]
    assert len(names) == len(set(names))
    expected = set()
    for m in METHODS.values():
        axes = [values[m.lr_field] if d == "lr" else values[d] for d in m.dims]
        expected |= {Variant(m.name, **dict(zip(m.dims, combo))) for combo in itertools.product(*axes)}
    assert set(variants) == expected
    lora = [v for v in variants if v.method == "lora"]
    assert len(lora) == 2 * 2 * 2 * 3
    assert len([v for v in variants if v.method == "full_finetune"]) == 2 * 3
    assert all(len([v for v in variants if v.method == m.name]) == 1
               for m in METHODS.values() if not m.dims)
    order = [list(METHODS).index(v.method) for v in variants]
    assert order == sorted(order)  # registry order, whatever order the methods were given in


def test_enumerate_variants_of_a_subset_of_methods():
    values = {"rank": [4], "targets": ["qv"], "seed": [1], "lora_lr": [1e-3], "full_lr": [5e-5]}
    assert [v.name for v in enumerate_variants(["majority", "lora"], values)] == [
        "majority", "lora_r4_qv_lr1e-3_s1"]


def test_group_by_configuration_puts_seeds_together_in_order():
    variants = [Variant("full_finetune", lr=5e-5, seed=s) for s in (3, 1, 2)] + [Variant("majority")]
    groups = registry.group_by_configuration(variants)
    assert list(groups) == ["full_finetune_lr5e-5", "majority"]
    assert [v.seed for v in groups["full_finetune_lr5e-5"]] == [1, 2, 3]


@pytest.mark.parametrize("lr, text", [
    (5e-4, "5e-4"), (0.0005, "5e-4"), (2e-3, "2e-3"), (1.5e-4, "1.5e-4"), (0.00015, "1.5e-4"),
    (5e-5, "5e-5"), (3e-5, "3e-5"), (1e-5, "1e-5"), (0.1, "1e-1"), (0.5, "5e-1"),
    (2.5e-5, "2.5e-5"), (1.25e-3, "1.25e-3"), (1e-10, "1e-10"),
])
def test_format_lr_is_the_shortest_exact_scientific_form(lr, text):
    assert format_lr(lr) == text
    assert float(text) == lr  # exact: the name gives back the very same float


def test_every_method_is_well_formed():
    for name, m in METHODS.items():
        assert m.name == name and m.module == f"tasks.methods.{name}"
        assert m.kind in ("baseline", "trained") and m.label and m.description
        assert m.color.startswith("#") and len(m.color) == 7
        assert set(m.dims) <= set(SWEEP_DIMS)
        assert list(m.dims) == [d for d in SWEEP_DIMS if d in m.dims]  # the name's order
        if m.trained:  # trained methods are tuned over learning rates and seeded
            assert m.lr_field and "lr" in m.dims and "seed" in m.dims and m.artifact
    colors = [m.color for m in METHODS.values()]
    labels = [m.label for m in METHODS.values()]
    assert len(set(colors)) == len(colors) and len(set(labels)) == len(labels)
