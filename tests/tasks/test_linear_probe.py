"""Linear probe: pooling and C chosen by cross-validation on train only, neither moved by
validation or test; its record names the choice; a real MiniLM subset learnt."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import tasks.models as models
from tasks.features import token_frame
from tasks.methods.linear_probe import fit_probe, fit_probe_poolings, linear_probe
from tasks.metrics import MetricsRecord
from tasks.models import load_tokenizer
from tasks.registry import Variant
from tasks.tokenize import tokenize_dataset
from tasks.variants import run_variant

GRID = (1e-3, 0.1)  # two candidates keep the pooling tests' searches cheap


def toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two noisy Gaussian classes in 8 dimensions."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return rng.normal(size=(n, 8)) + 0.8 * y[:, None], y


def test_probe_learns_and_reports_its_choice():
    x, y = toy(200, 0)
    val_x, val_y = toy(100, 1)
    result = fit_probe(x, y, val_x, val_x, folds=4)
    assert ((result.prob_validation >= 0.5) == val_y).mean() > 0.8
    assert result.C in result.cv_accuracy_by_C
    assert result.cv_accuracy == max(result.cv_accuracy_by_C.values())
    assert result.params == 8 + 1 and result.fit_seconds > 0


def test_a_poisoned_test_set_changes_no_choice():
    x, y = toy(200, 0)
    val_x, _ = toy(100, 1)
    clean = fit_probe(x, y, val_x, toy(50, 2)[0], folds=4)
    poison = fit_probe(x, y, val_x, np.full((50, 8), 1e6), folds=4)  # absurd test features
    assert (poison.C, poison.cv_accuracy) == (clean.C, clean.cv_accuracy)
    np.testing.assert_array_equal(poison.prob_validation, clean.prob_validation)


def test_probe_rejects_too_few_examples_of_a_label():
    x, y = toy(20, 0)
    y[:] = 0
    y[:2] = 1
    with pytest.raises(ValueError, match=r"counts \[18, 2\]"):
        fit_probe(x, y, x, x, folds=5)


def test_the_pooling_with_the_higher_cv_score_is_chosen():
    x, y = toy(200, 0)
    noise = np.random.default_rng(3).normal(size=x.shape)  # carries no label
    val_x, test_x = toy(60, 1)[0], toy(60, 2)[0]
    for good, bad in (("mean", "cls"), ("cls", "mean")):
        result = fit_probe_poolings({"mean": x if good == "mean" else noise,
                                     "cls": x if good == "cls" else noise}, y,
                                    {"mean": val_x, "cls": val_x}, {"mean": test_x, "cls": test_x},
                                    folds=4, c_grid=GRID)
        scores = result.cv_accuracy_by_pooling
        assert result.pooling == good and scores[good] > 0.8 > 0.65 > scores[bad]
        assert result.cv_accuracy == scores[good]
        # the chosen pooling's model is the one that scores validation
        alone = fit_probe(x, y, val_x, test_x, folds=4, c_grid=GRID)
        np.testing.assert_allclose(result.prob_validation, alone.prob_validation)


def test_equal_cv_scores_keep_the_first_pooling():
    x, y = toy(200, 0)
    for order in (("mean", "cls"), ("cls", "mean")):
        same = dict.fromkeys(order, x)
        assert fit_probe_poolings(same, y, same, same, folds=4, c_grid=GRID).pooling == order[0]


@pytest.fixture(scope="module")
def tiny_frames(imdb_sample) -> list[pd.DataFrame]:
    """Train, validation and test token frames of the real sample, 32 tokens each."""
    tokenizer = load_tokenizer("tiny-distilbert")
    return [token_frame(tokenizer, imdb_sample[s]["text"].tolist(), 32,
                        imdb_sample[s]["label"].to_numpy()) for s in ("train", "validation", "test")]


def test_poisoned_validation_and_test_change_no_choice_and_each_row_is_encoded_once(
        tiny_frames, monkeypatch):
    calls: list[int] = []
    real_loader = models.load_classifier

    def counting_loader(*args, **kwargs):
        model = real_loader(*args, **kwargs)
        model.base_model.register_forward_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(models, "load_classifier", counting_loader)
    train, validation, test = tiny_frames
    clean = linear_probe("tiny-distilbert", train, validation, test, batch_size=64, c_grid=GRID)
    assert len(calls) == 7 + 2 + 4  # one pass per batch of 64: 400, 100, 200 rows
    # validation and test with flipped labels and every review replaced by the first one
    poisoned = [f.assign(label=1 - f["label"], input_ids=[f["input_ids"].iloc[0]] * len(f),
                         length=f["length"].iloc[0]) for f in (validation, test)]
    poison = linear_probe("tiny-distilbert", train, *poisoned, batch_size=64, c_grid=GRID)
    assert set(clean.cv_accuracy_by_pooling) == {"mean", "cls"}
    assert (poison.pooling, poison.C, poison.cv_accuracy_by_pooling) == (
        clean.pooling, clean.C, clean.cv_accuracy_by_pooling)


def test_the_record_names_the_chosen_pooling_and_both_cv_scores(run):
    config, paths = run
    tokenize_dataset(config, paths)
    record = MetricsRecord.read(run_variant(Variant("linear_probe"), config, paths,
                                            device="cpu"))
    assert record.status == "ok", record.error
    scores = record.details["cv_accuracy_by_pooling"]
    chosen = record.hyperparameters["pooling"]
    assert set(scores) == {"mean", "cls"} and scores[chosen] == max(scores.values())
    assert record.details["cv_accuracy"] == scores[chosen]
    names = {"mean": "mean", "cls": "[CLS]"}
    assert (f"{names[chosen]} pooling (chosen by 5-fold cross-validation on train: "
            f"mean {scores['mean']:.2f}, [CLS] {scores['cls']:.2f})") in record.notes


@pytest.mark.slow
def test_probe_on_frozen_minilm_learns_real_reviews(imdb_dir):
    # 600 train + 200 validation from the train split, 300 test, seed 0; 96 tokens (128 read
    # more and scored a little higher, at 1.4 times the encoding time)
    reviews = pd.read_parquet(imdb_dir / "train.parquet").sample(n=800, random_state=0)
    test = pd.read_parquet(imdb_dir / "test.parquet").sample(n=300, random_state=0)
    tokenizer = load_tokenizer("embedded-minilm")
    frames = [token_frame(tokenizer, d["text"].tolist(), 96, d["label"].to_numpy())
              for d in (reviews.iloc[:600], reviews.iloc[600:], test)]
    result = linear_probe("embedded-minilm", *frames)
    val_acc = ((result.prob_validation >= 0.5) == frames[1]["label"]).mean()
    test_acc = ((result.prob_test >= 0.5) == frames[2]["label"]).mean()
    print(f"probe: {result.pooling} pooling (CV {result.cv_accuracy_by_pooling}) "
          f"C={result.C} cv={result.cv_accuracy:.3f} validation={val_acc:.3f} "
          f"test={test_acc:.3f} fit={result.fit_seconds:.2f}s encode={result.encode_seconds:.1f}s")
    # measured here: mean pooling (CV mean 0.742, [CLS] 0.687), validation 0.700, test 0.760
    # (chance: 0.5); at 128 tokens: CV 0.762 / 0.665, validation 0.670, test 0.747
    assert result.cv_accuracy_by_pooling[result.pooling] == max(
        result.cv_accuracy_by_pooling.values()) and result.params == 384 + 1
    assert result.cv_accuracy > 0.7 and test_acc > 0.7 and val_acc > 0.62
