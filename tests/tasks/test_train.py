"""The training loop and the training variants, on tiny-distilbert and real IMDB reviews."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lora_core.adapter import load_adapter
from lora_core.inject import inject_lora
from tasks.models import load_classifier
from tasks import train
from tasks.evaluate import predict_proba
from tasks.metrics import REQUIRED_FIELDS
from tasks.paths import read_json
from tasks.pipeline import prepare_run
from tasks.tokenize import load_split, tokenize_dataset
from tasks.train import fit, length_grouped_batches, train_variant, variant_name

LORA = {"method": "lora", "rank": 4, "targets": "qkvo", "seed": 3}


def _tokenized(config, paths, imdb_sample):
    """Write the run's data subset (what the download step writes) and tokenize it."""
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    imdb_sample["train"].head(config.train_size).to_parquet(paths.train_parquet)
    imdb_sample["test"].head(config.test_size).to_parquet(paths.test_parquet)
    tokenize_dataset(config, paths)
    return config, paths


@pytest.fixture
def tokenized_run(smoke_run, imdb_sample):
    """(config, paths) of a smoke run (64 train / 32 test, 32 tokens) ready to train."""
    return _tokenized(*smoke_run, imdb_sample)


@pytest.fixture
def frames(tokenized_run):
    _, paths = tokenized_run
    return load_split(paths, "train"), load_split(paths, "test")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- names and batches ----------------------------------------------------------------------

def test_variant_names_follow_the_pinned_formats():
    lora = {"method": "lora", "rank": 16, "targets": "qkvo", "seed": 42}
    assert variant_name(lora) == "lora_r16_qkvo_s42"
    pair = {**lora, "rank": 8, "targets": "q_lin, v_lin", "seed": 0}
    assert variant_name(pair) == "lora_r8_q_lin+v_lin_s0"
    assert variant_name({"method": "full_finetune", "seed": 7}) == "full_finetune_s7"
    assert variant_name({"method": "linear_probe", "seed": 42}) == "linear_probe_s42"


@pytest.mark.parametrize("spec, word", [
    ({"method": "adapter", "seed": 1}, "method"),
    ({"method": "lora", "rank": 0, "targets": "qkvo", "seed": 1}, "rank"),
    ({"method": "lora", "rank": 4, "targets": "", "seed": 1}, "targets"),
    ({"method": "full_finetune", "seed": -1}, "seed"),
])
def test_invalid_variant_spec_is_a_value_error_naming_the_field(spec, word):
    with pytest.raises(ValueError, match=word):
        variant_name(spec)


def test_length_grouped_batches_cover_every_row_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    batches = length_grouped_batches(lengths, 16, np.random.default_rng(1), chunk_batches=8)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(1 <= len(b) <= 16 for b in batches)

    def padded_tokens(bs):  # each batch is padded to its own longest row
        return sum(len(b) * lengths[b].max() for b in bs)

    random_batches = np.array_split(np.random.default_rng(1).permutation(1000), 63)
    assert padded_tokens(batches) < 0.7 * padded_tokens(random_batches)
    again = length_grouped_batches(lengths, 16, np.random.default_rng(1), chunk_batches=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # order comes from the seed


# --- what each method trains -----------------------------------------------------------------

def test_lora_training_changes_only_lora_factors_and_head(tokenized_run, frames):
    config, _ = tokenized_run
    model = load_classifier(config.model, seed=5)
    inject_lora(model, "qkvo", rank=4, alpha=16)
    before = _weights(model)
    fit(model, *frames, lr=config.lora_lr, config=config, seed=5, device="cpu")
    fresh = load_classifier(config.model, seed=5).state_dict()
    for name, value in model.named_parameters():
        changed = not torch.equal(value, before[name])
        trains = "lora_" in name or name.startswith(("pre_classifier.", "classifier."))
        assert changed == trains, name
        if not trains:  # a frozen base weight equals the same seed's fresh load
            assert torch.equal(value, fresh[name.replace(".base.", ".")]), name


def test_linear_probe_changes_only_the_head(tokenized_run):
    config, paths = tokenized_run
    metrics = read_json(train_variant({"method": "linear_probe", "seed": 5}, config, paths))
    head = load_file(paths.variant_dir("linear_probe_s5") / "checkpoint" / "head.safetensors")
    assert sorted(head) == ["classifier.bias", "classifier.weight", "pre_classifier.bias",
                            "pre_classifier.weight"]
    fresh = load_classifier(config.model, seed=5).state_dict()
    assert all(not torch.equal(t, fresh[n]) for n, t in head.items())
    assert metrics["params_trainable"] == sum(t.numel() for t in head.values())
    assert metrics["params_trainable"] < metrics["params_total"]


def test_full_finetune_changes_base_weights_and_saves_a_checkpoint(tokenized_run):
    config, paths = tokenized_run
    metrics = read_json(train_variant({"method": "full_finetune", "seed": 5}, config, paths))
    folder = paths.variant_dir("full_finetune_s5") / "checkpoint"
    saved = load_file(folder / "model.safetensors")
    fresh = load_classifier(config.model, seed=5).state_dict()
    name = "distilbert.transformer.layer.0.attention.q_lin.weight"
    assert not torch.equal(saved[name], fresh[name])
    assert metrics["params_trainable"] == metrics["params_total"]
    assert metrics["hyperparameters"]["lr"] == config.full_lr
    assert metrics["artifact_bytes"] == sum(f.stat().st_size for f in folder.iterdir())
    assert metrics["parameter_breakdown"]["total"] == metrics["params_total"]


# --- one LoRA variant end to end ---------------------------------------------------------------

@pytest.mark.slow
def test_lora_variant_writes_complete_record_predictions_and_adapter(tokenized_run):
    config, paths = tokenized_run
    metrics_path = train_variant(LORA, config, paths)
    out = paths.variant_dir("lora_r4_qkvo_s3")
    assert metrics_path == out / "metrics.json"
    m = read_json(metrics_path)
    assert m["status"] == "ok"
    assert [k for k in REQUIRED_FIELDS if m.get(k) is None] == []
    assert m["method"] == "lora" and m["rank"] == 4 and m["targets"] == "qkvo"
    assert len(m["lora_modules"]) == 8  # q, k, v, out in 2 layers
    assert len(m["eval_history"]) == config.epochs
    assert len(m["loss_history"]) == m["train_steps"] == 4 * config.epochs  # 64 rows, batch 16
    assert {"step", "epoch", "loss", "lr"} <= set(m["loss_history"][0])
    assert m["samples_per_second"] == pytest.approx(64 * config.epochs / m["train_seconds"])
    assert m["peak_memory_kind"] == "cpu_peak_rss_increase" and m["peak_memory_bytes"] >= 0
    assert set(m["latency_ms"]) == {"base", "unmerged", "merged"}
    assert all(v > 0 for v in m["latency_ms"].values())
    assert m["inference_ms_per_example"] == m["latency_ms"]["merged"]
    assert m["params_trainable"] == m["parameter_breakdown"]["trainable"] < m["params_total"]
    assert m["parameter_breakdown"]["lora_params"] == 8 * 4 * (64 + 64)
    assert m["accuracy"] == pytest.approx(m["eval_history"][-1]["accuracy"])

    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == 32 and preds["row"].tolist() == list(range(32))
    assert preds["label"].tolist() == pd.read_parquet(paths.test_parquet)["label"].tolist()
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    assert m["artifact_bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    assert not (out / "checkpoints").exists()  # removed once the final artifacts exist

    # the saved adapter on a fresh base reproduces the recorded predictions
    model = load_adapter(load_classifier(config.model, seed=3), out / "adapter")
    prob = predict_proba(model, load_split(paths, "test"), 8, "cpu")
    np.testing.assert_allclose(prob, preds["prob_positive"].to_numpy(), atol=1e-5)


def test_invalid_target_writes_a_failed_record_and_reraises(tokenized_run):
    config, paths = tokenized_run
    spec = {"method": "lora", "rank": 4, "targets": "no_such_proj", "seed": 1}
    with pytest.raises(ValueError, match="no_such_proj"):
        train_variant(spec, config, paths)
    m = read_json(paths.variant_dir("lora_r4_no_such_proj_s1") / "metrics.json")
    assert m["status"] == "failed"
    assert "no_such_proj" in m["error"] and m["finished_at"] and "Traceback" in m["traceback"]


# --- resume --------------------------------------------------------------------------------

class _Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_restart_after_a_stop_resumes_and_matches_an_uninterrupted_run(smoke_config, artifacts,
                                                                      imdb_sample, monkeypatch):
    config = dataclasses.replace(smoke_config, epochs=2, lora_dropout=0.1)  # dropout: RNG matters
    reports = artifacts.parent / "reports"
    _, whole = _tokenized(config, prepare_run(config, "whole", artifacts, reports), imdb_sample)
    _, broken = _tokenized(config, prepare_run(config, "broken", artifacts, reports), imdb_sample)
    name = variant_name(LORA)
    train_variant(LORA, config, whole)

    save = train.save_checkpoint

    def save_then_crash(folder, *args):
        target = save(folder, *args)
        raise _Crash(f"stopped after {target.name}")

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        train_variant(LORA, config, broken)
    assert read_json(broken.variant_dir(name) / "metrics.json")["status"] == "failed"
    assert [p.name for p in (broken.variant_dir(name) / "checkpoints").iterdir()] == ["epoch-001"]
    monkeypatch.setattr(train, "save_checkpoint", save)
    train_variant(LORA, config, broken)

    a, b = (read_json(p.variant_dir(name) / "metrics.json") for p in (whole, broken))
    assert b["status"] == "ok" and b["resumed_from_epoch"] == 1 and a["resumed_from_epoch"] == 0
    for key in ("accuracy", "f1", "eval_history", "loss_history", "confusion_matrix",
                "train_steps"):
        assert a[key] == b[key], key
    pa, pb = (pd.read_parquet(p.variant_dir(name) / "predictions.parquet") for p in (whole, broken))
    pd.testing.assert_frame_equal(pa, pb)
    wa, wb = (load_file(p.variant_dir(name) / "adapter" / "adapter_model.safetensors")
              for p in (whole, broken))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_of_a_different_training_is_ignored(tokenized_run, frames, tmp_path):
    config, _ = tokenized_run
    ck = tmp_path / "ck"
    model = load_classifier(config.model, seed=1)
    inject_lora(model, "qv", rank=2)
    fit(model, *frames, lr=1e-3, config=config, seed=1, device="cpu", checkpoint_dir=ck)
    assert (tmp_path / "ck" / "epoch-001" / "optimizer.safetensors").exists()
    again = load_classifier(config.model, seed=1)
    inject_lora(again, "qv", rank=2)
    same = fit(again, *frames, lr=1e-3, config=config, seed=1, device="cpu", checkpoint_dir=ck)
    assert same.resumed_from_epoch == 1 and same.steps == 4
    other = load_classifier(config.model, seed=1)
    inject_lora(other, "qv", rank=2)
    result = fit(other, *frames, lr=2e-3, config=config, seed=1, device="cpu", checkpoint_dir=ck)
    assert result.resumed_from_epoch == 0 and result.loss_history[0]["lr"] == 2e-3


# --- it learns -------------------------------------------------------------------------------

def _learnable(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Random word ids; the label says which of two marker words the text contains."""
    rows, labels = [], rng.integers(0, 2, size=n)
    for label in labels:
        words = rng.integers(2000, 2100, size=int(rng.integers(6, 20))).tolist()
        words.insert(int(rng.integers(0, len(words))), 2204 if label else 2919)  # "great" / "bad"
        rows.append([101, *words, 102])
    return pd.DataFrame({"input_ids": rows, "length": [len(r) for r in rows], "label": labels})


@pytest.mark.slow
def test_loss_decreases_and_held_out_accuracy_rises_on_a_learnable_task(smoke_config):
    rng = np.random.default_rng(0)
    train_df, test_df = _learnable(128, rng), _learnable(64, rng)
    config = dataclasses.replace(smoke_config, epochs=6, batch_size=16)
    model = load_classifier(config.model, seed=0)
    result = fit(model, train_df, test_df, lr=2e-3, config=config, seed=0, device="cpu")
    losses = [s["loss"] for s in result.loss_history]
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])
    assert result.eval_history[0]["accuracy"] < 0.9 <= result.eval_history[-1]["accuracy"]
    assert result.eval_history[-1]["loss"] < result.eval_history[0]["loss"]
