"""Linear probe: C chosen by cross-validation on train only, a real MiniLM subset learnt."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.features import token_frame
from tasks.methods.linear_probe import fit_probe, linear_probe
from tasks.models import load_tokenizer


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


@pytest.mark.slow
def test_probe_on_frozen_minilm_learns_real_reviews(imdb_dir):
    # 600 train + 200 validation from the train split, 300 test, seed 0; 128 tokens
    reviews = pd.read_parquet(imdb_dir / "train.parquet").sample(n=800, random_state=0)
    test = pd.read_parquet(imdb_dir / "test.parquet").sample(n=300, random_state=0)
    tokenizer = load_tokenizer("embedded-minilm")
    frames = [token_frame(tokenizer, d["text"].tolist(), 128, d["label"].to_numpy())
              for d in (reviews.iloc[:600], reviews.iloc[600:], test)]
    result = linear_probe("embedded-minilm", *frames)
    val_acc = ((result.prob_validation >= 0.5) == frames[1]["label"]).mean()
    test_acc = ((result.prob_test >= 0.5) == frames[2]["label"]).mean()
    print(f"probe: C={result.C} cv={result.cv_accuracy:.3f} validation={val_acc:.3f} "
          f"test={test_acc:.3f} fit={result.fit_seconds:.2f}s encode={result.encode_seconds:.1f}s")
    # measured here: C=0.003, CV 0.762, validation 0.670, test 0.747 (chance: 0.5)
    assert result.pooling == "mean" and result.params == 384 + 1
    assert result.cv_accuracy > 0.7 and test_acc > 0.7 and val_acc > 0.62
