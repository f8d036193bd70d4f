"""BitFit, added through the registry alone: it trains only biases and the head, saves
them, and runs in the CLI, the DAG's plan and the report like any other method."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tasks import registry
from tasks.config import preset_config
from tasks.methods import bitfit
from tasks.models import load_classifier


def test_bitfit_trains_only_biases_and_the_head():
    model = load_classifier("tiny-distilbert", seed=0)
    names = bitfit.trainable_names(model)
    assert names and all(n.endswith(".bias") or n.startswith(("pre_classifier.", "classifier."))
                         for n in names)
    assert "distilbert.transformer.layer.0.attention.q_lin.bias" in names
    assert "distilbert.transformer.layer.0.attention.q_lin.weight" not in names
    assert "classifier.weight" in names  # the head is trained in full
    share = sum(p.numel() for n, p in model.named_parameters() if n in names) / sum(
        p.numel() for p in model.parameters())
    assert share < 0.01  # a sliver of the model: the point of BitFit


def test_bitfit_is_a_registered_trained_method_of_the_smoke_preset():
    method = registry.method("bitfit")
    assert method.trained and method.uses_encoder and method.lr_field == "lora_lr"
    assert "bitfit" in preset_config("smoke").methods
    assert "bitfit" not in preset_config("cpu").methods
    names = [v.name for v in preset_config("smoke", data="x", seeds=[1, 2]).variants()]
    assert {"bitfit_lr2e-3_s1", "bitfit_lr2e-3_s2"} <= set(names)
    gpu = [v.method for v in preset_config("smoke", data="x").method_variants(encoder=True)]
    assert "bitfit" in gpu  # the DAG routes it to the GPU pool


@pytest.mark.slow
def test_bitfit_runs_through_the_cli_into_the_report(smoke_all):
    assert smoke_all.done.returncode == 0, smoke_all.done.stderr[-3000:]
    out = smoke_all.run_dir / "results" / "bitfit_lr2e-3_s42"
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok" and record["method"] == "bitfit"
    assert 0 < record["params_trainable"] < 0.05 * record["params_total"]
    assert record["validation_examples"] == 32 and record["test_examples"] == 32

    saved = load_file(out / "bitfit" / bitfit.WEIGHTS)
    assert set(saved) == set(bitfit.trainable_names(load_classifier("tiny-distilbert", seed=42)))
    base = load_classifier("tiny-distilbert", seed=42)  # the same frozen weights as in training
    changed = [n for n, t in saved.items() if not torch.equal(t, base.state_dict()[n])]
    assert changed  # training moved the biases and the head; the weights were never saved

    html = smoke_all.report.read_text()
    assert "BitFit" in html and ".m-bitfit" in html
