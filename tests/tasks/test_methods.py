"""The baseline methods on 400 train / 100 validation / 200 test real IMDB reviews: their
records, predictions and artifacts, run through tasks.variants.run_variant."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.methods.seed_heuristic import MODEL_SEED
from tasks.metrics import MetricsRecord
from tasks.paths import RunPaths
from tasks.registry import METHODS, Variant
from tasks.tokenize import load_split, tokenize_dataset
from tasks.variants import run_variant
from tests.tasks.conftest import write_run_data


def predictions(paths: RunPaths, variant: str) -> pd.DataFrame:
    return pd.read_parquet(paths.variant_dir(variant) / "predictions.parquet")


def _run(name: str, config, paths, **kwargs) -> MetricsRecord:
    record = MetricsRecord.read(run_variant(Variant(name), config, paths, **kwargs))
    assert record.problems == []
    return record


def test_every_registered_method_has_its_module():
    import importlib

    for m in METHODS.values():
        module = importlib.import_module(m.module)
        needs = (("make_trainable", "save") if m.trained else ("predict",)) + (
            ("merge", "bare") if m.mergeable else ())
        assert all(callable(getattr(module, f, None)) for f in needs), m.name


def test_majority_accuracy_is_the_test_share_of_the_training_majority(run, imdb_sample):
    config, paths = run
    record = _run("majority", config, paths)
    train, test = imdb_sample["train"]["label"], imdb_sample["test"]["label"]
    validation = imdb_sample["validation"]["label"]
    majority = int(train.mean() >= 0.5)
    assert record.status == "ok" and record.method == "majority" and record.variant == "majority"
    assert record.hyperparameters["majority_label"] == majority
    assert record.accuracy == pytest.approx((test == majority).mean())
    assert record.validation_accuracy == pytest.approx((validation == majority).mean())
    assert (record.test_examples, record.validation_examples) == (200, 100)
    assert record.params_trainable == 1 and record.inference_ms_per_example == 0.0
    n_major = int((test == majority).sum())
    expected = [[0, 200 - n_major], [0, n_major]] if majority else [[n_major, 0], [200 - n_major, 0]]
    assert record.confusion_matrix == expected
    preds = predictions(paths, "majority")
    assert (preds["pred"] == majority).all()
    assert preds["prob_positive"].to_numpy() == pytest.approx(np.full(200, train.mean()))


def test_majority_tie_predicts_positive(run, imdb_sample):
    config, paths = run
    balanced = pd.concat([imdb_sample["train"][imdb_sample["train"]["label"] == k].head(50)
                          for k in (0, 1)], ignore_index=True)
    write_run_data(paths, {"train": balanced})
    _run("majority", config, paths)
    preds = predictions(paths, "majority")
    assert (preds["pred"] == 1).all() and (preds["prob_positive"] == 0.5).all()


def test_tfidf_logreg_beats_70_percent_and_saves_a_usable_model(run, imdb_sample):
    from safetensors.numpy import load_file
    from sklearn.feature_extraction.text import TfidfVectorizer

    config, paths = run
    record = _run("tfidf_logreg", config, paths)
    assert record.status == "ok" and record.accuracy > 0.7 and record.validation_accuracy > 0.6
    hyper = record.hyperparameters
    assert record.params_total == record.params_trainable == hyper["vocabulary_size"] + 1
    assert hyper["C"] in hyper["C_grid"] and 0 < record.details["cv_accuracy"] <= 1
    assert record.train_seconds > 0 and record.samples_per_second > 0
    assert record.inference_ms_per_example > 0 and record.peak_memory_bytes is not None
    model_dir = paths.variant_dir("tfidf_logreg") / "model"
    assert record.artifact_bytes == sum(f.stat().st_size for f in model_dir.iterdir())
    # the saved vocabulary and weights reproduce the recorded probabilities
    weights = load_file(str(model_dir / "weights.safetensors"))
    vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
    assert len(vocabulary) == hyper["vocabulary_size"]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, vocabulary=vocabulary)
    vectorizer.idf_ = weights["idf"].astype(np.float64)
    logits = vectorizer.transform(imdb_sample["test"]["text"]) @ weights["coef"][0] + weights["intercept"][0]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), predictions(paths, "tfidf_logreg")["prob_positive"],
                               atol=1e-4)


def test_tfidf_same_input_reads_only_the_tokens_the_encoder_reads(run, imdb_sample):
    """A marker word in the middle of each long training review and another at its end:
    whole-review TF-IDF learns both, TF-IDF on the encoder's input (32 tokens here) never
    the middle one and the end one only with head_tail, and both record what they read."""
    config, paths = run
    train = imdb_sample["train"]

    def mark(text: str) -> str:
        middle = len(text) // 2
        return (text[:middle] + " zzqmarker " + text[middle:] if len(text) > 1000 else text
                ) + " zzqfinal"

    marked = train.assign(text=train["text"].map(mark))
    write_run_data(paths, {"train": marked})
    for truncation in ("head", "head_tail"):
        config = config.with_overrides(truncation=truncation)
        tokenize_dataset(config, paths)
        # forced: the second truncation reruns variants the first completed in this run
        whole, same = (_run("tfidf_logreg", config, paths, force=True),
                       _run("tfidf_same_input", config, paths, force=True))
        vocabularies = {v: json.loads((paths.variant_dir(v) / "model" / "vocabulary.json")
                                      .read_text()) for v in ("tfidf_logreg", "tfidf_same_input")}
        assert "zzqmarker" in vocabularies["tfidf_logreg"]
        assert "zzqmarker" not in vocabularies["tfidf_same_input"]
        assert ("zzqfinal" in vocabularies["tfidf_same_input"]) == (truncation == "head_tail")
        assert whole.input_budget["text"] == "the whole review"
        assert same.input_budget["max_tokens"] == 32 and same.input_budget["cut_share"] > 0.9
        assert same.input_budget["truncation"] == truncation and same.status == "ok"


def test_tfidf_logreg_never_sees_validation_or_test_when_fitting(run, imdb_sample):
    """Validation and test texts full of a word no training review has: the vocabulary is
    the training subset's alone."""
    config, paths = run
    marked = {s: imdb_sample[s].assign(text=imdb_sample[s]["text"] + " zzqmarker zzqmarker")
              for s in ("validation", "test")}
    write_run_data(paths, marked)
    _run("tfidf_logreg", config, paths)
    vocabulary = json.loads((paths.variant_dir("tfidf_logreg") / "model" /
                             "vocabulary.json").read_text())
    assert not [t for t in vocabulary if "zzqmarker" in t]


def test_seed_heuristic_scores_every_test_row_by_the_cls_sum(run):
    from tasks.models import load_classifier

    config, paths = run
    config = dataclasses.replace(config, precision="fp32")
    tokenize_dataset(config, paths)
    record = _run("seed_heuristic", config, paths, device="cpu")
    assert record.status == "ok" and record.method == "seed_heuristic"
    assert record.precision == record.hyperparameters["precision"] == "fp32"
    assert record.params_trainable == 0 and record.train_seconds is None
    assert "not a classifier" in record.notes.lower() and record.device == "cpu"
    preds = predictions(paths, "seed_heuristic")
    test = load_split(paths, "test")
    assert len(preds) == len(test) == record.test_examples == 200
    assert record.validation_examples == 100
    assert (preds["label"] == test["label"]).all()
    assert record.details["score_summary"]["positive_share"] == pytest.approx(preds["pred"].mean())
    # logit(prob) is the [CLS] sum of each review, unpadded, in the test file's order
    encoder = load_classifier(config.model, seed=MODEL_SEED).base_model.eval()
    for row in (0, 99, 199):
        ids = torch.as_tensor(np.asarray(test["input_ids"][row], dtype=np.int64))[None]
        with torch.no_grad():
            expected = encoder(input_ids=ids).last_hidden_state[0, 0].double().sum().item()
        prob = preds["prob_positive"][row]
        assert np.log(prob / (1 - prob)) == pytest.approx(expected, abs=1e-4)
    assert record.params_total == sum(p.numel() for p in encoder.parameters())


def test_seed_heuristic_runs_at_the_runs_precision_and_records_it(run):
    """The precision setting reaches the heuristic (it used to run and record fp32 whatever
    the setting): bf16 sums are the bf16 encoder's, and the record says bf16."""
    from tasks.models import load_classifier

    config, paths = run
    config = dataclasses.replace(config, precision="bf16")
    tokenize_dataset(config, paths)
    record = _run("seed_heuristic", config, paths, device="cpu")
    assert record.precision == record.hyperparameters["precision"] == "bf16"
    preds, test = predictions(paths, "seed_heuristic"), load_split(paths, "test")
    encoder = load_classifier(config.model, seed=MODEL_SEED).base_model.eval()
    logits = np.log(preds["prob_positive"] / (1 - preds["prob_positive"]))
    for row in (0, 99, 199):
        ids = torch.as_tensor(np.asarray(test["input_ids"][row], dtype=np.int64))[None]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = encoder(input_ids=ids).last_hidden_state[0, 0].double().sum().item()
        with torch.no_grad():
            fp32 = encoder(input_ids=ids).last_hidden_state[0, 0].double().sum().item()
        assert logits[row] == pytest.approx(bf16, rel=1e-6, abs=1e-12)
        assert abs(logits[row] - bf16) < abs(logits[row] - fp32)  # not the fp32 sum


def test_failed_baseline_writes_failed_record_and_reraises(run):
    config, paths = run  # not tokenized: the heuristic cannot find its token ids
    with pytest.raises(FileNotFoundError, match="tokenize"):
        run_variant(Variant("seed_heuristic"), config, paths, device="cpu")
    record = MetricsRecord.read(paths.variant_dir("seed_heuristic") / "metrics.json")
    assert record.status == "failed" and record.error.startswith("StepNotRun")  # a FileNotFoundError
    assert record.accuracy is None and record.finished_at
    assert not (paths.variant_dir("seed_heuristic") / "predictions.parquet").exists()


def test_unknown_method_is_a_value_error_naming_the_valid_ones(run):
    _, paths = run
    with pytest.raises(ValueError, match="'bert_zero_shot'.*majority, tfidf_logreg"):
        Variant("bert_zero_shot")
    assert not paths.results_dir.exists()
