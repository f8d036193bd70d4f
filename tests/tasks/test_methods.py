"""Baselines on 400 train / 200 test real IMDB reviews: their records, predictions and
artifacts, the failure path and the linear-probe delegation."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.baselines import BASELINE_NAMES, run_baseline, strip_breaks
from tasks.metrics import REQUIRED_FIELDS
from tasks.paths import RunPaths, read_json
from tasks.tokenize import load_split, tokenize_dataset
from tests.tasks.conftest import write_run_data


def predictions(paths: RunPaths, variant: str) -> pd.DataFrame:
    return pd.read_parquet(paths.variant_dir(variant) / "predictions.parquet")


def test_majority_accuracy_is_the_test_share_of_the_training_majority(run, imdb_sample):
    config, paths = run
    record = read_json(run_baseline("majority", config, paths))
    train, test = imdb_sample["train"]["label"], imdb_sample["test"]["label"]
    majority = int(train.mean() >= 0.5)
    assert set(REQUIRED_FIELDS) <= set(record) and record["status"] == "ok"
    assert record["method"] == "baseline" and record["hyperparameters"]["majority_label"] == majority
    assert record["accuracy"] == pytest.approx((test == majority).mean())
    n_major = int((test == majority).sum())
    expected = [[0, 200 - n_major], [0, n_major]] if majority else [[n_major, 0], [200 - n_major, 0]]
    assert record["confusion_matrix"] == expected
    preds = predictions(paths, "majority")
    assert (preds["pred"] == majority).all()
    assert preds["prob_positive"].to_numpy() == pytest.approx(np.full(200, train.mean()))


def test_majority_tie_predicts_positive(run, imdb_sample):
    config, paths = run
    balanced = pd.concat([imdb_sample["train"][imdb_sample["train"]["label"] == k].head(50)
                          for k in (0, 1)], ignore_index=True)
    write_run_data(paths, {"train": balanced, "test": imdb_sample["test"]})
    run_baseline("majority", config, paths)
    preds = predictions(paths, "majority")
    assert (preds["pred"] == 1).all() and (preds["prob_positive"] == 0.5).all()


def test_tfidf_logreg_beats_70_percent_and_saves_a_usable_model(run, imdb_sample):
    from safetensors.numpy import load_file
    from sklearn.feature_extraction.text import TfidfVectorizer

    config, paths = run
    record = read_json(run_baseline("tfidf_logreg", config, paths))
    assert record["status"] == "ok" and record["accuracy"] > 0.7
    hyper = record["hyperparameters"]
    assert record["params_total"] == record["params_trainable"] == hyper["vocabulary_size"] + 1
    assert hyper["C"] in hyper["C_grid"]
    assert record["train_seconds"] > 0 and record["samples_per_second"] > 0
    assert record["inference_ms_per_example"] > 0 and record["peak_memory_bytes"] is not None
    model_dir = paths.variant_dir("tfidf_logreg") / "model"
    assert record["artifact_bytes"] == sum(f.stat().st_size for f in model_dir.iterdir())
    # the saved vocabulary and weights reproduce the recorded probabilities
    weights = load_file(str(model_dir / "weights.safetensors"))
    vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
    assert len(vocabulary) == hyper["vocabulary_size"]
    vectorizer = TfidfVectorizer(preprocessor=strip_breaks, ngram_range=(1, 2), sublinear_tf=True,
                                 vocabulary=vocabulary)
    vectorizer.idf_ = weights["idf"].astype(np.float64)
    logits = vectorizer.transform(imdb_sample["test"]["text"]) @ weights["coef"][0] + weights["intercept"][0]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), predictions(paths, "tfidf_logreg")["prob_positive"],
                               atol=1e-4)


def test_seed_heuristic_scores_every_test_row_by_the_cls_sum(run):
    from tasks.models import load_classifier

    config, paths = run
    tokenize_dataset(config, paths)
    record = read_json(run_baseline("seed_heuristic", config, paths, device="cpu"))
    assert set(REQUIRED_FIELDS) <= set(record) and record["status"] == "ok"
    assert record["params_trainable"] == 0 and record["train_seconds"] is None
    assert "not a classifier" in record["notes"] and record["device"] == "cpu"
    preds = predictions(paths, "seed_heuristic")
    test = load_split(paths, "test")
    assert len(preds) == len(test) == record["test_examples"] == 200
    assert (preds["label"] == test["label"]).all()
    assert record["score_summary"]["positive_share"] == pytest.approx(preds["pred"].mean())
    # logit(prob) is the [CLS] sum of each review, unpadded, in the test file's order
    encoder = load_classifier(config.model, seed=config.seeds[0]).base_model.eval()
    for row in (0, 99, 199):
        ids = torch.as_tensor(np.asarray(test["input_ids"][row], dtype=np.int64))[None]
        with torch.no_grad():
            expected = encoder(input_ids=ids).last_hidden_state[0, 0].double().sum().item()
        prob = preds["prob_positive"][row]
        assert np.log(prob / (1 - prob)) == pytest.approx(expected, abs=1e-4)
    assert record["params_total"] == sum(p.numel() for p in encoder.parameters())


def test_failed_baseline_writes_failed_record_and_reraises(run):
    config, paths = run  # not tokenized: the heuristic cannot find its token ids
    with pytest.raises(FileNotFoundError, match="tokenize"):
        run_baseline("seed_heuristic", config, paths)
    record = read_json(paths.variant_dir("seed_heuristic") / "metrics.json")
    assert record["status"] == "failed" and record["error"].startswith("FileNotFoundError")
    assert set(REQUIRED_FIELDS) <= set(record) and record["accuracy"] is None
    assert not (paths.variant_dir("seed_heuristic") / "predictions.parquet").exists()


def test_unknown_baseline_is_a_value_error_naming_the_valid_ones(run):
    config, paths = run
    with pytest.raises(ValueError, match="'bert_zero_shot'.*majority, tfidf_logreg"):
        run_baseline("bert_zero_shot", config, paths)
    assert not paths.results_dir.exists()


def test_linear_probe_delegates_to_train_variant(run, monkeypatch, tmp_path):
    config, paths = run
    calls = []
    fake = types.ModuleType("tasks.train")
    fake.train_variant = lambda spec, cfg, p, **kw: calls.append((spec, cfg, p, kw)) or tmp_path
    monkeypatch.setitem(sys.modules, "tasks.train", fake)
    assert run_baseline("linear_probe", config, paths) == tmp_path
    assert calls == [({"method": "linear_probe", "seed": config.seeds[0]}, config, paths, {})]
    run_baseline("linear_probe", config, paths, device="cuda:1")
    assert calls[-1][3] == {"device": "cuda:1"}
    assert set(BASELINE_NAMES) == {"majority", "tfidf_logreg", "seed_heuristic", "linear_probe"}
