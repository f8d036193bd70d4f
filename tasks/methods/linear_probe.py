"""Linear probe: logistic regression on frozen encoder features (Alain & Bengio 2016).

What the pretrained representation knows about sentiment before any fine-tuning. One
frozen forward pass per subset gives two feature sets, the masked mean and the [CLS]
position of the last hidden state (`tasks.features.encode_poolings`). For each, the
features are standardised and an L2-regularised logistic regression's C is chosen by
stratified k-fold cross-validation on the TRAIN features only (the same folds for both
poolings); the pooling whose best C scores higher in that cross-validation is used (ties:
the pooling the model was trained for, `pooling_for`). Validation and test features are
only transformed and scored by the chosen model, after both choices; neither subset can
change a choice (tested with poisoned validation and test sets).

Why choose the pooling: the embedded MiniLM was trained on mean pooling (its BERT pooler is
untrained), but DistilBERT was never trained to summarise a review in [CLS] (it has no
next-sentence objective), so neither pooling can be presumed for every encoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from tasks.features import Pooling
    from tasks.job import Job, Predictions

C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0)  # inverse L2 strength; standardised
# features of a few hundred dimensions want strong regularisation on small data (measured:
# 1e-3 to 3e-3 won CV for the MiniLM on 400 and 1,000 reviews)
CV_FOLDS = 5
MAX_ITER = 2000  # lbfgs on a few hundred dense dimensions converges well within this
POOLING_NAMES = {"mean": "mean", "cls": "[CLS]"}  # for people


@dataclass
class ProbeResult:
    prob_validation: np.ndarray  # P(positive) per validation row, in frame order
    prob_test: np.ndarray  # P(positive) per test row, in frame order
    C: float  # chosen by CV on train
    cv_accuracy: float  # mean CV accuracy of the chosen C
    cv_accuracy_by_C: dict[float, float]  # every candidate, for the record
    params: int  # coef + intercept
    fit_seconds: float  # CV search and refit; feature extraction excluded
    encode_seconds: float = 0.0  # frozen forward passes over all three frames
    pooling: str = ""  # chosen by CV on train when several were compared
    cv_accuracy_by_pooling: dict[str, float] = field(default_factory=dict)  # best C's, each


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, validation_x: np.ndarray,
              test_x: np.ndarray, *, c_grid: tuple[float, ...] = C_GRID, folds: int = CV_FOLDS,
              seed: int = 0) -> ProbeResult:
    """Standardise + logistic regression, C by `folds`-fold stratified CV on (train_x,
    train_y) alone, refit on all of train; P(positive) for validation and test."""
    _check_features(train_x, {"validation_x": validation_x, "test_x": test_x})
    search, seconds = cv_search(train_x, train_y, c_grid=c_grid, folds=folds, seed=seed)
    return _scored(search, validation_x, test_x, c_grid, seconds)


def fit_probe_poolings(train: dict[str, np.ndarray], train_y: np.ndarray,
                       validation: dict[str, np.ndarray], test: dict[str, np.ndarray], *,
                       c_grid: tuple[float, ...] = C_GRID, folds: int = CV_FOLDS,
                       seed: int = 0) -> ProbeResult:
    """`fit_probe` for each pooling's features ({pooling: (N, H)}), with the pooling chosen
    by the best CV accuracy on train (ties: the first key of `train`). Only the chosen
    pooling's model ever sees validation or test features."""
    if not train or set(validation) != set(train) or set(test) != set(train):
        raise ValueError(f"need the same poolings for train, validation and test, got "
                         f"{list(train)}, {list(validation)}, {list(test)}")
    searches: dict[str, Any] = {}
    seconds = 0.0
    for pooling, x in train.items():
        _check_features(x, {"validation_x": validation[pooling], "test_x": test[pooling]})
        searches[pooling], took = cv_search(x, train_y, c_grid=c_grid, folds=folds, seed=seed)
        seconds += took
    scores = {p: float(s.best_score_) for p, s in searches.items()}
    chosen = max(scores, key=scores.__getitem__)  # first of the best on ties
    result = _scored(searches[chosen], validation[chosen], test[chosen], c_grid, seconds)
    result.pooling, result.cv_accuracy_by_pooling = chosen, scores
    return result


def _check_features(train_x: np.ndarray, others: dict[str, np.ndarray]) -> None:
    for name, x in {"train_x": train_x, **others}.items():
        if x.ndim != 2 or x.shape[1] != train_x.shape[1]:
            raise ValueError(f"{name} must be (N, {train_x.shape[1]}), got {x.shape}")


def cv_search(train_x: np.ndarray, train_y: np.ndarray, *, c_grid: tuple[float, ...] = C_GRID,
              folds: int = CV_FOLDS, seed: int = 0) -> tuple[Any, float]:
    """(the fitted GridSearchCV over C, refit on all of train; its seconds). The folds
    depend on `seed` and the labels only, so two feature sets of the same reviews are
    compared on the same folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    y = np.asarray(train_y, dtype=np.int64)
    counts = np.bincount(y, minlength=2)
    if len(counts) != 2 or counts.min() < folds:
        raise ValueError(f"the probe needs labels in {{0, 1}} with at least folds={folds} "
                         f"examples of each, got counts {counts.tolist()}")
    if not c_grid or min(c_grid) <= 0:
        raise ValueError(f"c_grid must list positive values, got {c_grid!r}")
    if len(train_x) != len(y):
        raise ValueError(f"train_x has {len(train_x)} rows but train_y {len(y)}")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER))
    search = GridSearchCV(model, {"logisticregression__C": list(c_grid)}, scoring="accuracy",
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed), refit=True)
    # one BLAS thread: small dense fits gain nothing from more, and other tasks share the cores
    with threadpool_limits(limits=1):
        started = time.perf_counter()
        search.fit(train_x, y)
        return search, time.perf_counter() - started


def _scored(search: Any, validation_x: np.ndarray, test_x: np.ndarray,
            c_grid: tuple[float, ...], fit_seconds: float) -> ProbeResult:
    """The searched model's P(positive) on validation and test, and its record."""
    from threadpoolctl import threadpool_limits

    best = search.best_estimator_
    assert list(best.classes_) == [0, 1], best.classes_  # column 1 is P(positive)
    with threadpool_limits(limits=1):
        prob_val = best.predict_proba(validation_x)[:, 1]
        prob_test = best.predict_proba(test_x)[:, 1]
    logreg = best[-1]
    scores = search.cv_results_["mean_test_score"]
    return ProbeResult(
        prob_validation=prob_val, prob_test=prob_test,
        C=float(search.best_params_["logisticregression__C"]),
        cv_accuracy=float(search.best_score_),
        cv_accuracy_by_C={float(c): float(s) for c, s in zip(c_grid, scores, strict=True)},
        params=int(logreg.coef_.size + logreg.intercept_.size), fit_seconds=fit_seconds)


def linear_probe(model_source: str, train: pd.DataFrame, validation: pd.DataFrame,
                 test: pd.DataFrame, *, device: str | torch.device = "cpu",
                 batch_size: int = 64, c_grid: tuple[float, ...] = C_GRID,
                 folds: int = CV_FOLDS, seed: int = 0,
                 dtype: torch.dtype | None = None) -> ProbeResult:
    """Encode the three token frames once with the frozen encoder of `model_source`, both
    poolings from that one pass, then `fit_probe_poolings` (the model's own pooling,
    `pooling_for`, first: it wins ties). Only `train` needs a `label` column."""
    from tasks.features import POOLINGS, encode_poolings, pooling_for
    from tasks.models import load_classifier

    declared = pooling_for(model_source)
    order: tuple[Pooling, ...] = (declared, *(p for p in POOLINGS if p != declared))
    encoder = load_classifier(model_source, seed=seed).base_model.to(device)
    started = time.perf_counter()
    x = {name: encode_poolings(encoder, frame, order, device, batch_size, dtype)
         for name, frame in (("train", train), ("validation", validation), ("test", test))}
    encode_seconds = time.perf_counter() - started
    result = fit_probe_poolings(x["train"], train["label"].to_numpy(), x["validation"],
                                x["test"], c_grid=c_grid, folds=folds, seed=seed)
    result.encode_seconds = encode_seconds
    return result


def pooling_note(result: ProbeResult, folds: int = CV_FOLDS) -> str:
    """`mean pooling (chosen by 5-fold cross-validation on train: mean 0.81, [CLS] 0.74)`."""
    by_pooling = result.cv_accuracy_by_pooling
    scores = ", ".join(f"{POOLING_NAMES.get(p, p)} {by_pooling[p]:.2f}"
                       for p in sorted(by_pooling, key=list(POOLING_NAMES).index))
    return (f"{POOLING_NAMES.get(result.pooling, result.pooling)} pooling (chosen by "
            f"{folds}-fold cross-validation on train: {scores})")


def predict(job: Job) -> Predictions:
    """The method's entry point: encode the run's three subsets and fit the probe."""
    from tasks.evaluate import PeakMemory
    from tasks.job import Predictions
    from tasks.tokenize import load_split

    frames = {s: load_split(job.paths, s) for s in ("train", "validation", "test")}
    with PeakMemory(job.device) as memory:
        result = linear_probe(job.config.model, frames["train"], frames["validation"],
                              frames["test"], device=job.device,
                              dtype=job.dtype)
    record = job.record
    record.hyperparameters.update(features=f"frozen encoder, {result.pooling} pooling",
                                  pooling=result.pooling,
                                  pooling_choice=f"{CV_FOLDS}-fold cross-validation on train",
                                  C=result.C, C_grid=list(C_GRID), cv_folds=CV_FOLDS,
                                  standardised=True, solver="lbfgs")
    record.details.update(cv_accuracy=result.cv_accuracy,
                          cv_accuracy_by_pooling=dict(result.cv_accuracy_by_pooling),
                          cv_accuracy_by_C={str(c): a for c, a in result.cv_accuracy_by_C.items()},
                          encode_seconds=result.encode_seconds)
    record.params_trainable = result.params
    record.train_seconds = result.encode_seconds + result.fit_seconds
    record.peak_memory_bytes, record.peak_memory_kind = memory.peak_bytes, memory.kind
    record.notes = (f"Logistic regression on the frozen encoder's features: "
                    f"{pooling_note(result)}; C = {result.C:g} chosen by the same "
                    "cross-validation. Train time covers one encoding of all three subsets "
                    "(both poolings from the same forward pass) and both searches.")
    return Predictions(result.prob_validation, result.prob_test)
