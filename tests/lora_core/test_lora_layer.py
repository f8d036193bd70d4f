"""LoRALinear on small tensors: the math, init, merge/unmerge, freezing, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_core.layer import LoRALinear


def make_layer(rank: int = 4, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
               in_features: int = 12, out_features: int = 10, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features), rank, alpha, dropout, use_rslora)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would make every check below trivial
    return layer


@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_explicit_w0_plus_scaled_ba(rank, use_rslora):
    layer = make_layer(rank=rank, alpha=8.0, use_rslora=use_rslora)
    scaling = 8.0 / (math.sqrt(rank) if use_rslora else rank)
    assert layer.scaling == pytest.approx(scaling)
    x = torch.randn(3, 5, 12)
    weight = layer.base.weight + scaling * layer.lora_B @ layer.lora_A  # W0 + s·B·A
    expected = x @ weight.T + layer.base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), scaling * layer.lora_B @ layer.lora_A)


def test_fresh_layer_is_a_no_op():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoRALinear(base, rank=4, alpha=16)
    x = torch.randn(7, 12)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer(x), base(x))


def test_lora_a_is_kaiming_uniform_with_a_sqrt5():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 8), rank=64, alpha=64)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5): gain √(1/3) · √(3/fan_in)
    assert layer.lora_A.shape == (64, 256) and layer.lora_B.shape == (8, 64)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_merge_matches_unmerged_output(rank):
    layer = make_layer(rank=rank).eval()
    x = torch.randn(4, 12)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


def test_merged_weight_equals_w0_plus_scaled_ba_and_merging_twice_changes_nothing():
    layer = make_layer()
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    once = layer.base.weight.detach().clone()
    torch.testing.assert_close(once, w0 + layer.scaling * layer.lora_B @ layer.lora_A)
    layer.merge()
    assert torch.equal(layer.base.weight, once)


def test_unmerge_restores_base_weight_and_is_idempotent():
    layer = make_layer()
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_eval_and_train_do_not_merge():
    layer = make_layer()
    w0 = layer.base.weight.detach().clone()
    layer.eval()
    layer.train()
    assert not layer.merged and torch.equal(layer.base.weight, w0)


def test_training_forward_while_merged_raises():
    layer = make_layer()
    layer.merge()
    with pytest.raises(RuntimeError, match="merged; call unmerge"):
        layer.train()(torch.randn(2, 12))
    layer.unmerge()
    layer(torch.randn(2, 12))  # fine again


def test_merge_refuses_non_finite_delta_and_leaves_weight_untouched():
    layer = make_layer()
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w0)


def test_backward_reaches_only_lora_factors_and_step_keeps_base_frozen():
    layer = make_layer().train()
    w0, b0 = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    a0 = layer.lora_A.detach().clone()
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(8, 12)).pow(2).mean().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    optimizer.step()
    assert torch.equal(layer.base.weight, w0) and torch.equal(layer.base.bias, b0)
    assert not torch.equal(layer.lora_A, a0)
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A", "lora_B"]


def test_dropout_touches_only_the_lora_branch():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoRALinear(base, rank=4, alpha=4, dropout=0.5).train()  # B = 0: branch is zero
    x = torch.randn(6, 12)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.equal(layer(x), layer(x))  # dropout is random in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kwargs, bad", [
    ({"rank": 0}, "0"), ({"rank": -2}, "-2"), ({"rank": 2.5}, "2.5"), ({"rank": True}, "True"),
    ({"alpha": 0}, "0"), ({"alpha": -1.0}, "-1.0"), ({"alpha": float("nan")}, "nan"),
    ({"dropout": 1.0}, "1.0"), ({"dropout": -0.1}, "-0.1"),
])
def test_invalid_hyperparameters_raise_value_error_naming_the_value(kwargs, bad):
    args = {"rank": 4, "alpha": 8.0, "dropout": 0.0} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))) as err:
        LoRALinear(nn.Linear(4, 4), **args)
    assert bad in str(err.value)


def test_wrapping_a_non_linear_module_raises():
    with pytest.raises(TypeError, match="Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=2, alpha=2)


def test_wrapper_inherits_the_training_mode_of_its_base():
    assert not LoRALinear(nn.Linear(4, 4).eval(), rank=2, alpha=2, dropout=0.5).training
    assert LoRALinear(nn.Linear(4, 4), rank=2, alpha=2).training
