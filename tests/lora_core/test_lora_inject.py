"""inject_lora on whole (tiny) models: presets, freezing, gradients, merge, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lora_core.inject import (
    freeze_all_but,
    head_module_names,
    inject_lora,
    lora_layers,
    merge_lora,
    unmerge_lora,
    unwrap_lora,
)
from lora_core.layer import LoRALinear
from tasks.models import load_classifier


def tiny_distilbert() -> nn.Module:
    return load_classifier("tiny-distilbert", seed=0)


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def batch(vocab: int = 100) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # padding must keep working
    return {"input_ids": ids, "attention_mask": mask}


def randomise_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.5)


@pytest.mark.parametrize("targets, suffixes", [
    ("qkvo", {"q_lin", "k_lin", "v_lin", "out_lin"}),
    ("qv", {"q_lin", "v_lin"}),
    ("all-linear", {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"}),
    ("q_lin,ffn.lin2", {"q_lin", "lin2"}),
])
def test_distilbert_targets_select_expected_modules(targets, suffixes):
    model = tiny_distilbert()
    names = inject_lora(model, targets, rank=2)
    assert len(names) == 2 * len(suffixes)  # two layers
    assert {n.rsplit(".", 1)[-1] for n in names} == suffixes
    assert all(n.startswith("distilbert.transformer.layer.") for n in names)
    assert sorted(names) == sorted(lora_layers(model))


@pytest.mark.parametrize("targets, expected", [
    ("qkvo", {"attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense"}),
    ("qv", {"attention.self.query", "attention.self.value"}),
])
def test_bert_presets_select_attention_projections_only(targets, expected):
    model = tiny_bert()
    names = inject_lora(model, targets, rank=2)
    assert {n.split(".", 4)[-1] for n in names} == expected  # strip 'bert.encoder.layer.N.'
    assert not any("intermediate" in n or n.endswith("layer.0.output.dense") for n in names)


def test_all_linear_covers_the_encoder_but_not_the_head():
    model = tiny_bert()
    names = inject_lora(model, "all-linear", rank=2)
    assert len(names) == 2 * 6  # 6 linears per layer; the pooler is part of the head
    assert "bert.pooler.dense" not in names and "classifier" not in names
    distil = tiny_distilbert()
    assert not {"pre_classifier", "classifier"} & set(inject_lora(distil, "all-linear", rank=2))


def test_unknown_target_lists_existing_linear_modules():
    with pytest.raises(ValueError, match="'q_proj' matched no linear module") as err:
        inject_lora(tiny_distilbert(), "q_lin,q_proj")
    for suffix in ("attention.q_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"):
        assert suffix in str(err.value)
    with pytest.raises(ValueError, match="attention.self.query.*pooler.dense"):
        inject_lora(tiny_bert(), "classifier")  # the head is not a target


@pytest.mark.parametrize("targets", ["", "  ", ",", None])
def test_empty_targets_raise(targets):
    with pytest.raises(ValueError, match="targets"):
        inject_lora(tiny_distilbert(), targets)


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"alpha": 0}, {"dropout": 1.5}])
def test_invalid_hyperparameters_raise_through_inject(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        inject_lora(tiny_distilbert(), "qv", **kwargs)


def test_injecting_twice_raises():
    model = tiny_distilbert()
    inject_lora(model, "qv")
    with pytest.raises(ValueError, match="already has 4 LoRA layers"):
        inject_lora(model, "qkvo")


def test_zero_init_is_a_no_op_on_the_whole_model():
    model, reference = tiny_distilbert(), tiny_distilbert()
    inject_lora(model, "all-linear", rank=8, alpha=16)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, reference(**batch()).logits,
                                   atol=0, rtol=0)


def test_trainable_parameters_are_lora_factors_and_the_named_heads():
    model = tiny_distilbert()
    inject_lora(model, "qkvo", rank=4)
    assert head_module_names(model) == ["pre_classifier", "classifier"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    heads = [n for n in trainable if not n.rsplit(".", 1)[-1].startswith("lora_")]
    assert sorted(heads) == ["classifier.bias", "classifier.weight", "pre_classifier.bias",
                             "pre_classifier.weight"]
    assert len(trainable) - len(heads) == 2 * 2 * 4  # A and B for 4 targets in 2 layers


def test_bert_head_is_pooler_plus_classifier_and_the_encoder_stays_frozen():
    model = tiny_bert()
    inject_lora(model, "qkvo", rank=2)
    heads = [n for n, p in model.named_parameters()
             if p.requires_grad and not n.rsplit(".", 1)[-1].startswith("lora_")]
    assert sorted(heads) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                             "classifier.bias", "classifier.weight"]
    assert not model.bert.encoder.layer[0].output.dense.weight.requires_grad


def test_trainable_modules_empty_list_trains_only_lora():
    model = tiny_distilbert()
    inject_lora(model, "qv", trainable_modules=[])
    assert all(n.rsplit(".", 1)[-1].startswith("lora_")
               for n, p in model.named_parameters() if p.requires_grad)


def test_backward_gives_gradients_only_to_lora_and_heads_and_base_stays_frozen():
    model = tiny_distilbert().train()
    inject_lora(model, "qkvo", rank=4)
    randomise_lora(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**batch(), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert all(not torch.equal(params[n], value) for n, value in trainable.items())


@pytest.mark.parametrize("build", [tiny_distilbert, tiny_bert])
def test_merged_model_matches_unmerged_and_unmerge_restores(build):
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, "all-linear", rank=4)
    randomise_lora(model)
    with torch.no_grad():
        unmerged = model(**batch()).logits
        assert merge_lora(model) == list(lora_layers(model))
        assert all(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(**batch()).logits, unmerged, atol=1e-5, rtol=0)
        merge_lora(model)  # idempotent
        torch.testing.assert_close(model(**batch()).logits, unmerged, atol=1e-5, rtol=0)
        unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, original[f"{name}.weight"], atol=1e-6, rtol=0)


def test_merge_lora_is_all_or_nothing_when_one_delta_is_not_finite():
    model = tiny_distilbert()
    inject_lora(model, "qkvo", rank=2)
    randomise_lora(model)
    last = list(lora_layers(model))[-1]
    with torch.no_grad():
        lora_layers(model)[last].lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=f"{last}: refusing to merge"):
        merge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_unwrap_lora_leaves_plain_linear_modules_with_merged_weights():
    model = tiny_distilbert()
    inject_lora(model, "qv", rank=2)
    randomise_lora(model)
    with torch.no_grad():
        expected = model(**batch()).logits
        unwrap_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert type(model.distilbert.transformer.layer[0].attention.q_lin) is nn.Linear
        assert not any("lora_" in k for k in model.state_dict())
        torch.testing.assert_close(model(**batch()).logits, expected, atol=1e-5, rtol=0)


def test_freeze_all_but_rejects_unknown_modules():
    model = tiny_distilbert()
    with pytest.raises(ValueError, match="'score'.*pre_classifier"):
        freeze_all_but(model, ["score"])
    assert freeze_all_but(model, ["classifier"]) == ["classifier.weight", "classifier.bias"]
    assert not model.pre_classifier.weight.requires_grad


def test_unknown_trainable_module_raises_before_any_surgery():
    model = tiny_distilbert()
    with pytest.raises(ValueError, match="'score'"):
        inject_lora(model, "qv", trainable_modules=["score"])
    assert not lora_layers(model)
