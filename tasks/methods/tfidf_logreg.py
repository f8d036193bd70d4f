"""TF-IDF of word uni- and bigrams with logistic regression: the classic strong IMDB
baseline (Maas et al. 2011 report about 88% for bag-of-words models on the full data).
C is chosen by cross-validation on the training subset only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.job import Job, Predictions
from tasks.paths import atomic_dir, write_json

C_GRID = (1.0, 4.0, 10.0)  # inverse regularisation
CV_FOLDS = 5
LATENCY_EXAMPLES = 32  # batch-1 latency over this many test rows, as for the encoders
SPLITS = ("train", "validation", "test")


def predict(job: Job) -> Predictions:
    """Whole reviews (as normalised by the download step)."""
    texts = {s: pd.read_parquet(job.paths.split_parquet(s), columns=["text", "label"])
             for s in SPLITS}
    return fit_predict(job, texts)


def fit_predict(job: Job, texts: dict[str, pd.DataFrame]) -> Predictions:
    """Fit on `texts["train"]` (columns text, label), choose C by cross-validation there,
    and return P(positive) of the validation and test texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from threadpoolctl import threadpool_limits

    from tasks.evaluate import PeakMemory

    y = texts["train"]["label"].to_numpy()
    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        raise ValueError(f"{job.variant.method} needs at least 2 training reviews of each label, "
                         f"got {counts.tolist()}")
    folds = min(CV_FOLDS, int(counts.min()))
    # One BLAS/OpenMP thread: these sparse fits gain nothing from more, and with other
    # tasks on the host, idle-spinning BLAS threads made the CV search 10x slower.
    with threadpool_limits(limits=1), PeakMemory("cpu") as memory:
        started = time.perf_counter()
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                                     dtype=np.float32)
        features = vectorizer.fit_transform(texts["train"]["text"].tolist())
        # The vocabulary is fitted on all of train before CV: the idf leaks across folds,
        # which only matters for choosing C; validation and test are never seen here.
        search = GridSearchCV(LogisticRegression(solver="lbfgs", max_iter=1000),
                              {"C": list(C_GRID)}, cv=folds, scoring="accuracy", refit=True)
        search.fit(features, y)
        train_seconds = time.perf_counter() - started
        model: Any = search.best_estimator_
        started = time.perf_counter()
        prob = {s: model.predict_proba(vectorizer.transform(texts[s]["text"].tolist()))[:, 1]
                for s in ("validation", "test")}
        batch_seconds = time.perf_counter() - started
    assert list(model.classes_) == [0, 1], model.classes_  # column 1 is P(positive)
    rows = texts["test"]["text"].tolist()[:LATENCY_EXAMPLES]
    with threadpool_limits(limits=1):  # deployment latency: one review at a time
        started = time.perf_counter()
        for text in rows:
            model.predict_proba(vectorizer.transform([text]))
        latency_ms = 1000.0 * (time.perf_counter() - started) / len(rows)
    folder = job.out / "model"
    with atomic_dir(folder) as tmp:
        _save(tmp, vectorizer, model)
    record = job.record
    record.hyperparameters.update(
        ngram_range=[1, 2], min_df=2, sublinear_tf=True, preprocess="lower case",
        C_grid=list(C_GRID), cv_folds=folds, solver="lbfgs", max_iter=1000,
        C=float(search.best_params_["C"]), vocabulary_size=len(vectorizer.vocabulary_))
    record.details["cv_accuracy"] = float(search.best_score_)
    record.params_total = record.params_trainable = int(model.coef_.size + model.intercept_.size)
    record.train_seconds = train_seconds
    record.samples_per_second = len(y) / train_seconds if train_seconds > 0 else None
    record.peak_memory_bytes, record.peak_memory_kind = memory.peak_bytes, memory.kind
    record.artifact_bytes = sum(f.stat().st_size for f in folder.iterdir())
    record.inference_ms_per_example = latency_ms
    record.details["inference_batch_ms_per_example"] = (
        1000.0 * batch_seconds / (len(texts["validation"]) + len(texts["test"])))
    record.notes = (f"TF-IDF of word uni- and bigrams (min_df 2, sublinear tf) and a logistic "
                    f"regression whose C was chosen by {folds}-fold cross-validation on the "
                    "training subset; train time covers vectorizing, the search and the refit. "
                    "Parameters: one coefficient per vocabulary entry and the intercept.")
    return Predictions(prob["validation"], prob["test"])


def _save(folder: Path, vectorizer: Any, model: Any) -> None:
    """Vocabulary (JSON) and idf/coef/intercept (safetensors): a model that can be rebuilt
    without unpickling anything."""
    from safetensors.numpy import save_file

    write_json(folder / "vocabulary.json", {t: int(i) for t, i in vectorizer.vocabulary_.items()})
    save_file({"idf": vectorizer.idf_.astype(np.float32),
               "coef": np.ascontiguousarray(model.coef_, dtype=np.float32),
               "intercept": np.asarray(model.intercept_, dtype=np.float32)},
              str(folder / "weights.safetensors"))
