"""Baselines that put LoRA's numbers in context (issue 3, "Baselines").

- `majority`: the most frequent training label for every review: the floor.
- `tfidf_logreg`: TF-IDF uni+bigrams and logistic regression, the classic strong IMDB
  baseline (Maas et al. 2011 report ~88% for bag-of-words models on the full data).
- `seed_heuristic`: the seed notebook's "zero-shot" test, the sign of the summed [CLS]
  hidden state of the untrained encoder. Not a classifier (shared/seed/README.md, point 6):
  kept so the report can show what it measures.
- `linear_probe`: the frozen pretrained encoder with only its head trained; it runs
  through the one training loop in `tasks.train`.

Each writes `results/<name>/metrics.json` (the record of `tasks.metrics`) and
`predictions.parquet`; on error a failed record, and the error is re-raised.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import ExperimentConfig
from tasks.metrics import fail_record, finish_record, new_record
from tasks.paths import RunPaths, atomic_dir, write_json

log = logging.getLogger(__name__)

BASELINE_NAMES = ("majority", "tfidf_logreg", "seed_heuristic", "linear_probe")
TFIDF_C_GRID = (1.0, 4.0, 10.0)  # inverse regularisation, chosen by 5-fold CV on train only
HEURISTIC_BATCH = 64  # inference only: no gradients, so larger than the training batch
LATENCY_EXAMPLES = 32  # batch-1 latency over this many test rows, as tasks.evaluate does
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)  # IMDB's line breaks are literal HTML


def run_baseline(name: str, config: ExperimentConfig, paths: RunPaths,
                 device: str | None = None) -> Path:
    """Run baseline `name` on the run's data; returns its metrics.json. `device` matters
    only for `seed_heuristic` and `linear_probe` (None: CUDA when present and
    `LORAFLOW_DEVICE` is not `cpu`, else the CPU)."""
    if name not in BASELINE_NAMES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINE_NAMES)}")
    if name == "linear_probe":  # a trained variant: its own record, loop and failure handling
        from tasks.train import train_variant

        spec = {"method": "linear_probe", "seed": config.seeds[0]}
        if device is None:
            return train_variant(spec, config, paths)
        return train_variant(spec, config, paths, device=device)
    runner: Callable[..., Path]
    runner, seed, hyper = {
        "majority": (_majority, None, {"rule": "most frequent training label"}),
        "tfidf_logreg": (_tfidf_logreg, None, {
            "ngram_range": [1, 2], "min_df": 2, "sublinear_tf": True, "lowercase": True,
            "preprocess": "strip <br />", "C_grid": list(TFIDF_C_GRID), "cv_folds": 5,
            "solver": "lbfgs", "max_iter": 1000, "threads": 1}),
        "seed_heuristic": (_seed_heuristic, config.seeds[0], {
            "score": "sum of the encoder's [CLS] hidden state", "threshold": 0.0,
            "prob_positive": "sigmoid(score)", "max_length": config.max_length,
            "batch_size": HEURISTIC_BATCH, "precision": "fp32"}),
    }[name]
    record = new_record(name, "baseline", config, seed, hyper)
    try:
        return runner(config, paths, record, device)
    except Exception as exc:
        log.exception("baseline %s failed", name)
        fail_record(record, exc, paths)
        raise


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the download step first")
    return pd.read_parquet(path, columns=columns)


# --- majority -------------------------------------------------------------------------------

def _majority(config: ExperimentConfig, paths: RunPaths, record: dict[str, Any],
              device: str | None) -> Path:
    train = _read(paths.train_parquet, ["label"])["label"].to_numpy()
    labels = _read(paths.test_parquet, ["label"])["label"].to_numpy()
    started = time.perf_counter()
    share_positive = float((train == 1).mean())
    train_seconds = time.perf_counter() - started
    majority = 1 if share_positive >= 0.5 else 0  # a tie goes to positive, as prob >= 0.5 does
    started = time.perf_counter()
    # prob_positive = the training prior, so `prob >= 0.5` reproduces the majority label
    prob = np.full(len(labels), share_positive, dtype=np.float64)
    predict_seconds = time.perf_counter() - started
    record["hyperparameters"].update(majority_label=majority, train_positive_share=share_positive)
    record.update(
        params_total=1, params_trainable=1,  # one learned number: the positive prior
        # counting labels takes microseconds: a throughput from it would dwarf every chart
        train_seconds=train_seconds, samples_per_second=None,
        inference_ms_per_example=1000.0 * predict_seconds / max(len(labels), 1),
        notes=(f"Predicts the most frequent training label ({majority}) for every review; "
               f"prob_positive is the training share of positives ({share_positive:.3f}). "
               "Its accuracy is the test share of that label: the floor for every other model."),
    )
    return finish_record(record, labels, prob, paths)


# --- TF-IDF + logistic regression -------------------------------------------------------------

def strip_breaks(text: str) -> str:
    """The vectorizer's preprocessor: IMDB's `<br />` tags out, lower case (a custom
    preprocessor replaces sklearn's own lowercasing)."""
    return _BREAK.sub(" ", text).lower()


def _tfidf_logreg(config: ExperimentConfig, paths: RunPaths, record: dict[str, Any],
                  device: str | None) -> Path:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from threadpoolctl import threadpool_limits

    from tasks.evaluate import PeakMemory

    train = _read(paths.train_parquet, ["text", "label"])
    test = _read(paths.test_parquet, ["text", "label"])
    y = train["label"].to_numpy()
    smallest = int(np.bincount(y, minlength=2).min())
    if smallest < 2:
        raise ValueError(f"tfidf_logreg needs at least 2 training reviews of each label, "
                         f"got {np.bincount(y, minlength=2).tolist()}")
    hyper = record["hyperparameters"]
    hyper["cv_folds"] = folds = min(hyper["cv_folds"], smallest)
    # One BLAS/OpenMP thread: these sparse fits gain nothing from more, and with other
    # tasks on the host, idle-spinning BLAS threads made the CV search 10x slower.
    with threadpool_limits(limits=1), PeakMemory("cpu") as memory:
        started = time.perf_counter()
        vectorizer = TfidfVectorizer(preprocessor=strip_breaks, ngram_range=(1, 2), min_df=2,
                                     sublinear_tf=True, dtype=np.float32)
        features = vectorizer.fit_transform(train["text"].tolist())
        # The vocabulary is fitted on all of train before CV: the idf leaks across folds,
        # which only matters for choosing C; the test subset is never seen here.
        search = GridSearchCV(LogisticRegression(solver=hyper["solver"], max_iter=hyper["max_iter"]),
                              {"C": list(TFIDF_C_GRID)}, cv=folds,
                              scoring="accuracy", refit=True)
        search.fit(features, y)
        train_seconds = time.perf_counter() - started
        model: Any = search.best_estimator_
        started = time.perf_counter()
        prob = model.predict_proba(vectorizer.transform(test["text"].tolist()))[:, 1]
        batch_seconds = time.perf_counter() - started
    # deployment latency: one review at a time, as the trained variants report it
    rows = test["text"].tolist()[:LATENCY_EXAMPLES]
    with threadpool_limits(limits=1):
        started = time.perf_counter()
        for text in rows:
            model.predict_proba(vectorizer.transform([text]))
        latency_ms = 1000.0 * (time.perf_counter() - started) / len(rows)
    assert list(model.classes_) == [0, 1], model.classes_  # column 1 is P(positive)
    artifact = _save_tfidf(paths.variant_dir(record["variant"]) / "model", vectorizer, model)
    hyper.update(C=float(search.best_params_["C"]), vocabulary_size=len(vectorizer.vocabulary_),
                 cv_accuracy=float(search.best_score_))
    record.update(
        params_total=int(model.coef_.size + model.intercept_.size),
        params_trainable=int(model.coef_.size + model.intercept_.size),
        train_seconds=train_seconds, samples_per_second=_rate(len(train), train_seconds),
        peak_memory_bytes=memory.peak_bytes, peak_memory_kind=memory.kind,
        artifact_bytes=sum(f.stat().st_size for f in artifact.iterdir()),
        inference_ms_per_example=latency_ms,
        inference_batch_ms_per_example=1000.0 * batch_seconds / max(len(test), 1),
        notes=("TF-IDF of word uni- and bigrams (min_df 2, sublinear tf) and a logistic "
               f"regression whose C was chosen by {folds}-fold cross-validation on the "
               "training subset; train_seconds covers vectorizing, the search and the refit. "
               "Parameters = one coefficient per vocabulary entry + the intercept."),
    )
    return finish_record(record, test["label"].to_numpy(), prob, paths)


def _save_tfidf(folder: Path, vectorizer: Any, model: Any) -> Path:
    """Vocabulary (JSON) and idf/coef/intercept (safetensors): a model that can be rebuilt
    without unpickling anything."""
    from safetensors.numpy import save_file

    with atomic_dir(folder) as tmp:
        write_json(tmp / "vocabulary.json", {t: int(i) for t, i in vectorizer.vocabulary_.items()})
        save_file({"idf": vectorizer.idf_.astype(np.float32),
                   "coef": np.ascontiguousarray(model.coef_, dtype=np.float32),
                   "intercept": np.asarray(model.intercept_, dtype=np.float32)},
                  str(tmp / "weights.safetensors"))
    return folder


# --- the seed notebook's "zero-shot" heuristic --------------------------------------------------

def cls_sums(encoder: Any, frame: pd.DataFrame, device: str, batch_size: int = HEURISTIC_BATCH) -> np.ndarray:
    """Sum over hidden units of the [CLS] (first) position's last hidden state, one float
    per row in the frame's order; batches padded to their longest row, sorted by length."""
    import torch

    from tasks.evaluate import eval_mode, pad_batch, pad_id_of, sorted_batches

    ids_col, pad = frame["input_ids"].tolist(), pad_id_of(encoder)
    out = np.empty(len(frame), dtype=np.float64)
    with eval_mode(encoder):
        for idx in sorted_batches(frame["length"].to_numpy(), batch_size):
            ids, mask = pad_batch([ids_col[i] for i in idx], pad)
            hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            out[idx] = hidden[:, 0, :].to(torch.float64).sum(dim=-1).cpu().numpy()  # (B,)
    return out


def _seed_heuristic(config: ExperimentConfig, paths: RunPaths, record: dict[str, Any],
                    device: str | None) -> Path:
    import torch
    from scipy.special import expit

    from lora_core.models import load_classifier
    from tasks.evaluate import PeakMemory, measure_latency_ms
    from tasks.tokenize import load_split

    if not device:  # as tasks.gpu: LORAFLOW_DEVICE=cpu keeps everything on the CPU
        cpu_only = os.environ.get("LORAFLOW_DEVICE", "").strip().lower() == "cpu"
        device = "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
    device = str(torch.device(device))
    record["device"] = device
    test = load_split(paths, "test")  # the WHOLE test subset (the notebook used 200 reviews)
    with PeakMemory(device) as memory:
        # the bare pretrained encoder (DistilBertModel / BertModel), as the notebook used;
        # the classification head load_classifier adds is never called
        encoder = load_classifier(config.model, seed=record["seed"]).base_model.to(device)
        started = time.perf_counter()
        scores = cls_sums(encoder, test, device)
        eval_seconds = time.perf_counter() - started
    latency_ms = measure_latency_ms(encoder, test, device, min(LATENCY_EXAMPLES, len(test)))
    labels = test["label"].to_numpy()
    prob = expit(scores)  # sigmoid: > 0.5 exactly when the score is > 0, the notebook's rule
    positive_share = float((scores > 0).mean())
    n_params = sum(p.numel() for p in encoder.parameters())
    record.update(
        params_total=int(n_params), params_trainable=0,
        peak_memory_bytes=memory.peak_bytes, peak_memory_kind=memory.kind,
        inference_ms_per_example=latency_ms, eval_seconds=eval_seconds,
        inference_batch_ms_per_example=1000.0 * eval_seconds / len(test),
        score_summary={"mean": float(scores.mean()), "std": float(scores.std()),
                       "min": float(scores.min()), "max": float(scores.max()),
                       "positive_share": positive_share},
        notes=("The seed notebook's 'zero-shot baseline': predict positive when the sum of the "
               "[CLS] hidden state of the untrained encoder is > 0 (prob_positive = sigmoid of "
               "that sum). It is not a classifier: nothing ties the sign of this fixed, "
               "untrained projection to sentiment. Here it called "
               f"{positive_share:.1%} of the reviews positive; the test subset is "
               f"{float((labels == 1).mean()):.1%} positive. Whole test subset, no training."),
    )
    return finish_record(record, labels, prob, paths)


def _rate(n: int, seconds: float) -> float | None:
    return n / seconds if seconds > 0 else None
