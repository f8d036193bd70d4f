"""Adapters in PEFT's format: file layout and size, PEFT interoperability both ways,
merged export. peft is a test-only dependency; lora_core never imports it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from lora_core.adapter import load_adapter, save_adapter, save_merged
from lora_core.inject import inject_lora, lora_layers
from tasks.models import load_classifier

TARGETS = {  # what PEFT users would write for the same q/k/v/o choice
    "tiny-distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "embedded-minilm": ["query", "key", "value", "attention.output.dense"],
}
HEADS = {"tiny-distilbert": ["pre_classifier", "classifier"], "embedded-minilm": ["classifier"]}


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 8000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def perturb_trainable(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training: move every trainable tensor (B = 0 would make LoRA trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch()).logits


@pytest.fixture(scope="module")
def base_logits() -> dict[str, torch.Tensor]:
    return {source: logits(load_classifier(source)) for source in TARGETS}


def our_trained_model(source: str) -> torch.nn.Module:
    model = load_classifier(source)
    inject_lora(model, "qkvo", rank=4, alpha=8)
    perturb_trainable(model, seed=1)
    return model


def test_adapter_uses_peft_key_names_and_config(tmp_path):
    model = our_trained_model("tiny-distilbert")
    folder = save_adapter(model, tmp_path / "adapter", base_model="tiny-distilbert")
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.distilbert.transformer.layer.0.attention.q_lin.lora_A.weight" in keys
    assert "base_model.model.distilbert.transformer.layer.1.attention.out_lin.lora_B.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.pre_classifier.bias"} <= keys
    assert len(keys) == 2 * 4 * 2 + 4
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA", "SEQ_CLS", 4, 8.0)
    assert config["modules_to_save"] == ["pre_classifier", "classifier"]
    assert config["target_modules"] == list(lora_layers(model))
    assert config["base_model_name_or_path"] == "tiny-distilbert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left


def test_adapter_file_is_four_bytes_per_lora_and_head_parameter(tmp_path):
    model = our_trained_model("tiny-distilbert")
    folder = save_adapter(model, tmp_path / "adapter", base_model="tiny-distilbert")
    lora = 2 * 4 * 4 * (64 + 64)  # layers × targets × r·(d + k)
    head = (64 * 64 + 64) + (64 * 2 + 2)
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert 4 * (lora + head) < size < 4 * (lora + head) + 8_192  # + safetensors JSON header


def test_load_adapter_round_trips_into_a_fresh_model(tmp_path):
    model = our_trained_model("tiny-distilbert")
    expected = logits(model)
    save_adapter(model, tmp_path / "a", base_model="tiny-distilbert")
    fresh = load_adapter(load_classifier("tiny-distilbert"), tmp_path / "a")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-6, rtol=0)
    assert sorted(lora_layers(fresh)) == sorted(lora_layers(model))
    assert fresh.lora_spec["modules_to_save"] == ["pre_classifier", "classifier"]


def test_load_adapter_into_merged_model_unmerges_first(tmp_path):
    model = our_trained_model("tiny-distilbert")
    expected = logits(model)
    save_adapter(model, tmp_path / "a", base_model="tiny-distilbert")
    other = load_classifier("tiny-distilbert")
    inject_lora(other, "qkvo", rank=4, alpha=8)
    perturb_trainable(other, seed=7)
    for layer in lora_layers(other).values():
        layer.merge()
    load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(logits(other), expected, atol=1e-5, rtol=0)


def test_load_adapter_rejects_mismatched_modules_and_unsupported_configs(tmp_path):
    model = our_trained_model("tiny-distilbert")
    save_adapter(model, tmp_path / "a", base_model="tiny-distilbert")
    qv_only = load_classifier("tiny-distilbert")
    inject_lora(qv_only, "qv", rank=4, alpha=8)
    with pytest.raises(ValueError, match="only in adapter"):
        load_adapter(qv_only, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(load_classifier("tiny-distilbert"), tmp_path / "a")
    with pytest.raises(ValueError, match="adapter_config.json missing"):
        load_adapter(load_classifier("tiny-distilbert"), tmp_path)


def test_save_merged_exports_a_plain_model_with_the_same_logits(tmp_path):
    model = our_trained_model("tiny-distilbert")
    expected = logits(model)
    folder = save_merged(model, None, tmp_path / "merged")
    assert not any(".lora_" in k or ".base." in k for k in load_file(folder / "model.safetensors"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    assert not any(layer.merged for layer in lora_layers(model).values())  # caller's copy intact


def test_lora_core_does_not_import_peft():
    code = ("import sys, lora_core.adapter, lora_core.accounting, lora_core.inject; "
            "print('peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("source", list(TARGETS))
def test_peft_loads_our_adapter_with_the_same_logits(source, tmp_path, base_logits):
    from peft import PeftModel

    model = our_trained_model(source)
    ours = logits(model)
    assert not torch.allclose(ours, base_logits[source], atol=1e-3)  # the adapter matters
    save_adapter(model, tmp_path / "adapter", base_model=source)
    peft_model = PeftModel.from_pretrained(load_classifier(source), tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("source", list(TARGETS))
def test_we_load_a_peft_saved_adapter_with_the_same_logits(source, tmp_path, base_logits):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS[source],
                        modules_to_save=HEADS[source])
    peft_model = get_peft_model(load_classifier(source), config)
    perturb_trainable(peft_model, seed=2)
    theirs = logits(peft_model)
    assert not torch.allclose(theirs, base_logits[source], atol=1e-3)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_classifier(source), tmp_path / "peft")
    torch.testing.assert_close(logits(ours), theirs, atol=1e-5, rtol=0)
    assert len(lora_layers(ours)) == 4 * ours.config.num_hidden_layers


@pytest.mark.slow
def test_peft_applies_our_rslora_all_linear_settings(tmp_path, base_logits):
    from peft import PeftModel

    model = load_classifier("tiny-distilbert")
    inject_lora(model, "all-linear", rank=3, alpha=5, dropout=0.1, use_rslora=True)
    perturb_trainable(model, seed=3)
    ours = logits(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny-distilbert")
    peft_model = PeftModel.from_pretrained(load_classifier("tiny-distilbert"), tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=0)
