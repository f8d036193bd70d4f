"""The training loop and the trained methods, on tiny-distilbert and real IMDB reviews:
what each method trains, the protocol (validation per epoch, test scored once), epoch
checkpoints (resume, damaged ones set aside) and that it learns."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lora_core.adapter import load_adapter
from lora_core.inject import inject_lora
from tasks import train
from tasks.evaluate import autocast_dtype, precision_label, predict_proba
from tasks.metrics import MetricsRecord
from tasks.models import load_classifier, load_tokenizer
from tasks.paths import read_json
from tasks.pipeline import prepare_run
from tasks.registry import Variant
from tasks.tokenize import load_split, tokenize_dataset
from tasks.train import fit, length_grouped_batches
from tasks.variants import run_variant

LORA = Variant("lora", rank=4, targets="qkvo", lr=2e-3, seed=3)


def _tokenized(config, paths, imdb_sample):
    """Write the run's data subsets (what the download step writes) and tokenize them."""
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", config.train_size), ("validation", config.val_size),
                        ("test", config.test_size)):
        imdb_sample[split].head(size).to_parquet(paths.split_parquet(split))
    tokenize_dataset(config, paths)
    return config, paths


@pytest.fixture
def tokenized_run(smoke_run, imdb_sample):
    """(config, paths) of a smoke run (64 train / 32 validation / 32 test, 32 tokens) ready
    to train."""
    return _tokenized(*smoke_run, imdb_sample)


@pytest.fixture
def frames(tokenized_run):
    _, paths = tokenized_run
    return load_split(paths, "train"), load_split(paths, "validation")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _record(paths, variant: Variant) -> MetricsRecord:
    record = MetricsRecord.read(paths.variant_dir(variant.name) / "metrics.json")
    assert record.problems == []
    return record


# --- batches --------------------------------------------------------------------------------

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
    fit(model, *frames, lr=config.lora_lr[0], config=config, seed=5, device="cpu")
    fresh = load_classifier(config.model, seed=5).state_dict()
    for name, value in model.named_parameters():
        changed = not torch.equal(value, before[name])
        trains = "lora_" in name or name.startswith(("pre_classifier.", "classifier."))
        assert changed == trains, name
        if not trains:  # a frozen base weight equals the same seed's fresh load
            assert torch.equal(value, fresh[name.replace(".base.", ".")]), name


def test_fit_refuses_a_model_with_nothing_to_train(tokenized_run, frames):
    config, _ = tokenized_run
    model = load_classifier(config.model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, *frames, lr=1e-3, config=config, seed=0, device="cpu")


def test_full_finetune_changes_base_weights_and_saves_a_checkpoint(tokenized_run):
    config, paths = tokenized_run
    variant = Variant("full_finetune", lr=config.full_lr[0], seed=5)
    run_variant(variant, config, paths, device="cpu")
    m = _record(paths, variant)
    folder = paths.variant_dir("full_finetune_lr5e-4_s5") / "checkpoint"
    saved = load_file(folder / "model.safetensors")
    fresh = load_classifier(config.model, seed=5).state_dict()
    name = "distilbert.transformer.layer.0.attention.q_lin.weight"
    assert not torch.equal(saved[name], fresh[name])
    assert m.status == "ok" and m.params_trainable == m.params_total
    assert m.hyperparameters["lr"] == config.full_lr[0] == m.lr
    assert m.artifact_bytes == sum(f.stat().st_size for f in folder.iterdir())
    assert m.parameter_breakdown["total"] == m.params_total
    assert m.latency_ms is None and m.inference_ms_per_example > 0  # nothing to merge


# --- one LoRA variant end to end ---------------------------------------------------------------

@pytest.mark.slow
def test_lora_variant_writes_complete_record_predictions_and_adapter(tokenized_run):
    config, paths = tokenized_run
    # fp32: the reloaded adapter below must reproduce the predictions to 1e-5 (under bf16
    # autocast, merged and unmerged products round differently)
    config = dataclasses.replace(config, precision="fp32")
    metrics_path = run_variant(LORA, config, paths, device="cpu")
    out = paths.variant_dir("lora_r4_qkvo_lr2e-3_s3")
    assert metrics_path == out / "metrics.json"
    m = _record(paths, LORA)
    assert m.status == "ok" and m.finished_at and m.device == "cpu"
    assert (m.method, m.rank, m.targets, m.lr, m.seed) == ("lora", 4, "qkvo", 2e-3, 3)
    assert m.hyperparameters["lr"] == 2e-3 and m.hyperparameters["rank"] == 4
    assert m.precision == "fp32" and m.resumed_from_epoch == 0
    assert m.latency_protocol["precision"] == "fp32"
    assert len(m.details["lora_modules"]) == 8  # q, k, v, out in 2 layers
    assert len(m.eval_history) == config.epochs
    assert len(m.loss_history) == m.train_steps == 4 * config.epochs  # 64 rows, batch 16
    assert {"step", "epoch", "loss", "lr"} <= set(m.loss_history[0])
    assert m.samples_per_second == pytest.approx(64 * config.epochs / m.train_seconds)
    assert m.peak_memory_kind == "cpu_peak_rss_increase" and m.peak_memory_bytes >= 0
    assert set(m.latency_ms) == {"base", "unmerged", "merged"}
    assert all(v > 0 for v in m.latency_ms.values())
    assert m.inference_ms_per_example == m.latency_ms["merged"]
    assert m.params_trainable == m.parameter_breakdown["trainable"] < m.params_total
    assert m.parameter_breakdown["lora_params"] == 8 * 4 * (64 + 64)
    # the epochs are scored on validation; the final model is the last epoch's
    assert m.validation_accuracy == pytest.approx(m.eval_history[-1]["accuracy"])
    assert (m.validation_examples, m.test_examples) == (32, 32)

    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == 32 and preds["row"].tolist() == list(range(32))
    assert preds["label"].tolist() == pd.read_parquet(paths.test_parquet)["label"].tolist()
    assert m.accuracy == pytest.approx((preds["pred"] == preds["label"]).mean())
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    assert m.artifact_bytes == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    assert not (out / "checkpoints").exists()  # removed once the final artifacts exist

    # the saved adapter on a fresh base reproduces the recorded predictions
    model = load_adapter(load_classifier(config.model, seed=3), out / "adapter")
    prob = predict_proba(model, load_split(paths, "test"), 8, "cpu")
    np.testing.assert_allclose(prob, preds["prob_positive"].to_numpy(), atol=1e-5)


def test_epochs_are_scored_on_validation_and_test_only_once(smoke_config, artifacts, imdb_sample,
                                                           monkeypatch):
    """Per-epoch evaluation and every choice use validation; the test subset is scored once,
    for the final model. Validation (16 rows) and test (24 rows) differ in size so each call
    can be told apart."""
    config = dataclasses.replace(smoke_config, epochs=2, val_size=16, test_size=24)
    _, paths = _tokenized(config, prepare_run(config, "protocol", artifacts), imdb_sample)
    seen: list[int] = []
    original = train.predict_logits

    def spy(model, frame, *args, **kwargs):
        seen.append(len(frame))
        return original(model, frame, *args, **kwargs)

    monkeypatch.setattr(train, "predict_logits", spy)
    variant = Variant("full_finetune", lr=5e-4, seed=1)
    run_variant(variant, config, paths, device="cpu")
    assert seen == [16, 16, 24]  # validation after each epoch, then test once
    m = _record(paths, variant)
    assert [e["epoch"] for e in m.eval_history] == [1, 2]
    assert m.precision == precision_label(autocast_dtype("auto", "cpu"))  # the setting, applied
    assert (m.validation_examples, m.test_examples) == (16, 24)


def test_invalid_target_writes_a_failed_record_and_reraises(tokenized_run):
    config, paths = tokenized_run
    variant = Variant("lora", rank=4, targets="no_such_proj", lr=1e-3, seed=1)
    with pytest.raises(ValueError, match="no_such_proj"):
        run_variant(variant, config, paths, device="cpu")
    m = read_json(paths.variant_dir("lora_r4_no_such_proj_lr1e-3_s1") / "metrics.json")
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
    name = LORA.name
    run_variant(LORA, config, whole, device="cpu")

    save = train.save_checkpoint

    def save_then_crash(folder, *args):
        target = save(folder, *args)
        raise _Crash(f"stopped after {target.name}")

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        run_variant(LORA, config, broken, device="cpu")
    assert read_json(broken.variant_dir(name) / "metrics.json")["status"] == "failed"
    assert [p.name for p in (broken.variant_dir(name) / "checkpoints").iterdir()] == ["epoch-001"]
    monkeypatch.setattr(train, "save_checkpoint", save)
    run_variant(LORA, config, broken, device="cpu")

    a, b = (read_json(p.variant_dir(name) / "metrics.json") for p in (whole, broken))
    assert b["status"] == "ok" and b["resumed_from_epoch"] == 1 and a["resumed_from_epoch"] == 0
    for key in ("accuracy", "f1", "validation_accuracy", "eval_history", "loss_history",
                "confusion_matrix", "train_steps"):
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


# --- damaged checkpoints ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fit_frames(imdb_sample) -> tuple[pd.DataFrame, pd.DataFrame]:
    """64 training and 32 validation reviews, tokenized to 32 tokens (what load_split gives)."""
    tokenizer = load_tokenizer("tiny-distilbert")
    out = []
    for split, n in (("train", 64), ("validation", 32)):
        texts = imdb_sample[split].head(n)
        ids = tokenizer(texts["text"].tolist(), truncation=True, max_length=32)["input_ids"]
        out.append(pd.DataFrame({"input_ids": ids, "length": [len(x) for x in ids],
                                 "label": texts["label"].to_numpy(np.int64)}))
    return out[0], out[1]


def _lora_fit(config, frames, checkpoint_dir):
    model = load_classifier(config.model, seed=1)
    inject_lora(model, "qv", rank=2)
    return fit(model, *frames, lr=1e-3, config=config, seed=1, device="cpu",
               checkpoint_dir=checkpoint_dir)


@pytest.fixture(scope="module")
def first_fit(tmp_path_factory, fit_frames, imdb_dir):
    """One uninterrupted training that leaves its epoch-1 checkpoint behind."""
    from tasks.config import preset_config

    config = preset_config("smoke", data=str(imdb_dir), max_length=32)
    folder = tmp_path_factory.mktemp("first-fit") / "ck"
    return config, folder, _lora_fit(config, fit_frames, folder)


def _garble(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file, damage", [
    ("state.json", "empty"), ("state.json", "garbled"), ("state.json", "missing"),
    ("trainable.safetensors", "empty"), ("trainable.safetensors", "garbled"),
    ("optimizer.safetensors", "empty"), ("optimizer.safetensors", "missing"),
])
def test_a_damaged_checkpoint_is_set_aside_and_training_starts_over(first_fit, fit_frames,
                                                                    tmp_path, caplog, file,
                                                                    damage):
    config, folder, first = first_fit
    ck = tmp_path / "ck"
    shutil.copytree(folder, ck)
    target = ck / "epoch-001" / file
    if damage == "empty":
        target.write_bytes(b"")
    elif damage == "garbled":
        _garble(target)
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING, logger="tasks.checkpoint"):
        result = _lora_fit(config, fit_frames, ck)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "tasks.checkpoint" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and file in warnings[0] and "training starts over" in warnings[0]
    assert result.resumed_from_epoch == 0 and result.steps == first.steps == 4
    assert result.loss_history == first.loss_history  # trained from scratch, all of it
    assert result.eval_history == first.eval_history
    assert sorted(p.name for p in ck.iterdir()) == [".damaged-epoch-001", "epoch-001"]
    assert read_json(ck / "epoch-001" / "state.json")["state"]["epoch"] == 1


def test_an_intact_checkpoint_is_resumed_without_warnings(first_fit, fit_frames, tmp_path, caplog):
    config, folder, _ = first_fit
    shutil.copytree(folder, tmp_path / "ck")
    with caplog.at_level(logging.WARNING, logger="tasks.checkpoint"):
        result = _lora_fit(config, fit_frames, tmp_path / "ck")
    assert result.resumed_from_epoch == 1
    assert [r for r in caplog.records if r.name == "tasks.checkpoint"] == []


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
    train_df, val_df = _learnable(128, rng), _learnable(64, rng)
    config = dataclasses.replace(smoke_config, epochs=6, batch_size=16)
    model = load_classifier(config.model, seed=0)
    result = fit(model, train_df, val_df, lr=2e-3, config=config, seed=0, device="cpu")
    losses = [s["loss"] for s in result.loss_history]
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])
    assert result.eval_history[0]["accuracy"] < 0.9 <= result.eval_history[-1]["accuracy"]
    assert result.eval_history[-1]["loss"] < result.eval_history[0]["loss"]


@pytest.mark.parametrize("warmup, total", [(0, 7), (3, 10), (10, 10), (1, 1)])
def test_the_schedule_is_transformers_linear_warmup_step_for_step(warmup, total):
    from transformers import get_linear_schedule_with_warmup

    def lrs(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler, seen = make(optimizer, warmup, total), []
        for _ in range(total + 2):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen, scheduler.state_dict()

    ours, our_state = lrs(train.linear_schedule_with_warmup)
    theirs, their_state = lrs(get_linear_schedule_with_warmup)
    assert ours == pytest.approx(theirs, abs=0) and ours[-1] == 0.0
    # a checkpoint's scheduler state from either loads into the other
    scheduler = train.linear_schedule_with_warmup(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5), warmup, total)
    scheduler.load_state_dict(their_state)
    assert scheduler.get_last_lr() == their_state["_last_lr"]
