"""Predictions, scores, latency and memory measurement on tiny-distilbert and real reviews."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss

from lora_core.inject import inject_lora, lora_layers, merge_lora
from lora_core.layer import LoRALinear
from tasks import evaluate as evaluate_module
from tasks.evaluate import (
    PeakMemory,
    autocast_dtype,
    evaluate,
    latency_fields,
    measure_latency_ms,
    pad_batch,
    precision_label,
    predict_proba,
)
from tasks.methods import lora as lora_method
from tasks.models import load_classifier, load_tokenizer


@pytest.fixture(scope="module")
def test_frame(imdb_sample) -> pd.DataFrame:
    """40 real test reviews tokenized to at most 32 tokens: what load_split returns."""
    texts = imdb_sample["test"].head(40)
    tokenizer = load_tokenizer("tiny-distilbert")
    ids = tokenizer(texts["text"].tolist(), truncation=True, max_length=32)["input_ids"]
    return pd.DataFrame({"input_ids": ids, "length": [len(x) for x in ids],
                         "label": texts["label"].to_numpy(np.int64)})


@pytest.fixture
def lora_model():
    """tiny-distilbert with non-zero LoRA updates (B random), so merging changes weights."""
    model = load_classifier("tiny-distilbert", seed=0)
    inject_lora(model, "qkvo", rank=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    return model.eval()


def test_pad_batch_pads_to_the_longest_sequence_with_a_mask():
    ids, mask = pad_batch([[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]], pad_id=0)
    assert ids.shape == mask.shape == (3, 5)
    assert ids[1].tolist() == [101, 102, 0, 0, 0]
    assert mask.sum(dim=1).tolist() == [3, 2, 5]


def test_predict_proba_keeps_row_order_and_matches_unpadded_single_rows(test_frame):
    model = load_classifier("tiny-distilbert", seed=1)
    batched = predict_proba(model, test_frame, batch_size=8, device="cpu")
    single = predict_proba(model, test_frame, batch_size=1, device="cpu")  # no padding at all
    assert batched.shape == (40,)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    reversed_rows = predict_proba(model, test_frame.iloc[::-1].reset_index(drop=True), 8, "cpu")
    np.testing.assert_allclose(reversed_rows[::-1], batched, atol=1e-5)
    assert not model.training  # eval mode, and left as it was


def test_predict_proba_is_deterministic_and_restores_training_mode(test_frame):
    model = load_classifier("tiny-distilbert", seed=1).train()
    first = predict_proba(model, test_frame, 16, "cpu")
    np.testing.assert_array_equal(first, predict_proba(model, test_frame, 16, "cpu"))  # no dropout
    assert model.training


def test_evaluate_matches_sklearn_on_the_same_probabilities(test_frame):
    model = load_classifier("tiny-distilbert", seed=2)
    prob = predict_proba(model, test_frame, 16, "cpu")
    scores = evaluate(model, test_frame, 16, "cpu")
    labels, preds = test_frame["label"].to_numpy(), (prob >= 0.5).astype(int)
    assert scores["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert scores["f1"] == pytest.approx(f1_score(labels, preds, zero_division=0))
    assert scores["loss"] == pytest.approx(log_loss(labels, prob, labels=[0, 1]), rel=1e-4)


def test_evaluate_refuses_an_empty_frame(test_frame):
    with pytest.raises(ValueError, match="empty"):
        evaluate(load_classifier("tiny-distilbert"), test_frame.head(0), 8, "cpu")


def test_merged_lora_predicts_like_unmerged_and_like_the_bare_merged_model(lora_model, test_frame):
    base_prob = predict_proba(load_classifier("tiny-distilbert", seed=0), test_frame, 8, "cpu")
    unmerged = predict_proba(lora_model, test_frame, 8, "cpu")
    assert np.abs(unmerged - base_prob).max() > 1e-3  # the adapter does change the model
    merge_lora(lora_model)
    np.testing.assert_allclose(predict_proba(lora_model, test_frame, 8, "cpu"), unmerged, atol=1e-5)
    with lora_method.bare(lora_model):
        assert lora_layers(lora_model) == {}
        bare = predict_proba(lora_model, test_frame, 8, "cpu")
        np.testing.assert_allclose(bare, unmerged, atol=1e-5)
    assert len(lora_layers(lora_model)) == 8
    assert all(isinstance(m, LoRALinear) and m.merged for m in lora_layers(lora_model).values())


def test_latency_fields_time_base_unmerged_and_merged_for_lora(lora_model, test_frame):
    fields = latency_fields(lora_model, test_frame, "cpu", adapter=lora_method)
    assert set(fields["latency_ms"]) == {"base", "unmerged", "merged"}
    assert all(0 < v < 1000 for v in fields["latency_ms"].values())
    assert fields["inference_ms_per_example"] == fields["latency_ms"]["merged"]
    assert all(layer.merged for layer in lora_layers(lora_model).values())
    assert len(lora_layers(lora_model)) == 8  # the wrappers are back after timing the bare model
    plain = latency_fields(load_classifier("tiny-distilbert"), test_frame, "cpu")
    assert set(plain) == {"inference_ms_per_example", "latency_protocol"}
    assert plain["latency_protocol"] == {"batch_size": 1, "examples": 32, "rounds": 3,
                                         "statistic": "median", "device": "cpu",
                                         "precision": "fp32"}


def test_measure_latency_ms_is_positive_per_example_and_validates_arguments(test_frame):
    model = load_classifier("tiny-distilbert")
    assert 0 < measure_latency_ms(model, test_frame, "cpu", n_examples=8, batch_size=4) < 1000
    with pytest.raises(ValueError, match="n_examples"):
        measure_latency_ms(model, test_frame, "cpu", n_examples=0)


def test_peak_memory_on_cpu_sees_a_large_allocation():
    with PeakMemory("cpu") as memory:
        block = torch.ones(64 * 1024 * 1024)  # 256 MiB of float32, written so it is resident
        del block
    assert memory.kind == "cpu_peak_rss_increase"
    assert memory.peak_bytes >= 200 * 1024 * 1024


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_autocast_dtype_on_cpu(monkeypatch, native):
    monkeypatch.setattr(evaluate_module, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16  # asked for: emulated if need be
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast_dtype("fp8", "cpu")


def test_precision_labels_name_the_dtype():
    assert [precision_label(d) for d in (None, torch.bfloat16, torch.float16)] == [
        "fp32", "bf16", "fp16"]


def test_bf16_autocast_on_cpu_predicts_close_to_fp32(test_frame):
    model = load_classifier("tiny-distilbert", seed=3)
    fp32 = predict_proba(model, test_frame, 8, "cpu")
    bf16 = predict_proba(model, test_frame, 8, "cpu", dtype=torch.bfloat16)
    assert bf16.dtype == np.float64 and np.abs(bf16 - fp32).max() < 0.05
