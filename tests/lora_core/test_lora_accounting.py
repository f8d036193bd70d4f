"""Parameter accounting against closed-form counts (scalars, not matrix rows)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from lora_core.accounting import count_parameters, parameter_breakdown, parameter_table
from lora_core.inject import inject_lora
from tasks.models import load_classifier


def distilbert_base_on_meta() -> nn.Module:
    # DistilBERT-base dimensions (dim 768, 6 layers, FFN 3072); 'meta' skips the 66M init.
    with torch.device("meta"):
        return DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))


def distilbert_closed_form(c, rank: int) -> dict[str, int]:
    d, h, L = c.dim, c.hidden_dim, c.n_layers
    embeddings = c.vocab_size * d + c.max_position_embeddings * d
    attention = 4 * (d * d + d)  # q, k, v, out with biases
    ffn = (d * h + h) + (h * d + d)
    norm = 2 * d + L * 2 * (2 * d)  # embedding LN + two LNs per block (weight, bias)
    head = (d * d + d) + (d * c.num_labels + c.num_labels)  # pre_classifier + classifier
    return {"embeddings": embeddings, "attention": L * attention, "ffn": L * ffn,
            "norm": norm, "head": head, "lora": L * 4 * rank * (d + d)}


def bert_closed_form(c, rank: int) -> dict[str, int]:
    d, i, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    return {"embeddings": (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * d,
            "attention": L * 4 * (d * d + d), "ffn": L * ((d * i + i) + (i * d + d)),
            "norm": 2 * d + L * 2 * (2 * d),
            "head": (d * d + d) + d * c.num_labels + c.num_labels,  # pooler + classifier
            "lora": L * 4 * rank * (d + d)}


def assert_matches_closed_form(model: nn.Module, expected: dict[str, int]) -> dict:
    breakdown = parameter_breakdown(model)
    components = {c["component"]: c["params"] for c in breakdown["components"]}
    assert components == {k: v for k, v in expected.items() if k != "lora"}
    assert breakdown["lora_params"] == expected["lora"]
    assert breakdown["total"] == sum(expected.values())
    assert breakdown["trainable"] == expected["lora"] + expected["head"]
    assert count_parameters(model) == {"total": breakdown["total"],
                                       "trainable": breakdown["trainable"]}
    return breakdown


def test_distilbert_base_qkvo_r16_has_589824_lora_params():
    model = distilbert_base_on_meta()
    inject_lora(model, "qkvo", rank=16)
    breakdown = assert_matches_closed_form(model, distilbert_closed_form(model.config, 16))
    assert breakdown["lora_params"] == 6 * 4 * 16 * (768 + 768) == 589_824
    assert len(breakdown["matrices"]) == 24
    assert {m["reduction"] for m in breakdown["matrices"]} == {768 * 768 / (16 * 1536)}  # 24x


def test_projection_without_injection_equals_injected_counts():
    projected = parameter_breakdown(distilbert_base_on_meta(), rank=16, targets="qkvo")
    assert projected["lora_params"] == 589_824
    assert projected["total"] == projected["trainable"]  # nothing injected, nothing frozen
    assert parameter_breakdown(distilbert_base_on_meta())["matrices"] == []


def test_tiny_distilbert_counts_match_closed_form():
    model = load_classifier("tiny-distilbert")
    inject_lora(model, "qkvo", rank=4)
    assert_matches_closed_form(model, distilbert_closed_form(model.config, 4))


@pytest.mark.slow
def test_embedded_minilm_counts_match_closed_form():
    model = load_classifier("embedded-minilm")
    assert count_parameters(model)["total"] - 2 * 384 - 2 == 22_713_216  # all-MiniLM-L6-v2
    inject_lora(model, "qkvo", rank=16)
    assert_matches_closed_form(model, bert_closed_form(model.config, 16))


def test_count_parameters_counts_scalars_not_rows():
    model = nn.Sequential(nn.Linear(10, 3), nn.Linear(3, 2))
    model[1].requires_grad_(False)
    assert count_parameters(model) == {"total": 10 * 3 + 3 + 3 * 2 + 2, "trainable": 33}


def test_reduction_factor_is_dk_over_r_d_plus_k():
    model = load_classifier("tiny-distilbert")
    inject_lora(model, "all-linear", rank=8)
    by_module = {m["module"].split(".", 4)[-1]: m for m in parameter_breakdown(model)["matrices"]}
    lin1 = by_module["ffn.lin1"]  # (out 128, in 64)
    assert lin1["shape"] == [128, 64] and lin1["full_params"] == 8192
    assert lin1["lora_params"] == 8 * (128 + 64)
    assert lin1["reduction"] == pytest.approx(128 * 64 / (8 * 192))


def test_breakdown_is_json_able_and_shares_add_up():
    model = load_classifier("tiny-distilbert")
    inject_lora(model, "qv", rank=2)
    breakdown = json.loads(json.dumps(parameter_breakdown(model)))
    assert sum(c["share"] for c in breakdown["components"]) == pytest.approx(1.0)
    attention = next(c for c in breakdown["components"] if c["component"] == "attention")
    assert breakdown["attention_share"] == attention["share"] > 0


def test_parameter_table_rows_sum_to_the_breakdown():
    model = load_classifier("tiny-distilbert")
    inject_lora(model, "qkvo", rank=4)
    table, breakdown = parameter_table(model), parameter_breakdown(model)
    assert list(table.columns) == ["module", "type", "component", "shape", "params", "trainable",
                                   "lora_params", "reduction"]
    assert table["params"].sum() + table["lora_params"].sum() == breakdown["total"]
    assert table["trainable"].sum() == breakdown["trainable"]
    assert table["lora_params"].sum() == breakdown["lora_params"]
    by_component = table.groupby("component")["params"].sum().to_dict()
    assert by_component == {c["component"]: c["params"] for c in breakdown["components"]}
    q = table.set_index("module").loc["distilbert.transformer.layer.0.attention.q_lin"]
    assert (q["type"], q["shape"], q["lora_params"]) == ("Linear", (64, 64), 4 * 128)
    assert q["reduction"] == pytest.approx(64 * 64 / (4 * 128))
    assert table["module"].is_unique and table["reduction"].isna().sum() == len(table) - 8
